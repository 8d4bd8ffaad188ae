"""The shared parent loads as a plain HF model and tokenizer, offline."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import PRETRAIN_STEPS


def test_the_pretrained_parent_loads_offline_and_has_learned(pretrained):
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    lineage = json.loads((pretrained / "kiln.json").read_text())
    assert lineage["stage"] == "pretrain" and lineage["step"] == PRETRAIN_STEPS
    ids = torch.tensor([tokenizer("The river runs past the old mill.")["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 0.8 * torch.log(torch.tensor(float(model.config.vocab_size))).item()
