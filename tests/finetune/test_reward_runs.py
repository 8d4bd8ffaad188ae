"""Real `kiln reward` runs on the pretrained tiny parent: synthetic preferences learned, the
export (and `kiln export`) scored in a fresh process, ZeRO-3 on 2 ranks vs ZeRO-0 on 1,
resume, LoRA with the score head in modules_to_save."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.reward_data import PairEncoder
from finetune.reward_model import load_reward_model, metrics_of, tally
from launcher.config import CONFIG_ROOT
from launcher.data.batches import evaluation_batches
from launcher.data.examples import ExampleSource, read_examples
from launcher.data.tokenizer import TextTokenizer
from tests.launcher.runs import env

from .fixtures import write_preferences

REWARD_TINY = str(CONFIG_ROOT / "finetune" / "reward-tiny.yaml")
QUIET = ["metrics.wandb=false", "metrics.progress_bar=false", "metrics.log_every=1"]
SEED = 1234


def kiln(root: Path, *args: str, check: bool = True, threads: int = 1):
    done = subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=root, env=env(OMP_NUM_THREADS=str(threads)), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def run_reward(
    root: Path, name: str, parent: Path, data: Path, *extra: str, nproc: int = 1, check=True
):
    return kiln(
        root, "reward", REWARD_TINY, "--nproc", str(nproc),
        f"run.output_dir={root}", f"run.name={name}", f"run.seed={SEED}",
        f"init.path={parent}",
        f"data.train=[{{paths: [{data / 'train.jsonl'}]}}]",
        f"data.validation=[{{paths: [{data / 'validation.jsonl'}]}}]",
        "eval.every=null", "checkpoint.best=null", *QUIET, *extra, check=check,
        threads=2 // nproc,  # the 2 cores, as `kiln` itself would share them
    )  # fmt: skip


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def untrained_accuracy(parent: Path, pairs: Path) -> float:
    tok = TextTokenizer.load(parent)
    model, _ = load_reward_model(parent, tok.pad_id, SEED)
    found = read_examples([ExampleSource(paths=[str(pairs)])], PairEncoder(tok, 128), key="v")
    batches = evaluation_batches(
        found.examples, rank=0, world_size=1, batch_size=32, pad_id=tok.pad_id
    )
    return metrics_of(tally(model.eval(), batches, tok.pad_id, 0.0, "cpu"))["eval/accuracy"]


def score(hf: Path, pairs: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.finetune.reward_score", str(hf), str(pairs)],
        capture_output=True, text=True, timeout=300, env=env(),
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_synthetic_preferences_are_learned_and_the_export_scores_the_same(pretrained, tmp_path):
    data = tmp_path / "pairs"
    write_preferences(data, train=8000, validation=200, seed=3)
    before = untrained_accuracy(pretrained, data / "validation.jsonl")
    print(f"untrained head: held-out accuracy {before:.3f}")
    assert abs(before - 0.5) <= 0.2
    run_reward(
        tmp_path, "synth", pretrained, data, "train.max_steps=300", "optim.lr=1e-3",
        "train.global_batch_size=64", "train.micro_batch_size=32", "schedule.warmup_steps=20",
        "checkpoint.every=300", "dist.zero_stage=0",
    )  # fmt: skip
    run_dir = tmp_path / "synth"
    last = [m for m in metrics(run_dir) if "eval/accuracy" in m][-1]
    print(f"trained: held-out accuracy {last['eval/accuracy']:.3f} at step {last['step']}")
    assert last["step"] == 300 and last["eval/accuracy"] >= 0.9
    assert {"train/accuracy", "train/margin", "reward/chosen_mean", "reward/rejected_mean"} <= {
        k for m in metrics(run_dir) for k in m
    }
    hf = run_dir / "hf"
    exported = score(hf, data / "validation.jsonl")
    assert exported["pad_token_id"] == TextTokenizer.load(pretrained).pad_id
    assert exported["accuracy"] == last["eval/accuracy"]
    assert abs(exported["mean"] - last["eval/reward_mean"]) < 1e-5
    assert abs(exported["std"] - last["eval/reward_std"]) < 1e-5
    saved = exported["kiln_reward"]
    assert (
        abs(saved["mean"] - exported["mean"]) < 1e-5 and abs(saved["std"] - exported["std"]) < 1e-5
    )
    # `kiln export` of the checkpoint, without the parent: the same scores
    checkpoint = run_dir / "checkpoints" / "step-00000300"
    kiln(tmp_path, "export", str(checkpoint), "--out", str(tmp_path / "out"), "--dtype", "fp32")
    again = score(tmp_path / "out", data / "validation.jsonl")
    for key in ("chosen", "rejected"):
        diff = max(abs(a - b) for a, b in zip(again[key], exported[key], strict=True))
        assert diff < 1e-5
    assert again["kiln_reward"]["mean"] == pytest.approx(saved["mean"], abs=1e-5)


STEPS = ["train.max_steps=20", "checkpoint.every=null", "train.micro_batch_size=2",
         "train.global_batch_size=8", "schedule.warmup_steps=2"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_on_two_ranks_and_a_resume_match_one_uninterrupted_run(pretrained, tmp_path):
    data = tmp_path / "pairs"
    write_preferences(data, train=200, validation=16, seed=5)
    run_reward(tmp_path, "whole", pretrained, data, *STEPS, "dist.zero_stage=0")
    whole = losses(tmp_path / "whole")
    assert sorted(whole) == list(range(1, 21))
    run_reward(tmp_path, "three", pretrained, data, *STEPS, "dist.zero_stage=3",
               "train.stop_after=5", nproc=2)  # fmt: skip
    assert {m["dist/world_size"] for m in metrics(tmp_path / "three")} == {2.0}
    three = losses(tmp_path / "three")
    for step in range(1, 6):
        assert abs(three[step] - whole[step]) <= 1e-5 * abs(whole[step]), (step, three, whole)
    run_reward(tmp_path, "resumed", pretrained, data, *STEPS, "dist.zero_stage=0",
               "train.stop_after=10")  # fmt: skip
    assert max(losses(tmp_path / "resumed")) == 10
    run_reward(tmp_path, "resumed", pretrained, data, *STEPS, "dist.zero_stage=0")
    resumed = losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(11, 21)] == [whole[s] for s in range(11, 21)]


@pytest.mark.slow
def test_lora_trains_adapters_and_the_head_only(pretrained, tmp_path):
    data = tmp_path / "pairs"
    write_preferences(data, train=64, validation=8, seed=7)
    run_reward(tmp_path, "lora", pretrained, data, "train.max_steps=5", "checkpoint.every=5",
               "dist.zero_stage=0", "peft={method: lora, r: 4}", "train.micro_batch_size=4",
               "train.global_batch_size=4", "schedule.warmup_steps=1")  # fmt: skip
    folder = tmp_path / "lora" / "checkpoints" / "step-00000005"
    saved = {}
    for path in folder.glob("model-*.safetensors"):
        saved.update(load_file(str(path)))
    parent = load_file(str(pretrained / "model.safetensors"))
    tok = TextTokenizer.load(pretrained)
    initial, _ = load_reward_model(pretrained, tok.pad_id, SEED)
    base = [k for k in saved if ".base_layer." in k or k.endswith("embed_tokens.weight")]
    assert base
    for key in base:
        name = key.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(saved[key], parent[name]), key
    lora_b = [k for k in saved if "lora_B" in k]
    assert lora_b and all(saved[k].abs().max() > 0 for k in lora_b)  # B starts at 0
    head = [k for k in saved if "score" in k and "modules_to_save" in k]
    assert head and not torch.equal(saved[head[0]], initial.score.weight.detach())
    assert (tmp_path / "lora" / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_a_parent_padding_with_eos_is_refused_until_a_pad_token_is_named(neo_pretrained, tmp_path):
    """The score is read at the last token that is not padding: with pad = EOS that would be
    the token before the response's EOS. The run stops before training, naming the key that
    fixes it; naming an unused token of the vocabulary as pad then trains and exports it."""
    data = tmp_path / "pairs"
    write_preferences(data, train=16, validation=8)
    steps = [
        "train.epochs=null",
        "train.max_steps=2",
        "schedule.warmup_steps=0",
        "checkpoint.every=null",
    ]
    refused = run_reward(tmp_path, "eos", neo_pretrained, data, *steps, check=False)
    assert refused.returncode != 0 and not (tmp_path / "eos" / "hf").exists()
    assert "set tokenizer.pad_token to a distinct token" in refused.stdout + refused.stderr
    run_reward(tmp_path, "pad", neo_pretrained, data, *steps, "tokenizer.pad_token=<|padding|>")
    exported = json.loads((tmp_path / "pad" / "hf" / "config.json").read_text())
    pad = TextTokenizer.load(neo_pretrained, pad_token="<|padding|>").pad_id
    assert exported["pad_token_id"] == pad != TextTokenizer.load(neo_pretrained).eos_id
    saved = json.loads((tmp_path / "pad" / "hf" / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == "<|padding|>"
