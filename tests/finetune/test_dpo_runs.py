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

from .fixtures import make_reward_model, write_preferences
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


@pytest.mark.slow
@pytest.mark.distributed
def test_precomputed_and_absent_references(pretrained, tmp_path):
    """``dpo.reference: precompute`` (the pairs scored once before training, on 2 ZeRO-3 ranks
    each scoring its share) gives the losses of a reference scoring every batch; ``none``
    (reference-free) trains from a first loss that is not ln 2. The precomputed run has a
    judge too (held-out answers scored by a reward model, KL to the parent, at the start and
    the end): it changes no loss, and its KL at the start, the parent against itself, is 0."""
    train, validation = write_preferences(tmp_path / "data", train=48, validation=16)
    prompts, _ = write_preferences(tmp_path / "prompts", train=10, validation=1, chat=True)
    judge = (
        f"judge={{prompts: [{{paths: [{prompts}]}}], examples: 6, max_new_tokens: 6, "
        f"reward_model: {make_reward_model(pretrained, tmp_path / 'rm')}}}"
    )

    def run(name: str, *extra: str, nproc: int = 1) -> dict[int, float]:
        kiln(
            tmp_path, "dpo", DPO_TINY, "--nproc", str(nproc),
            f"run.output_dir={tmp_path}", f"run.name={name}", f"run.seed={SEED}",
            f"init.path={pretrained}", f"data.train=[{{paths: [{train}]}}]",
            f"data.validation=[{{paths: [{validation}]}}]", "train.max_steps=5",
            "schedule.warmup_steps=0", "train.micro_batch_size=4", "train.global_batch_size=8",
            "eval.every=5", "checkpoint.every=null", "checkpoint.best=null", *QUIET, *extra,
        )  # fmt: skip
        rows = metrics(tmp_path / name)
        assert {m["dist/world_size"] for m in rows if "dist/world_size" in m} == {float(nproc)}
        return {m["step"]: m["train/loss"] for m in rows if "train/loss" in m}

    model = run("model")
    precomputed = run("pre", "dpo.reference=precompute", "dist.zero_stage=3", judge,
                      "eval.at_start=true", nproc=2)  # fmt: skip
    assert sorted(model) == sorted(precomputed) == [1, 2, 3, 4, 5]
    for step in model:
        assert precomputed[step] == pytest.approx(model[step], rel=1e-5), step
    judged = {m["step"]: m for m in metrics(tmp_path / "pre") if "eval/kl" in m}
    assert sorted(judged) == [0, 5] and judged[0]["eval/kl"] == 0.0, judged
    assert judged[5]["eval/kl"] != 0.0 and judged[0]["eval/reward_std"] > 0
    free = run("free", "dpo.reference=none")
    assert abs(free[1] - math.log(2)) > 1e-3 and free[5] < free[1]
