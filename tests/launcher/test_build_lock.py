"""A JIT build lock left by a killed build (torch's FileBaton: a bare file) is removed before
DeepSpeed builds its op; a live build's lock is left alone. Before, a run with
``dist.offload_optimizer`` after a ``kill -9`` during the first ``cpu_adam`` build waited
forever at set-up, printing nothing."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from launcher.build_lock import clear_stale_lock

from .test_task_step import Repeated, cfg_for, train


def _folder(tmp_path, age: float):
    folder = tmp_path / "cpu_adam"
    folder.mkdir()
    (folder / "lock").touch()
    (folder / "cpu_adam.o").write_bytes(b"half an object")
    then = time.time() - age
    for path in (folder / "lock", folder / "cpu_adam.o", folder):
        os.utime(path, (then, then))
    return folder


def test_a_lock_nobody_holds_in_a_quiet_folder_is_removed_with_a_warning(tmp_path, caplog):
    folder = _folder(tmp_path, age=1000)
    with caplog.at_level(logging.INFO, "launcher.build_lock"):
        assert clear_stale_lock(folder, quiet_seconds=300)
    assert not (folder / "lock").exists() and (folder / "cpu_adam.o").exists()
    assert f"removed {folder / 'lock'}: left by a build of cpu_adam that was killed" in caplog.text


def test_a_lock_a_process_holds_open_is_kept_and_named(tmp_path, caplog):
    folder = _folder(tmp_path, age=1000)
    fd = os.open(folder / "lock", os.O_RDONLY)  # as FileBaton holds it during a build
    try:
        with caplog.at_level(logging.INFO, "launcher.build_lock"):
            assert not clear_stale_lock(folder, quiet_seconds=300)
    finally:
        os.close(fd)
    assert (folder / "lock").exists()
    assert f"held by pid {os.getpid()}" in caplog.text
    assert "the build of cpu_adam waits until it is removed" in caplog.text


def test_a_lock_in_a_folder_that_changed_lately_is_kept(tmp_path):
    folder = _folder(tmp_path, age=1000)
    (folder / "build.ninja").write_text("rule cxx\n")  # a build on another node writes here
    assert not clear_stale_lock(folder, quiet_seconds=300)
    assert (folder / "lock").exists()
    assert not clear_stale_lock(tmp_path / "never-built")  # no folder, no lock: nothing to do


@pytest.mark.slow
def test_an_offload_run_after_a_killed_cpu_adam_build_trains_instead_of_waiting(
    tmp_path, monkeypatch
):
    """The real thing: DeepSpeed's cpu_adam JIT-built into an empty extension folder that
    holds a lock as a SIGKILLed build leaves it (with a minute-old half object file)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from launcher.build_lock import build_folder

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    folder = build_folder(get_accelerator().create_op_builder("CPUAdamBuilder").NAME)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()
    then = time.time() - 600
    for path in (folder / "lock", folder):
        os.utime(path, (then, then))
    cfg = cfg_for(tmp_path, "offload", 2)
    cfg.dist.zero_stage, cfg.dist.offload_optimizer = 2, True

    def waited_too_long(*_):  # without the fix: torch's wait on the lock never ends
        raise TimeoutError("set-up still waiting after 300 s: the stale lock was not removed")

    previous = signal.signal(signal.SIGALRM, waited_too_long)
    signal.alarm(300)  # the build itself takes ~45 s on 2 cores
    try:
        trainer, _ = train(cfg, Repeated)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert trainer.state.step == 2
    assert isinstance(trainer.optimizer, DeepSpeedCPUAdam)
    assert not (folder / "lock").exists() and any(folder.glob("*.so"))
