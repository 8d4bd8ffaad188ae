"""The SFT loss: packed = padded, any micro-batch split = one batch, and TRL's number."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.data import SFTEncoder
from finetune.sft import token_nll
from launcher.data.batches import pack_examples, pad_examples
from launcher.data.records import Record
from launcher.data.tokenizer import TextTokenizer
from launcher.forward import forward_logits

from .sft_fixtures import sft_config, trainer_for, varied_chats, write_jsonl


@pytest.fixture
def parent(pretrained):
    """The pretrained tiny model every SFT test starts from (tests/finetune/conftest.py)."""
    return pretrained


def encoded(parent, records: list[dict]):
    encoder = SFTEncoder(TextTokenizer.load(parent), 512)
    return [encoder(Record(data=r, id=str(i), file="f", line=i)) for i, r in enumerate(records)]


def test_packed_and_padded_batches_give_the_same_loss_and_logits(parent):
    tok = TextTokenizer.load(parent)
    examples = encoded(parent, varied_chats(6))
    assert len({len(e) for e in examples}) == 6  # all lengths differ
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    padded = pad_examples(examples, tok.pad_id)
    rows = [[0, 1, 2], [3, 4, 5]]
    placed = [[examples[i] for i in row] for row in rows]
    packed = pack_examples(placed, max(sum(map(len, r)) for r in placed) + 5, tok.pad_id)
    with torch.no_grad():
        loss_padded = token_nll(model, padded, "sum") / (padded["targets"] != -100).sum()
        loss_packed = token_nll(model, packed, "sum") / (packed["targets"] != -100).sum()
        logits_padded = forward_logits(model, padded)
        logits_packed = forward_logits(model, packed)
    assert abs(loss_packed.item() - loss_padded.item()) < 1e-5
    worst = 0.0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(examples[i])
            diff = (logits_packed[r, at : at + n] - logits_padded[i, :n]).abs().max().item()
            worst, at = max(worst, diff), at + n
    assert worst < 1e-5
    # the guard: without the block-diagonal mask the second example of a row sees the first
    leaky = {k: v for k, v in packed.items() if k != "segment_ids"}
    with torch.no_grad():
        ids, positions = leaky["input_ids"], leaky["position_ids"]
        logits_leaky = model(input_ids=ids, position_ids=positions).logits
    n0 = len(examples[0])
    assert (logits_leaky[0, n0 : n0 + 5] - logits_packed[0, n0 : n0 + 5]).abs().max() > 1e-3


def one_step(tmp_path, parent, data, name: str, micro: int) -> tuple[float, list[torch.Tensor]]:
    cfg = sft_config(
        tmp_path, name, parent, data, f"train.micro_batch_size={micro}", "train.epochs=null",
        "train.max_steps=1", "dist.zero_stage=0", "checkpoint.every=null",
        "checkpoint.resume=none", "schedule.warmup_steps=0", "schedule.kind=constant",
    )  # fmt: skip
    with trainer_for(cfg) as trainer:
        loss = trainer.fit()["train/loss"]
        params = [p.detach().clone() for p in trainer.engine.module.parameters()]
    return loss, params


@pytest.mark.slow
def test_micro_2_by_accumulation_4_equals_micro_8_by_1(parent, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", varied_chats(16))
    loss_a, params_a = one_step(tmp_path, parent, data, "accum4", micro=2)
    loss_b, params_b = one_step(tmp_path, parent, data, "accum1", micro=8)
    assert abs(loss_a - loss_b) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(params_a, params_b, strict=True)) < 1e-5
    before = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    moved = max(
        (a - b).abs().max().item() for a, b in zip(params_a, before.parameters(), strict=True)
    )
    assert moved > 1e-4  # a step was taken


PAIRS = [
    {"prompt": "Q: where does the river run?\n", "completion": "past the old mill"},
    {"prompt": "Q: who counts sacks?\n", "completion": "the miller, every evening of the week"},
    {"prompt": "Q: what is in the sacks?\n", "completion": "grain"},
    {"prompt": "Q: is the mill old?\nA:", "completion": " yes"},
]


@pytest.mark.slow
def test_first_step_loss_equals_trl_sft_trainer_completion_only(parent, tmp_path, monkeypatch):
    """The anchor: TRL 1.16 SFTTrainer (completion_only_loss, no packing, fp32) on the same
    token ids and weights gives kiln's first-step loss."""
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = sft_config(
        tmp_path, "kiln", parent, data, "train.micro_batch_size=2", "train.global_batch_size=4",
        "dist.zero_stage=0", "checkpoint.every=null", "checkpoint.resume=none",
        "data.shuffle=false", "schedule.warmup_steps=0", "train.epochs=null", "train.max_steps=1",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    # the kiln run above left no ACCELERATE_* variable behind (Runtime.close restores them)
    assert not [k for k in os.environ if k.startswith("ACCELERATE_USE")]
    args = TRLConfig(
        output_dir=str(tmp_path / "trl"), completion_only_loss=True, packing=False, bf16=False,
        use_cpu=True, gradient_checkpointing=False, report_to="none",
        per_device_train_batch_size=len(PAIRS), max_length=128,
    )  # fmt: skip
    trl = SFTTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(parent),
    )
    batch = next(iter(trl.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trl.compute_loss(trl.model, dict(batch)).item()
    AcceleratorState._reset_state(reset_partial_state=True)  # TRL's Accelerator is a singleton
    with trainer_for(cfg) as trainer:
        ours = [e.tokens.tolist() for e in trainer.task.train_set.examples]
        kiln_loss = trainer.fit()["train/loss"]
    rows = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    theirs = [row[mask.bool()].tolist() for row, mask in rows]
    assert sorted(theirs) == sorted(ours)  # identical token ids, first
    assert abs(kiln_loss - trl_loss) < 1e-5, (kiln_loss, trl_loss)
