"""The checkpoint benchmark runs end to end on a tiny setting and reports both parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "checkpoint.py"


def test_the_checkpoint_benchmark_prints_both_tables_on_a_tiny_setting(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model=tiny",
            "--rounds=1",
            "--docs=600",
            "--early=2",
            "--steps=4",
            "--resume-rounds=1",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    # The workers assert a world of 2 under ZeRO-3 (part 1) and 2 ranks resuming at the
    # right step (part 2); the report says so.
    assert "2 ranks, ZeRO-3" in out
    assert "| ours: `persist.save`" in out and "| `torch.save` of the same tensors" in out
    assert "gather: safe_get_full_*" in out
    assert "resume start -> first step done" in out and "data stream alone" in out
    assert "Goal: time to the first step after resuming at 4" in out
