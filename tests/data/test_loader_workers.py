"""DataLoader workers do not outlive their rank."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from .data_fixtures import make_corpus, train_small_tokenizer

CHILD = """
import os, signal, sys
from pathlib import Path
from launcher.data.loader import StreamLoader
from launcher.data.sources import resolve_corpus
from launcher.data.tokenizer import TextTokenizer
from tests.data.data_fixtures import data_config

cfg = data_config(Path(sys.argv[1]), num_workers=2, seq_len=512)
tokenizer = TextTokenizer.load(sys.argv[2])
loader = StreamLoader(cfg, tokenizer, resolve_corpus(cfg), batch_size=64, seed=0)  # > a pipe buffer
batches = iter(loader)  # kept alive: the workers live as long as the iterator
next(batches)
children = []
for entry in os.listdir("/proc"):
    try:
        stat = open(f"/proc/{entry}/stat").read() if entry.isdigit() else ""
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():  # field 4: ppid
            children.append(entry)
    except OSError:
        pass
print(" ".join(children), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # die like a rank under kill -9 or the OOM killer
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_workers_exit_when_their_rank_is_killed(tmp_path):
    make_corpus(tmp_path)
    train_small_tokenizer(None, tmp_path / "tok")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tmp_path / "tok")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": repo},
        cwd=repo,
    )
    workers = [int(p) for p in done.stdout.split()]
    assert len(workers) == 2, done.stdout + done.stderr
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and not _zombie(p)]
    assert not alive, f"workers {alive} outlived their killed rank"


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
    except OSError:
        return True
