"""Smoke test of benchmarks/zero_memory.py: two real ranks, the census, the planner beside it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "zero_memory.py"


def test_zero3_on_one_and_two_ranks_measured_and_planned(tmp_path):
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--stages", "3", "--no-sized"]
    done = subprocess.run(
        [*command, "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    rows = {
        m[0]: m[1]
        for m in re.findall(
            r"^\| 3 \| (\d) \| [\d,]+ \| [\d,]+ \| [\d,]+ \| "
            r"[\d,]+ \| ([\d.]+) \|",
            out,
            re.M,
        )
    }
    assert set(rows) == {"1", "2"}  # both worlds ran (each rank checked its world size)
    assert float(rows["2"]) < 0.8  # two ranks hold less than one
    error = float(re.search(r"largest planner error: ([\d.]+)%", out)[1])
    assert error <= 15
