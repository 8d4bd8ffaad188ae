"""Helpers of the SFT tests: data files, configs, in-process trainers and real runs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from finetune.config import SFTConfig
from finetune.format_task import write as write_format_task
from finetune.sft import SFTTask
from launcher.callbacks import default_callbacks
from launcher.config import CONFIG_ROOT, load_config
from launcher.loop import Trainer
from launcher.runtime import build_runtime
from tests.launcher.runs import env

SFT_TINY = str(CONFIG_ROOT / "finetune" / "sft-tiny.yaml")
QUIET = ["metrics.wandb=false", "metrics.progress_bar=false", "metrics.log_every=1"]

__all__ = ["write_format_task"]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def varied_chats(n: int) -> list[dict]:
    """``n`` conversations of clearly different lengths (1-3 exchanges, some with a system)."""
    words = [
        "the",
        "river",
        "runs",
        "past",
        "the",
        "old",
        "mill",
        "and",
        "the",
        "miller",
        "counts",
        "his",
        "sacks",
        "of",
        "grain",
    ]
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 2 else []
        for turn in range(1 + i % 3):
            ask = " ".join(words[(i + turn) % 5 : (i + turn) % 5 + 3 + i % 4])
            answer = " ".join(words[turn : turn + 1 + (i * 3 + turn) % 9])
            messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def overrides(root: Path, name: str, parent: Path, train: Path, *extra: str) -> list[str]:
    return [
        f"run.output_dir={root}",
        f"run.name={name}",
        f"init.path={parent}",
        f"data.train=[{{paths: [{train}]}}]",
        "data.validation=null",
        "eval.every=null",
        "checkpoint.best=null",
        "train.precision=fp32",
        *QUIET,
        *extra,
    ]


def sft_config(root: Path, name: str, parent: Path, train: Path, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, SFT_TINY, overrides(root, name, parent, train, *extra))


@contextlib.contextmanager
def trainer_for(cfg: SFTConfig) -> Iterator[Trainer]:
    """A set-up trainer of ``cfg`` in this process (one rank), closed after the block."""
    runtime = build_runtime(cfg)
    try:
        trainer = Trainer(cfg, runtime, SFTTask(cfg, runtime), default_callbacks(cfg))
        trainer.setup()
        yield trainer
    finally:
        runtime.close()


def run_sft(
    root: Path, name: str, parent: Path, train: Path, *extra: str, nproc: int = 1, check=True
) -> subprocess.CompletedProcess:
    """``python -m launcher sft SFT_TINY ...`` in ``root``; asserts exit 0 when ``check``."""
    command = [sys.executable, "-m", "launcher", "sft", SFT_TINY, "--nproc", str(nproc)]
    done = subprocess.run(
        [*command, *overrides(root, name, parent, train, *extra)],
        cwd=root,
        env=env(OMP_NUM_THREADS=str(2 // nproc)),  # the 2 cores, as `kiln` would share them
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def metrics(root: Path, name: str) -> list[dict]:
    path = root / name / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def losses(root: Path, name: str) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(root, name) if "train/loss" in m}
