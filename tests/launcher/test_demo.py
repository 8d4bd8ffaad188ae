"""The README's main job as a user runs it: `python -m launcher pretrain configs/pretrain/demo.yaml
--nproc 2`, wandb on (offline: no key), DataLoader workers on. Only the length is cut down."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.config import CONFIG_ROOT

from .runs import world_sizes

DEMO = str(CONFIG_ROOT / "pretrain" / "demo.yaml")


def _processes_mentioning(marker: str) -> dict[int, str]:
    """Live processes whose command line holds ``marker`` (the test's own directory): the
    launcher, the workers (torch's agent starts them in sessions of their own) and their
    DataLoader workers."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if state != "Z" and marker in cmdline:
            found[int(proc.name)] = cmdline
    return found


def _kill(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_on_two_processes_with_wandb_exits_cleanly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_DIR"] = str(tmp_path)  # wandb's own cache, not the user's
    overrides = [
        f"run.output_dir={tmp_path}",
        f"data.builtin.dir={tmp_path / 'corpus'}",
        "data.builtin.docs=3000",
        "data.builtin.shards=4",
        "train.max_steps=4",
        "schedule.warmup_steps=1",
        "eval.every=2",
    ]
    log = tmp_path / "demo.log"  # a file, not a pipe: a hung orphan would hold a pipe open
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "pretrain", DEMO, "--nproc", "2", *overrides],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        proc.wait(timeout=480)
    except subprocess.TimeoutExpired:
        _kill([proc.pid, *_processes_mentioning(str(tmp_path))])
        proc.wait()
        out = log.read_text()
        pytest.fail(f"the demo did not finish in 8 minutes (hung at the end?):\n{out[-4000:]}")
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    lines = [line for line in out.splitlines() if line.startswith("[kiln]")]
    assert any("trained 4 steps" in line and "bits per byte" in line for line in lines), out
    assert any(line.startswith("[kiln] model") and "hf/" in line for line in lines), out
    run = tmp_path / "demo"
    assert world_sizes(tmp_path, "demo") == {2.0}  # not a silent world of 1
    assert (run / "hf" / "config.json").is_file()
    assert list((run / "wandb").glob("offline-run-*/*.wandb")), "wandb (offline) did not log"
    deadline = time.time() + 30  # the launcher's children are reaped right after it exits
    while (left := _processes_mentioning(str(tmp_path))) and time.time() < deadline:
        time.sleep(0.5)
    _kill(left)
    assert not left, f"processes left behind: {list(left.values())}"
