"""Runs of `kiln distill` (configs/finetune/distill-tiny.yaml) for the distillation tests: a
launched one (`python -m launcher distill ... --nproc N`, what users run, for the ZeRO-3 check)
and in-process ones (the stage's own entry points, for the learning checks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from finetune.distill import DistillTask
from finetune.distill_config import DistillConfig
from launcher.config import CONFIG_ROOT, load_config
from launcher.runner import run_stage
from pretrain.config import PretrainConfig
from pretrain.prepare import prepare_inputs
from pretrain.train import pretrain

from ..launcher.runs import QUIET, TINY, env

RECIPE = str(CONFIG_ROOT / "finetune" / "distill-tiny.yaml")
STUDENT = [  # the recipe's student, for the plain pretraining run
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
    "model.ffn_size=176", "model.max_seq_len=512", "model.vocab_size=2048",
]  # fmt: skip
# data.num_workers=2 on one process reads the same 2 readers, in the same rotation, as 2 ranks
# of 1 worker each: every step sees the same global batch in both layouts
SAME = ["train.max_steps=200", "schedule.warmup_steps=10", "optim.lr=2e-3", "eval.every=200",
        "checkpoint.every=100", "dist.zero_stage=0", "train.precision=fp32",
        "data.num_workers=2"]  # fmt: skip
# In this process, no reader processes: forked from a pytest-xdist worker they are what once
# crashed under the parallel pass. Another data order than SAME's, so runs made here are
# compared with runs made here only; the global batch of 8 in one micro batch (no
# accumulation: ~10% less time per step on these tiny models).
HERE = [*SAME, "data.num_workers=0", "train.micro_batch_size=8"]


def distill(root: Path, name: str, teacher: Path, *overrides: str, nproc: int = 1, check=True):
    """`python -m launcher distill <recipe> --nproc N` with the test's run settings."""
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "distill", RECIPE, "--nproc", str(nproc),
         f"run.output_dir={root}", f"run.name={name}", f"data.builtin.dir={root / 'corpus'}",
         f"teacher.path={teacher}", *QUIET, *SAME, *overrides],
        cwd=root, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def distill_here(root: Path, name: str, teacher: Path, *overrides: str) -> DistillTask:
    """The `distill` stage in this process (what `python -m launcher distill` runs on one
    process, without the ~8 s of imports a fresh process pays); the task, to look at after."""
    cfg = load_config(
        DistillConfig, RECIPE,
        [f"run.output_dir={root}", f"run.name={name}", f"data.builtin.dir={root / 'corpus'}",
         f"teacher.path={teacher}", *QUIET, *HERE, *overrides],
    )  # fmt: skip
    tasks: list[DistillTask] = []

    def make_task(cfg, runtime) -> DistillTask:
        tasks.append(DistillTask(cfg, runtime))
        return tasks[-1]

    run_stage(cfg, make_task, prepare=prepare_inputs)  # as finetune.distill.distill does
    return tasks[-1]


def pretrain_here(root: Path, name: str, *overrides: str) -> dict[str, float]:
    """The `pretrain` stage (configs/pretrain/tiny.yaml) in this process, without reader
    processes; its last logged metrics."""
    cfg = load_config(
        PretrainConfig, TINY,
        [f"run.output_dir={root}", f"run.name={name}", f"data.builtin.dir={root / 'corpus'}",
         *QUIET, "data.num_workers=0", *overrides],
    )  # fmt: skip
    return pretrain(cfg)
