"""One launch per run directory: a second one fails at once naming the holder; the lock dies
with its holder (kill -9 included), so it never needs cleaning up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

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
