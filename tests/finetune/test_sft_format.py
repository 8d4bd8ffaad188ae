"""The SFT stage learns a task, and its generations stop: the synthetic format task (answer
copied from a named field, `finetune/format_task.py`) scored on 50 held-out chats through the
exported HF directory (its tokenizer's chat template, greedy, at most 32 new tokens), before
and after `kiln sft` with `configs/finetune/sft-tiny.yaml`'s settings (the session's
``sft_format`` run, which DPO's tests start from); and a parent whose tokenizer pads with EOS
(the "never stops" trap of brought tokenizers) learns to end its turns."""

from __future__ import annotations

import pytest

from finetune.format_task import score

from .sft_fixtures import run_sft, write_format_task
from .test_reward_runs import metrics


@pytest.mark.slow
@pytest.mark.serial  # a wall-clock limit
def test_format_task_is_learned_within_two_minutes(pretrained, sft_format):
    before = score(pretrained, sft_format.validation)
    after = score(sft_format.hf, sft_format.validation)
    print(f"format task: before {before}, after {after}; kiln sft took {sft_format.seconds:.0f} s")
    assert before["exact_match"] < 0.10
    assert after["exact_match"] >= 0.50
    assert after["stopped"] >= 0.90
    assert sft_format.seconds < 180  # 2 minutes of training, plus start-up and export
    # the run's own exact match (eval.at_start: the parent's first) is the exported model's
    logged = [
        m["eval/exact_match"] for m in metrics(sft_format.hf.parent) if "eval/exact_match" in m
    ]
    assert logged == [before["exact_match"], after["exact_match"]]


@pytest.mark.slow
def test_a_parent_padding_with_eos_learns_to_stop(neo_pretrained, tmp_path):
    """GPT-Neo's tokenizer with pad = EOS: a trainer that derived labels from pad ids would
    never train the end of turn, and the model would never stop."""
    train, validation = write_format_task(tmp_path / "data")  # the format run's data, not its run
    # 10 chats: the parent never stops (0 of 50 measured), so each costs all 32 new tokens
    before = score(neo_pretrained, validation, n=10)
    # 20 steps: all 50 chats stopped after 10 and after 20 of 40 steps (measured)
    run_sft(tmp_path, "neo-sft", neo_pretrained, train, "data.validation=null",
            "checkpoint.every=null", "train.epochs=null", "train.max_steps=20")  # fmt: skip
    after = score(tmp_path / "neo-sft" / "hf", validation)
    print(f"pad == EOS: before {before}, after {after}")
    assert before["stopped"] < 0.5
    assert after["stopped"] >= 0.90
