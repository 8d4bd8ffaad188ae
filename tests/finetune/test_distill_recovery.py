"""Recovery after structured pruning, as Minitron: the compress stage removes 25% of the
session's distillation teacher's MLP channels, then the `distill` stage trains the pruned
export with the unpruned teacher, against plain next-token training from the same start.

Scheduled last in the parallel pass (`late`): by then the other worker has trained the
teacher (`distill_fixtures.shared_teacher`) for `test_distill_runs.py`, and this module, on
whichever worker is free, uses it without waiting."""

from __future__ import annotations

import pytest

from finetune.compress import Compressor, load
from finetune.compress_config import CompressConfig
from finetune.compress_measure import bits_per_byte
from launcher.config import CONFIG_ROOT, load_config

from ..launcher.runs import metrics
from .distill_fixtures import distill_here

pytestmark = [pytest.mark.slow, pytest.mark.late]


def test_distillation_recovers_an_ffn_pruned_model_better_than_plain_training(distill_teacher):
    """The compress stage's `ffn` variant of the teacher (25% of its MLP channels removed,
    ranked by activation; made and scored as `kiln compress` makes and scores it, in this
    process); then 100 steps from that export, distilled from the unpruned teacher against
    plain next-token training (``distill.alpha=0``: the same loop, start, data order and
    learning rate, no teacher term). Distillation recovers more: its bits per byte minus the
    original's is the lower (both runs may end below the original: a few more steps at a low
    learning rate still teach even an 800-step model something). Settings tried on the
    800-step teacher: alpha 1 (distillation alone) +0.0040, worse than plain, which still
    learns from the data what the teacher never did; T = 2, -0.0024; the recipe's alpha 0.5
    at T = 1, -0.0037, kept."""
    teacher = distill_teacher
    root = teacher.parents[1]  # the teacher's corpus is there; the runs go beside it
    cfg = load_config(
        CompressConfig, CONFIG_ROOT / "compress" / "tiny.yaml",
        [f"run.output_dir={root}", "run.name=ffn", f"init.path={teacher}",
         f"data.builtin.dir={root / 'corpus'}", "variants=[ffn]"],
    )  # fmt: skip
    job = Compressor(cfg)
    pruned = root / "ffn" / "variants" / "ffn"
    job.make("ffn", pruned)
    scored = job.inputs()
    unpruned, smaller = load(teacher), load(pruned)  # AutoModelForCausalLM, fp32
    assert smaller.config.intermediate_size == 0.75 * unpruned.config.intermediate_size
    original, start = (
        bits_per_byte(model, scored["batches"], scored["text_bytes"])
        for model in (unpruned, smaller)
    )
    recover = [f"init.path={pruned}", "train.max_steps=100", "eval.every=100",
               "checkpoint.every=null", "optim.lr=5e-4"]  # fmt: skip
    distill_here(root, "ffn-distilled", teacher, *recover)
    distill_here(root, "ffn-plain", teacher, *recover, "distill.alpha=0")
    ours, plain = (
        [m for m in metrics(root, name) if "eval/bits_per_byte" in m][-1]["eval/bits_per_byte"]
        for name in ("ffn-distilled", "ffn-plain")
    )
    print(f"bits per byte: original {original:.4f}, 25% of FFN channels pruned {start:.4f}; "
          f"after 100 steps distilled {ours:.4f}, plain {plain:.4f}")  # fmt: skip
    assert ours - original < plain - original
    assert ours < start  # it did recover
