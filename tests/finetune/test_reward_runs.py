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
from launcher.cli import main as cli_main
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


def score(pairs: Path, *hf: Path) -> list[dict]:
    """The scores of each HF directory ``hf``, all in one fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.finetune.reward_score", *map(str, hf), str(pairs)],
        capture_output=True, text=True, timeout=300, env=env(),
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()[-len(hf) :]]


# the learning run, shared: ZeRO-3 on 2 ranks and the resume stop early on its schedule, so
# that it is the uninterrupted reference of both (a launch costs ~20 s)
SYNTH = ["train.max_steps=300", "optim.lr=1e-3", "train.global_batch_size=64",
         "train.micro_batch_size=32", "schedule.warmup_steps=20", "checkpoint.every=150",
         "checkpoint.keep_last=2"]  # fmt: skip


@pytest.fixture(scope="module")
def synth(pretrained, tmp_path_factory) -> Path:
    """300 steps of `kiln reward` (ZeRO-0, 1 rank) on 8000 synthetic pairs (``pairs/`` next to
    it), saved at steps 150 and 300; the run directory."""
    root = tmp_path_factory.mktemp("reward")
    write_preferences(root / "pairs", train=8000, validation=200, seed=3)
    run_reward(root, "synth", pretrained, root / "pairs", *SYNTH, "dist.zero_stage=0")
    return root / "synth"


@pytest.mark.slow
def test_synthetic_preferences_are_learned_and_the_export_scores_the_same(
    pretrained, synth, tmp_path
):
    validation = synth.parent / "pairs" / "validation.jsonl"
    before = untrained_accuracy(pretrained, validation)
    print(f"untrained head: held-out accuracy {before:.3f}")
    assert abs(before - 0.5) <= 0.2
    last = [m for m in metrics(synth) if "eval/accuracy" in m][-1]
    print(f"trained: held-out accuracy {last['eval/accuracy']:.3f} at step {last['step']}")
    assert last["step"] == 300 and last["eval/accuracy"] >= 0.9
    assert {"train/accuracy", "train/margin", "reward/chosen_mean", "reward/rejected_mean"} <= {
        k for m in metrics(synth) for k in m
    }
    # `kiln export` of the checkpoint, without the parent: the same scores as the run's export
    # (its CLI in this process: a process would add a start-up, the scoring is in a fresh one)
    checkpoint = synth / "checkpoints" / "step-00000300"
    out = tmp_path / "out"
    assert cli_main(["export", str(checkpoint), "--out", str(out), "--dtype", "fp32"]) == 0
    exported, again = score(validation, synth / "hf", out)
    assert exported["pad_token_id"] == TextTokenizer.load(pretrained).pad_id
    assert exported["accuracy"] == last["eval/accuracy"]
    assert abs(exported["mean"] - last["eval/reward_mean"]) < 1e-5
    assert abs(exported["std"] - last["eval/reward_std"]) < 1e-5
    saved = exported["kiln_reward"]
    assert (
        abs(saved["mean"] - exported["mean"]) < 1e-5 and abs(saved["std"] - exported["std"]) < 1e-5
    )
    for key in ("chosen", "rejected"):
        diff = max(abs(a - b) for a, b in zip(again[key], exported[key], strict=True))
        assert diff < 1e-5
    assert again["kiln_reward"]["mean"] == pytest.approx(saved["mean"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_on_two_ranks_and_a_resume_match_one_uninterrupted_run(pretrained, synth):
    root, data = synth.parent, synth.parent / "pairs"
    whole = losses(synth)
    assert sorted(whole) == list(range(1, 301))
    run_reward(root, "three", pretrained, data, *SYNTH, "dist.zero_stage=3",
               "train.stop_after=5", nproc=2)  # fmt: skip
    assert {m["dist/world_size"] for m in metrics(root / "three")} == {2.0}
    three = losses(root / "three")
    assert sorted(three) == [1, 2, 3, 4, 5]
    for step in three:
        assert abs(three[step] - whole[step]) <= 1e-5 * abs(whole[step]), (step, three, whole)
    # from the run's own step-150 checkpoint (what a stop after 150 saves: the same save), past
    # the first epoch (125 steps): Adam's moments and the data position restored
    step150 = synth / "checkpoints" / "step-00000150"
    run_reward(root, "resumed", pretrained, data, *SYNTH, "dist.zero_stage=0",
               f"checkpoint.resume={step150}", "train.stop_after=10")  # fmt: skip
    resumed = losses(root / "resumed")
    assert sorted(resumed) == list(range(151, 161))
    assert [resumed[s] for s in resumed] == [whole[s] for s in resumed]


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
