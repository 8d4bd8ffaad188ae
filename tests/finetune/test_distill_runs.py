"""Real `kiln distill` runs from a tiny decoder pretrained in the module (the teacher) into a
2-layer x 64 student (`configs/finetune/distill-tiny.yaml`): it beats the same student trained
without a teacher on validation bits per byte, resumes exactly, never changes the teacher,
refuses a resume against a changed one, and exports through `kiln export` what the run
exported. One process per run, so the module runs beside others in the parallel pass; ZeRO-3
on 2 ranks is `test_distill_zero3.py`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.distill import DistillTask, export_checkpoint
from finetune.distill_config import DistillConfig
from launcher.config import CONFIG_ROOT, load_config
from launcher.runner import run_stage
from pretrain.prepare import prepare_inputs

from ..launcher.runs import QUIET, env, losses, metrics, run

pytestmark = pytest.mark.slow
TEACHER_STEPS = 1000
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


def distill_here(root: Path, name: str, teacher: Path, *overrides: str) -> list[DistillTask]:
    """A run like ``distill(...)`` on one process, in this process (no launcher start-up, and
    the task at hand afterwards), without reader processes: forked from a pytest-xdist worker
    they are what once crashed under the parallel pass. Hence another data order, and another
    thread count than a launched process's: only for runs compared with each other or by
    inequalities, never bitwise with ``distill(...)``'s."""
    cfg = load_config(
        DistillConfig, RECIPE,
        [f"run.output_dir={root}", f"run.name={name}", f"data.builtin.dir={root / 'corpus'}",
         f"teacher.path={teacher}", *QUIET, *SAME, "data.num_workers=0", *overrides],
    )  # fmt: skip
    tasks: list[DistillTask] = []

    def make_task(cfg, runtime) -> DistillTask:
        tasks.append(DistillTask(cfg, runtime))
        return tasks[-1]

    run_stage(cfg, make_task, prepare=prepare_inputs)
    return tasks


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def teacher(root) -> Path:
    """The tiny decoder pretrained for 1000 steps on the module's corpus (1 process): a teacher
    better than the student can become alone in 200 steps (the session's 40-step parent is
    not: 2.33 bits per byte, near the unigram 2.41, against 1.72 for the student alone), and
    near the end of what its size learns here (0.68 bits per byte at 600 steps, 0.59 at 1000),
    so that 100 steps of recovery after pruning are recovery, not more training: distilled
    minus plain after the FFN recovery below, 1000-step teacher -0.0037 bits per byte,
    600-step teacher -0.0012 (a margin too thin to keep for 45 s)."""
    started = time.monotonic()
    # ZeRO-0: one process has nothing to shard, and ZeRO-2's bucketing costs time per step
    # (60 tiny steps alone on the machine: 0.18 s forward+backward and 0.010 s optimizer under
    # ZeRO-2, 0.17 s and 0.005 s under ZeRO-0); micro batch 8, no accumulation: 109 s, not 122
    run(root, "teacher", f"train.max_steps={TEACHER_STEPS}", "train.micro_batch_size=8",
        "checkpoint.every=null", "eval.every=null", "dist.zero_stage=0", nproc=1)  # fmt: skip
    print(f"{TEACHER_STEPS}-step teacher: {time.monotonic() - started:.0f} s")
    return root / "teacher" / "hf"


@pytest.fixture(scope="module")
def teacher_before(teacher) -> dict[str, torch.Tensor]:
    return weights(teacher)


@pytest.fixture(scope="module")
def distilled(root, teacher, teacher_before) -> dict[str, float]:
    """200 steps of distillation, ZeRO-0 on 1 process; its metrics' last evaluation."""
    started = time.monotonic()
    distill(root, "distilled", teacher, "checkpoint.keep_last=2")  # step 100 for the resume
    print(f"200 distillation steps: {time.monotonic() - started:.0f} s")
    return [m for m in metrics(root, "distilled") if "eval/bits_per_byte" in m][-1]


def test_distillation_beats_the_same_student_trained_without_a_teacher(root, teacher, distilled):
    run(root, "plain", f"tokenizer.path={teacher}", *STUDENT, *SAME, nproc=1)
    [plain] = [m for m in metrics(root, "plain") if "eval/bits_per_byte" in m][-1:]
    ours, theirs = distilled["eval/bits_per_byte"], plain["eval/bits_per_byte"]
    print(f"validation bits per byte after 200 steps: distilled {ours:.4f}, plain {theirs:.4f}")
    assert distilled["step"] == plain["step"] == 200
    assert ours <= 0.99 * theirs


