"""Two processes over gloo through `python -m launcher pretrain --nproc 2` (accelerate launch +
DeepSpeed), on real web text: ZeRO-0/2/3 agree, and the loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launcher.config import CONFIG_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    """50 steps of the tiny model for each of ZeRO 2 and 3, the first 10 of the same run for
    ZeRO 0 (the reference for their first losses; stop_after keeps the 50-step schedule)."""
    root = tmp_path_factory.mktemp("runs")
    web = shared_data / "web"
    sources = f"[{{paths: ['{web}/*.jsonl.gz', '{web}/documents-000.json.gz']}}]"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = {}
    for stage in (0, 2, 3):
        command = [
            sys.executable,
            "-m",
            "launcher",
            "pretrain",
            str(CONFIG_ROOT / "pretrain" / "tiny.yaml"),
            "--nproc",
            "2",
            f"run.output_dir={root}",
            f"run.name=zero{stage}",
            f"dist.zero_stage={stage}",
            "data.builtin=null",
            f"data.sources={sources}",
            "data.seq_len=128",
            "tokenizer.vocab_size=512",
            "data.validation.fraction=0.1",
            "train.max_steps=50",
            *(["train.stop_after=10"] if stage == 0 else []),
            "train.global_batch_size=32",
            "train.micro_batch_size=8",
            "optim.lr=1e-2",
            "schedule.warmup_steps=5",
            "metrics.wandb=false",
            "metrics.progress_bar=false",
            "metrics.log_every=1",
            "eval.every=null",
        ]
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = (root / f"zero{stage}" / "metrics.jsonl").read_text().splitlines()
        out[stage] = [json.loads(line) for line in lines]
    return out


def train_losses(lines):
    return [x["train/loss"] for x in lines if "train/loss" in x]


def test_every_run_had_two_processes_and_its_zero_stage(runs):
    for stage, lines in runs.items():
        assert {x["dist/world_size"] for x in lines} == {2.0}
        assert {x["dist/zero_stage"] for x in lines} == {float(stage)}
        assert len(train_losses(lines)) == (10 if stage == 0 else 50)


def test_zero_0_2_3_give_the_same_first_ten_losses(runs):
    reference = train_losses(runs[0])[:10]
    for stage in (2, 3):
        assert train_losses(runs[stage])[:10] == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_loss_on_real_web_text_falls_by_30_percent_within_50_steps(runs, stage):
    losses = train_losses(runs[stage])
    assert min(losses[-5:]) <= 0.7 * losses[0], losses
    final = runs[stage][-1]
    assert final["eval/bits_per_byte"] > 0 and final["eval/loss"] < losses[0]
