"""The SFT stage learns a task, and its generations stop: the synthetic format task (answer
copied from a named field, `finetune/format_task.py`) scored on 50 held-out chats through the
exported HF directory (its tokenizer's chat template, greedy, at most 32 new tokens), before
and after `kiln sft` with `configs/finetune/sft-tiny.yaml`'s settings; and a parent whose
tokenizer pads with EOS (the "never stops" trap of brought tokenizers) learns to end turns."""

from __future__ import annotations

import time

import pytest

from finetune.format_task import score

from .sft_fixtures import run_sft, write_format_task

NO_VALIDATION = ["data.validation=null", "checkpoint.every=null"]


@pytest.fixture(scope="module")
def format_data(tmp_path_factory):
    return write_format_task(tmp_path_factory.mktemp("format"))  # 2000 train, 50 held out


@pytest.mark.slow
def test_format_task_is_learned_within_two_minutes(pretrained, format_data, tmp_path):
    train, validation = format_data
    before = score(pretrained, validation)
    started = time.time()
    run_sft(tmp_path, "format", pretrained, train, *NO_VALIDATION)  # the config's 4 epochs
    seconds = time.time() - started
    after = score(tmp_path / "format" / "hf", validation)
    print(f"format task: before {before}, after {after}; kiln sft took {seconds:.0f} s")
    assert before["exact_match"] < 0.10
    assert after["exact_match"] >= 0.50
    assert after["stopped"] >= 0.90
    assert seconds < 180  # 2 minutes of training, plus start-up and export


@pytest.mark.slow
def test_a_parent_padding_with_eos_learns_to_stop(neo_pretrained, format_data, tmp_path):
    """GPT-Neo's tokenizer with pad = EOS: a trainer that derived labels from pad ids would
    never train the end of turn, and the model would never stop."""
    train, validation = format_data
    before = score(neo_pretrained, validation)
    run_sft(tmp_path, "neo-sft", neo_pretrained, train, *NO_VALIDATION,
            "train.epochs=null", "train.max_steps=40")  # fmt: skip
    after = score(tmp_path / "neo-sft" / "hf", validation)
    print(f"pad == EOS: before {before}, after {after}")
    assert before["stopped"] < 0.5
    assert after["stopped"] >= 0.90
