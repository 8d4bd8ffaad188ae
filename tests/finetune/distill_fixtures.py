"""Runs of `kiln distill` (configs/finetune/distill-tiny.yaml) for the distillation tests: a
launched one (`python -m launcher distill ... --nproc N`, what users run, for the ZeRO-3 check),
in-process ones (the stages' own entry points, for the learning checks), and the teacher they
distil from, trained once per `make test` (``tests/shared_dirs.py``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from finetune.distill import DistillTask
from finetune.distill_config import DistillConfig
from launcher.config import CONFIG_ROOT, load_config
from launcher.runner import run_stage
from pretrain.config import PretrainConfig
from pretrain.prepare import prepare_inputs
from pretrain.train import pretrain

from ..launcher.runs import QUIET, TINY, env
from ..shared_dirs import built_once

RECIPE = str(CONFIG_ROOT / "finetune" / "distill-tiny.yaml")
TEACHER_STEPS = 800
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


def shared_teacher(tmp_path_factory) -> Path:
    """``<root>/teacher/hf``: the tiny decoder pretrained for 800 steps on ``<root>/corpus``,
    trained once (``tests/shared_dirs.py``): under pytest-xdist the worker that gets here first
    trains it and the other waits for it, so the two modules that distil from it can run on
    both workers.

    Why 800 steps: a teacher better than the student can become alone in 200 steps (the
    session's 40-step parent is not: 2.33 bits per byte, near the unigram 2.41, against
    1.72-1.86 for the student alone, by data order), and near enough to the end of what its
    size learns here (0.68 bits per byte at 600 steps, 0.63 at 800, 0.59 at 1000) that 100
    steps of recovery after pruning are recovery, not more training: distilled minus plain
    after the FFN recovery (test_distill_recovery.py), -0.0012 bits per byte from a 600-step
    teacher (-0.0001 at learning rate 2e-4, -0.0013 at 1e-3), -0.0037 from an 800- or a
    1000-step one (800: 30 s less on one thread)."""

    def build(root: Path) -> None:
        started = time.monotonic()
        # ZeRO-0: one process has nothing to shard, and ZeRO-2's bucketing costs time per
        # step (0.17 s and 0.005 s optimizer under ZeRO-0, 0.18 s and 0.010 s under
        # ZeRO-2); micro batch 8, no accumulation (1000 steps: 109 s, not 122); a batch
        # of 16 for 500 steps is no faster and teaches less (0.60)
        pretrain_here(root, "teacher", f"train.max_steps={TEACHER_STEPS}",
                      "train.micro_batch_size=8", "checkpoint.every=null",
                      "eval.every=null", "dist.zero_stage=0")  # fmt: skip
        print(f"{TEACHER_STEPS}-step teacher: {time.monotonic() - started:.0f} s")

    return built_once(tmp_path_factory, "distill-teacher", build) / "teacher" / "hf"
