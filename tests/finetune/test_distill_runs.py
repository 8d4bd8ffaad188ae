"""Real `kiln distill` runs from a tiny decoder pretrained in the test session (the teacher,
`distill_fixtures.shared_teacher`) into a 2-layer x 64 student
(`configs/finetune/distill-tiny.yaml`): it beats the same student trained without a teacher on
validation bits per byte, stops and resumes exactly, never changes the teacher, refuses a
resume against a changed one, is measured beside its teacher by `kiln compress`, and
`kiln export` of its checkpoint is what the run exported. Every run is the stage's own entry
point in this process (a launch adds ~8 s of imports per run), so the module runs in the
parallel pass; the launched stage, ZeRO-3 on 2 ranks, is `test_distill_zero3.py`, and the
recovery of an FFN-pruned teacher `test_distill_recovery.py` (the other worker, same teacher).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.compress import compress
from finetune.compress_config import CompressConfig
from finetune.distill import export_checkpoint
from launcher.checkpoint import CheckpointError
from launcher.config import CONFIG_ROOT, load_config

from ..launcher.runs import losses, metrics
from .distill_fixtures import HERE, STUDENT, distill_here, pretrain_here

pytestmark = [pytest.mark.slow, pytest.mark.long_chain]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def teacher(distill_teacher) -> Path:
    return distill_teacher


@pytest.fixture(scope="module")
def root(teacher) -> Path:
    """Where the teacher's run and corpus are; this module's runs go beside them."""
    return teacher.parents[1]


@pytest.fixture(scope="module")
def teacher_before(teacher) -> dict[str, torch.Tensor]:
    return weights(teacher)


@pytest.fixture(scope="module")
def distilled(root, teacher, teacher_before) -> dict[str, float]:
    """200 steps of distillation, ZeRO-0 on 1 process; its metrics' last evaluation."""
    started = time.monotonic()
    distill_here(root, "distilled", teacher)
    print(f"200 distillation steps: {time.monotonic() - started:.0f} s")
    return [m for m in metrics(root, "distilled") if "eval/bits_per_byte" in m][-1]


def test_distillation_beats_the_same_student_trained_without_a_teacher(root, teacher, distilled):
    pretrain_here(root, "plain", f"tokenizer.path={teacher}", *STUDENT, *HERE)
    [plain] = [m for m in metrics(root, "plain") if "eval/bits_per_byte" in m][-1:]
    ours, theirs = distilled["eval/bits_per_byte"], plain["eval/bits_per_byte"]
    print(f"validation bits per byte after 200 steps: distilled {ours:.4f}, plain {theirs:.4f}")
    assert distilled["step"] == plain["step"] == 200
    assert ours <= 0.99 * theirs


def test_a_stop_after_100_steps_then_a_resume_gives_the_uninterrupted_losses(
    root, teacher, distilled
):
    """``train.stop_after=100`` saves step 100 and marks the run preempted, without an
    export; running it again resumes there (``checkpoint.resume: auto``) and ends where the
    uninterrupted run ended, loss for loss."""
    distill_here(root, "half", teacher, "train.stop_after=100")
    assert [p.name for p in (root / "half" / "checkpoints").glob("step-*")] == ["step-00000100"]
    assert not (root / "half" / "hf").exists()
    assert sorted(losses(root, "half")) == list(range(1, 101))
    distill_here(root, "half", teacher)
    resumed, full = losses(root, "half"), losses(root, "distilled")
    assert sorted(resumed) == sorted(full) == list(range(1, 201))
    assert max(abs(resumed[s] - full[s]) for s in resumed) == 0.0
    assert (root / "half" / "hf" / "model.safetensors").is_file()


def test_a_resume_against_a_changed_teacher_is_refused_naming_it(root, teacher, distilled):
    changed = root / "changed-teacher"
    shutil.copytree(teacher, changed)
    tensors = load_file(str(changed / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as refused:  # it resumes its step-200 checkpoint
        distill_here(root, "distilled", changed)
    assert "teacher.path" in str(refused.value) and str(changed) in str(refused.value)


def test_the_compress_table_measures_the_distilled_student_beside_its_teacher(
    root, teacher, distilled
):
    """`kiln compress` (the stage's entry point in this process; each model measured in a
    fresh process) with the teacher as the original and the distilled student as a
    ``compare`` row: both scored on the held-out documents the runs evaluate on."""
    cfg = load_config(
        CompressConfig, CONFIG_ROOT / "compress" / "tiny.yaml",
        [f"run.output_dir={root}", "run.name=table", f"init.path={teacher}",
         f"data.builtin.dir={root / 'corpus'}", "variants=[]",
         f"compare.distilled={root / 'distilled' / 'hf'}"],
    )  # fmt: skip
    table = compress(cfg)["models"]
    assert list(table) == ["original", "distilled"]
    assert "| distilled |" in (root / "table" / "compress.md").read_text()
    taught = [m for m in metrics(root, "teacher") if "eval/bits_per_byte" in m][-1]
    for label, run in (("original", taught), ("distilled", distilled)):
        assert table[label]["bits_per_byte"] == pytest.approx(run["eval/bits_per_byte"], abs=1e-4)
    assert table["distilled"]["parameters"] < table["original"]["parameters"] / 2
    assert {r["class"] for r in table.values()} == {"LlamaForCausalLM"}


def test_the_teacher_is_never_changed_and_kiln_export_is_the_runs_export(
    root, teacher, teacher_before, distilled, tmp_path
):
    """In this process: a short run whose in-memory teacher is compared after training; the
    teacher's files after every run of this module; `kiln export` of a checkpoint."""
    task = distill_here(root, "inproc", teacher, "train.max_steps=20", "checkpoint.every=null")
    trained = task.teacher.state_dict()
    for key, value in teacher_before.items():
        assert torch.equal(trained[key], value), key
    assert not any(p.requires_grad for p in task.teacher.parameters())
    after = weights(teacher)
    assert after.keys() == teacher_before.keys()
    assert all(torch.equal(after[k], teacher_before[k]) for k in after)
    [last] = sorted((root / "distilled" / "checkpoints").glob("step-*"))[-1:]
    out = export_checkpoint(last, tmp_path / "hf", dtype=torch.float32)
    ours, theirs = weights(out), weights(root / "distilled" / "hf")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "tokenizer.json").read_text() == (teacher / "tokenizer.json").read_text()
