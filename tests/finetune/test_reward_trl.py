"""Anchor: TRL's RewardTrainer (collator + compute_loss) on the same token ids gives kiln's
loss (fp32 settings of /work/shared/NOTES.md "TRL as a numerical anchor")."""

from __future__ import annotations

import copy

import pytest
import torch

from finetune.reward_model import load_reward_model, pair_losses, rewards
from launcher.data.batches import pad_examples
from launcher.data.tokenizer import TextTokenizer

from .classify_fixtures import tiny_parent
from .test_reward_units import PAIRS

__all__ = ["tiny_parent"]  # fixture


@pytest.mark.slow
def test_trl_reward_trainer_gives_kilns_loss(tiny_parent, tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = TextTokenizer.load(tiny_parent)
    model, _ = load_reward_model(tiny_parent, tok.pad_id, seed=11)
    model.eval()
    batch = pad_examples(PAIRS, tok.pad_id)
    with torch.no_grad():
        rc, rr = rewards(model, batch, tok.pad_id)
        ours = float(pair_losses(rc, rr, batch["margin"], 0.01).sum()) / len(PAIRS)
    rows = [
        {
            "chosen_ids": p.tokens.tolist(),
            "rejected_ids": p.extras["rejected"].tokens.tolist(),
            "margin": p.extras["margin"],
        }
        for p in PAIRS
    ]
    args = RewardConfig(
        output_dir=str(tmp_path), center_rewards_coefficient=0.01, bf16=False, use_cpu=True,
        gradient_checkpointing=False, report_to="none", per_device_train_batch_size=len(PAIRS),
    )  # fmt: skip
    trainer = RewardTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_parent),
    )
    trl_batch = next(iter(trainer.get_train_dataloader()))
    assert trl_batch["input_ids"].shape[0] == 2 * len(PAIRS)
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, dict(trl_batch)))
    assert abs(ours - theirs) < 1e-5, (ours, theirs)
