"""A real `kiln dpo` run on the SFT model of the format task (the session's ``sft_format``: the
chain pretrain -> SFT -> DPO): the first step's loss is ln 2 (policy == reference), bad records
are counted, held-out implicit-reward accuracy reaches 0.8 within 200 steps, the export is a
causal LM with the run's tokenizer."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM

from launcher.config import CONFIG_ROOT

from .fixtures import write_preferences
from .test_reward_runs import QUIET, SEED, kiln, metrics

DPO_TINY = str(CONFIG_ROOT / "finetune" / "dpo-tiny.yaml")
BAD_LINES = ['{"prompt": "x", "chosen": "y"}\n', "not json\n", '{"prompt": "x"']


@pytest.mark.slow
def test_dpo_learns_the_synthetic_preferences(sft_format, tmp_path):
    data = tmp_path / "data"
    train, validation = write_preferences(data, train=400, validation=100, chat=True)
    with open(train, "a") as f:
        f.writelines(BAD_LINES)
    done = kiln(
        tmp_path, "dpo", DPO_TINY, "--nproc", "1",
        f"run.output_dir={tmp_path}", "run.name=dpo", f"run.seed={SEED}",
        f"init.path={sft_format.hf}", f"data.train=[{{paths: [{train}]}}]",
        f"data.validation=[{{paths: [{validation}]}}]",
        "train.max_steps=200", "eval.every=200", "checkpoint.every=null", *QUIET,
    )  # fmt: skip
    rows = metrics(tmp_path / "dpo")
    first = next(m for m in rows if "train/loss" in m)
    assert first["step"] == 1 and abs(first["train/loss"] - math.log(2)) < 1e-6, first
    last = [m for m in rows if "data/skipped_missing_response" in m][-1]
    assert last["data/skipped_missing_response"] == 1 and last["data/skipped_invalid_json"] == 2
    accuracy = [m["eval/accuracy"] for m in rows if "eval/accuracy" in m][-1]
    print(f"held-out implicit-reward accuracy after 200 steps: {accuracy:.4f}")
    assert accuracy >= 0.80, done.stdout[-2000:]  # 0.5: chance (0 at step 0: all ties)
    hf = tmp_path / "dpo" / "hf"
    assert json.loads((hf / "tokenizer_config.json").read_text()).get("chat_template")
    assert AutoModelForCausalLM.from_pretrained(hf).config.architectures == ["LlamaForCausalLM"]
