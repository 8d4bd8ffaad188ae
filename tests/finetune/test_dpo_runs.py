"""A real `kiln dpo` run on the SFT model of the format task (the session's ``sft_format``: the
chain pretrain -> SFT -> DPO): the first step's loss is ln 2 (policy == reference), bad records
are counted, held-out implicit-reward accuracy reaches 0.8 within 200 steps, the export is a
causal LM with the run's tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from launcher.config import CONFIG_ROOT

from .fixtures import make_reward_model, write_preferences
from .test_reward_runs import QUIET, SEED, kiln, metrics

DPO_TINY = str(CONFIG_ROOT / "finetune" / "dpo-tiny.yaml")
BAD_LINES = ['{"prompt": "x", "chosen": "y"}\n', "not json\n", '{"prompt": "x"']


def dpo(root: Path, name: str, parent: Path, data: Path, *extra: str, nproc: int = 1):
    """`kiln dpo` of ``parent`` on ``data``'s train.jsonl and validation.jsonl; the run's
    losses by step, after checking its world size."""
    kiln(
        root, "dpo", DPO_TINY, "--nproc", str(nproc),
        f"run.output_dir={root}", f"run.name={name}", f"run.seed={SEED}",
        f"init.path={parent}", f"data.train=[{{paths: [{data / 'train.jsonl'}]}}]",
        f"data.validation=[{{paths: [{data / 'validation.jsonl'}]}}]",
        "checkpoint.every=null", *QUIET, *extra,
    )  # fmt: skip
    rows = metrics(root / name)
    assert {m["dist/world_size"] for m in rows if "dist/world_size" in m} == {float(nproc)}
    return {m["step"]: m["train/loss"] for m in rows if "train/loss" in m}


# the learning run, shared: the precomputed-reference run stops early on its schedule, so that
# it is that run's reference too (a launch costs ~20 s)
LEARN = ["train.max_steps=200", "eval.every=200"]


@pytest.fixture(scope="module")
def learned(sft_format, tmp_path_factory) -> Path:
    """200 steps of `kiln dpo` (1 rank, the reference model scoring every batch) on 400
    synthetic chats and 3 bad records (``data/`` next to it); the run directory."""
    root = tmp_path_factory.mktemp("dpo")
    train, _ = write_preferences(root / "data", train=400, validation=100, chat=True)
    with open(train, "a") as f:
        f.writelines(BAD_LINES)
    dpo(root, "dpo", sft_format.hf, root / "data", *LEARN)
    return root / "dpo"


@pytest.mark.slow
def test_dpo_learns_the_synthetic_preferences(learned):
    rows = metrics(learned)
    first = next(m for m in rows if "train/loss" in m)
    assert first["step"] == 1 and abs(first["train/loss"] - math.log(2)) < 1e-6, first
    last = [m for m in rows if "data/skipped_missing_response" in m][-1]
    assert last["data/skipped_missing_response"] == 1 and last["data/skipped_invalid_json"] == 2
    accuracy = [m["eval/accuracy"] for m in rows if "eval/accuracy" in m][-1]
    print(f"held-out implicit-reward accuracy after 200 steps: {accuracy:.4f}")
    assert accuracy >= 0.80  # 0.5: chance (0 at step 0: all ties)
    hf = learned / "hf"
    assert json.loads((hf / "tokenizer_config.json").read_text()).get("chat_template")
    assert AutoModelForCausalLM.from_pretrained(hf).config.architectures == ["LlamaForCausalLM"]


@pytest.mark.slow
@pytest.mark.distributed
def test_precomputed_and_absent_references(sft_format, pretrained, learned):
    """``dpo.reference: precompute`` (the pairs scored once before training, on 2 ZeRO-3 ranks
    each scoring its share) gives the losses of a reference scoring every batch (the learning
    run's first 5 steps); ``none`` (reference-free) trains from a first loss that is not ln 2.
    The precomputed run has a judge too (held-out answers scored by a reward model, KL to the
    parent, at the start and at step 5): it changes no loss, and its KL at the start, the
    parent against itself, is 0."""
    root, data = learned.parent, learned.parent / "data"
    prompts, _ = write_preferences(root / "prompts", train=10, validation=1, chat=True)
    judge = (
        f"judge={{prompts: [{{paths: [{prompts}]}}], examples: 6, max_new_tokens: 6, "
        f"reward_model: {make_reward_model(pretrained, root / 'rm')}}}"
    )
    rows = [m for m in metrics(learned) if "train/loss" in m and m["step"] <= 5]
    model = {m["step"]: m["train/loss"] for m in rows}
    precomputed = dpo(root, "pre", sft_format.hf, data, *LEARN, "dpo.reference=precompute",
                      "dist.zero_stage=3", judge, "eval.at_start=true", "eval.every=5",
                      "checkpoint.best=null", "train.stop_after=6", nproc=2)  # fmt: skip
    # a 6th step: a launch stopped early does not evaluate at its last step
    assert sorted(model) == [1, 2, 3, 4, 5] and sorted(precomputed) == [1, 2, 3, 4, 5, 6]
    for step in model:
        assert precomputed[step] == pytest.approx(model[step], rel=1e-5), step
    judged = {m["step"]: m for m in metrics(root / "pre") if "eval/kl" in m}
    assert sorted(judged) == [0, 5] and judged[0]["eval/kl"] == 0.0, judged
    assert judged[5]["eval/kl"] != 0.0 and judged[0]["eval/reward_std"] > 0
    small = root / "small"
    write_preferences(small, train=48, validation=16)
    free = dpo(root, "free", pretrained, small, "dpo.reference=none", "train.max_steps=5",
               "schedule.warmup_steps=0", "train.micro_batch_size=4",
               "train.global_batch_size=8", "eval.every=5", "checkpoint.best=null")  # fmt: skip
    assert abs(free[1] - math.log(2)) > 1e-3 and free[5] < free[1]
