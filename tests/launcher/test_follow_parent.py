"""``follow_parent``: a process a kiln parent started (a pipeline's stage, the launcher's
agent) is sent SIGTERM, its ordinary stop, when that parent dies, however it died; and one
whose parent died before it could ask for that stops too. (The pipeline-level consequence:
tests/launcher/test_pipeline.py, a chain killed during SFT.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

CHILD = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
time.sleep(float(sys.argv[2]))  # let the parent die first, for the race case
signal.signal(signal.SIGTERM, lambda *_: (out.joinpath("sigterm").write_text("x"), os._exit(0)))
from launcher.signals import PARENT_ENV, follow_parent
follow_parent()
out.joinpath("following").write_text(os.environ.get(PARENT_ENV, "removed"))
time.sleep(60)
"""

PARENT = """
import os, subprocess, sys
from launcher.signals import child_env
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]],
                         env=child_env())
print(child.pid, flush=True)
if sys.argv[4] == "exit":
    os._exit(0)
child.wait()
"""


def start(tmp_path: Path, delay: float, then: str) -> subprocess.Popen:
    """The parent, once it has started the child (it prints the child's pid)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PARENT), textwrap.dedent(CHILD), str(tmp_path),
         str(delay), then],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert int(parent.stdout.readline()) > 0
    return parent


def wait_for(path: Path, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def test_the_child_of_a_killed_parent_gets_sigterm(tmp_path):
    parent = start(tmp_path, 0.0, "wait")
    assert wait_for(tmp_path / "following", 60)
    # the variable is gone: the child's own children are not tied to a pid that is not theirs
    assert (tmp_path / "following").read_text() == "removed"
    parent.kill()  # SIGKILL: the parent can pass nothing on
    parent.wait()
    assert wait_for(tmp_path / "sigterm", 10), "the orphan was not told to stop"


def test_a_child_whose_parent_died_before_it_asked_stops_at_once(tmp_path):
    parent = start(tmp_path, 1.0, "exit")  # the parent is gone before follow_parent
    parent.wait()
    assert wait_for(tmp_path / "sigterm", 20), "the orphan was not told to stop"
    assert not (tmp_path / "following").exists()
