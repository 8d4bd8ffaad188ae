"""One launch per run directory: a second one fails at once naming the holder; the lock dies
with its holder (kill -9 included), so it never needs cleaning up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from launcher import rundir
from launcher.cli import _holds_run_dir, main
from launcher.config import CONFIG_ROOT
from launcher.rundir import LOCKED_ENV, PREEMPTED, RunDirBusy, RunLock, write_marker

HOLD = "import sys, time; from launcher.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
HOLD += "print('locked', flush=True); time.sleep(600)"


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / 'run'``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_launch_fails_at_once_naming_the_holder_and_touches_nothing(
    tmp_path, holder, capsys
):
    run_dir = tmp_path / "run"
    write_marker(run_dir, {"step": 7})  # the running launch's, must survive
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid} on host {socket.gethostname()}"):
        RunLock(run_dir).acquire()
    started = time.monotonic()
    tiny = str(CONFIG_ROOT / "pretrain" / "tiny.yaml")
    code = main(["pretrain", tiny, f"run.output_dir={tmp_path}", "run.name=run"])
    assert code == 1 and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert f"{run_dir} is in use by another launch (pid {holder.pid} on host" in err
    assert (run_dir / PREEMPTED).exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", PREEMPTED]


def test_the_lock_goes_with_its_holder_even_after_kill_9(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path / "run").acquire()  # not stuck
    lock.release()
    RunLock(tmp_path / "run").acquire().release()  # and runs one after another reuse it


def test_the_lock_is_taken_by_the_launcher_or_else_by_global_rank_0(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    for var in ("WORLD_SIZE", "RANK", LOCKED_ENV):
        monkeypatch.delenv(var, raising=False)
    assert _holds_run_dir(run_dir)  # a process that runs the stage by itself
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert _holds_run_dir(run_dir)  # torchrun started us: nobody holds it yet
    monkeypatch.setenv(LOCKED_ENV, str(run_dir.resolve()))
    assert not _holds_run_dir(run_dir)  # the kiln launcher of the main node holds it
    monkeypatch.delenv(LOCKED_ENV)
    monkeypatch.setenv("RANK", "3")
    assert not _holds_run_dir(run_dir)  # other ranks and nodes never lock


STOPPING = "import sys, time; from launcher.rundir import RunLock; "
STOPPING += "lock = RunLock(sys.argv[1]).acquire(); lock.mark_stopping(float(sys.argv[2])); "
STOPPING += "print('stopping', flush=True); time.sleep(float(sys.argv[3])); lock.release(); "
STOPPING += "print('released', flush=True); time.sleep(600)"


def stopping_holder(run_dir, grace: float, saves_for: float) -> subprocess.Popen:
    """Another process holding ``run_dir`` that was told to stop (grace ``grace`` s) and lets
    go after ``saves_for`` seconds, as a stage saving its stop checkpoint does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPING, str(run_dir), str(grace), str(saves_for)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "stopping"
    return proc


def test_a_launch_waits_for_a_stopping_holder_to_let_go(tmp_path, caplog):
    """Re-running a moment after a stop: the old launch still saves its checkpoint; the new
    one waits for it (saying so) instead of failing "in use by another launch"."""
    run_dir = tmp_path / "run"
    proc = stopping_holder(run_dir, grace=60, saves_for=2.0)
    try:
        started = time.monotonic()
        lock = RunLock(run_dir).acquire()
        waited = time.monotonic() - started
        assert proc.stdout.readline().strip() == "released"
        assert 1.0 < waited < 20, waited
        assert (
            f"{run_dir} is held by a launch that is stopping (pid {proc.pid} on host" in caplog.text
        )
        info = json.loads((run_dir / ".lock").read_text())
        assert info["pid"] == os.getpid() and "stopping" not in info  # ours now, not stopping
        lock.mark_stopping(5)
        info = json.loads((run_dir / ".lock").read_text())
        assert info["grace"] == 5 and info["pid"] == os.getpid()
        lock.release()
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_stopping_past_its_grace_is_busy_and_says_since_when(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "STOPPING_SLACK", 1.0)
    run_dir = tmp_path / "run"
    proc = stopping_holder(run_dir, grace=0, saves_for=600)  # stuck in its save
    try:
        started = time.monotonic()
        with pytest.raises(RunDirBusy, match=r"it was told to stop \d+ s ago and has not let go"):
            RunLock(run_dir).acquire()
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()


def test_a_stop_signal_to_the_launcher_marks_its_lock_stopping(tmp_path, monkeypatch):
    """The kiln launcher that holds the run directory for its workers says "stopping" in the
    lock file at the first stop signal, with the run's grace (what a new launch waits for)."""
    from launcher.cli import _stopping, run_forwarding_signals

    lock = RunLock(tmp_path / "run").acquire()
    child = [
        sys.executable,
        "-c",
        "import os, signal, time; os.kill(os.getppid(), signal.SIGTERM); time.sleep(1)",
    ]
    code = run_forwarding_signals(child, on_stop=_stopping(lock, 42))
    assert code == -signal.SIGTERM  # passed on to the child
    info = json.loads((tmp_path / "run" / ".lock").read_text())
    assert info["grace"] == 42 and info["pid"] == os.getpid() and info["stopping"] <= time.time()
    lock.release()


def test_the_first_stop_request_calls_the_listeners_once_and_a_failing_one_is_logged(caplog):
    from launcher.signals import STOP

    called = []

    def broken():
        raise OSError("read-only file system")

    STOP.listeners += [broken, lambda: called.append(STOP.name)]
    try:
        with STOP.catching():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the forwarded copy: not a second request
            assert STOP.name == "SIGTERM"
    finally:
        STOP.listeners.clear()
    assert called == ["SIGTERM"]
    assert "at the stop request" in caplog.text and "OSError: read-only file system" in caplog.text


def test_a_listener_added_after_the_request_is_called_at_once():
    from launcher.signals import STOP

    called = []
    try:
        with STOP.catching():
            os.kill(os.getpid(), signal.SIGTERM)  # during set-up, before the lock was taken
            STOP.listen([lambda: called.append(STOP.name)])
            assert called == ["SIGTERM"]
    finally:
        STOP.listeners.clear()