def test_a_resume_from_step_100_gives_the_uninterrupted_losses(root, teacher, distilled):
    # from the run's own step-100 checkpoint (what a stop at 100 saves: the same save), so
    # only the second half trains again
    step100 = root / "distilled" / "checkpoints" / "step-00000100"
    distill(root, "half", teacher, f"checkpoint.resume={step100}")
    resumed, full = losses(root, "half"), losses(root, "distilled")
    assert sorted(resumed) == list(range(101, 201)) and sorted(full) == list(range(1, 201))
    assert max(abs(resumed[s] - full[s]) for s in resumed) == 0.0


def test_a_resume_against_a_changed_teacher_is_refused_naming_it(root, teacher, distilled):
    changed = root / "changed-teacher"
    shutil.copytree(teacher, changed)
    tensors = load_file(str(changed / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    done = distill(root, "distilled", changed, check=False)  # resumes its step-200 checkpoint
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "teacher.path" in output and str(changed) in output, output[-3000:]


def test_distillation_recovers_an_ffn_pruned_model_better_than_plain_training(root, teacher):
    """`kiln compress` removes 25% of the teacher's MLP channels (activation ranking); then
    100 steps from that export, distilled from the unpruned teacher against plain next-token
    training (``distill.alpha=0``: the same loop, start, data order and learning rate, no
    teacher term). Distillation recovers more: its bits per byte minus the original's is the
    lower (both runs may end below the original: a few more steps at a low learning rate
    still teach even a 1000-step model something)."""
    from transformers import AutoModelForCausalLM

    command = [sys.executable, "-m", "launcher", "compress",
               str(CONFIG_ROOT / "compress" / "tiny.yaml"), f"run.output_dir={root}",
               f"init.path={teacher}", f"data.builtin.dir={root / 'corpus'}", "variants=[ffn]",
               "run.name=ffn"]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = json.loads((root / "ffn" / "compress.json").read_text())["models"]
    pruned = root / "ffn" / "variants" / "ffn"
    width = json.loads((teacher / "config.json").read_text())["intermediate_size"]
    smaller = AutoModelForCausalLM.from_pretrained(pruned)
    assert smaller.config.intermediate_size == round(0.75 * width)
    recover = [f"init.path={pruned}", "train.max_steps=100", "eval.every=100",
               "checkpoint.every=null", "optim.lr=5e-4"]  # fmt: skip
    distill_here(root, "ffn-distilled", teacher, *recover)
    distill_here(root, "ffn-plain", teacher, *recover, "distill.alpha=0")
    original, start = table["original"]["bits_per_byte"], table["ffn"]["bits_per_byte"]
    ours, plain = (
        [m for m in metrics(root, name) if "eval/bits_per_byte" in m][-1]["eval/bits_per_byte"]
        for name in ("ffn-distilled", "ffn-plain")
    )
    print(f"bits per byte: original {original:.4f}, 25% of FFN channels pruned {start:.4f}; "
          f"after 100 steps distilled {ours:.4f}, plain {plain:.4f}")  # fmt: skip
    assert ours - original < plain - original
    assert ours < start  # it did recover


def test_the_teacher_is_never_changed_and_kiln_export_is_the_runs_export(
    root, teacher, teacher_before, distilled, tmp_path
):
    """In this process: a short run whose in-memory teacher is compared after training; the
    teacher's files after every run of this module; `kiln export` of a checkpoint."""
    tasks = distill_here(root, "inproc", teacher, "train.max_steps=20", "checkpoint.every=null")
    trained = tasks[0].teacher.state_dict()
    for key, value in teacher_before.items():
        assert torch.equal(trained[key], value), key
    assert not any(p.requires_grad for p in tasks[0].teacher.parameters())
    after = weights(teacher)
    assert after.keys() == teacher_before.keys()
    assert all(torch.equal(after[k], teacher_before[k]) for k in after)
    [last] = sorted((root / "distilled" / "checkpoints").glob("step-*"))[-1:]
    out = export_checkpoint(last, tmp_path / "hf", dtype=torch.float32)
    ours, theirs = weights(out), weights(root / "distilled" / "hf")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "tokenizer.json").read_text() == (teacher / "tokenizer.json").read_text()
