"""`kiln export CHECKPOINT --out DIR`: a plain HF directory that loads in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .runs import run, world_sizes

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PROBE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(input_ids=ids).logits[0].tolist()
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print(json.dumps({"logits": logits, "generated": out[0].tolist(), "text": tok.decode(out[0])}))
"""


def test_exported_model_reproduces_the_training_models_logits_and_generates(tmp_path):
    run(tmp_path, "exp", "dist.zero_stage=3", "train.max_steps=6", "schedule.warmup_steps=1")
    assert world_sizes(tmp_path, "exp") == {2.0}
    checkpoint = tmp_path / "exp" / "checkpoints" / "step-00000006"
    out = tmp_path / "exported"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "export",
            str(checkpoint),
            "--out",
            str(out),
            "--dtype",
            "fp32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    ids = [5, 17, 300, 42, 9, 1000, 77, 3]
    probes = {}
    # The run's own export (written by the training processes from the training weights)
    # and the export of the checkpoint, each loaded in a fresh process.
    for label, folder in (("training", tmp_path / "exp" / "hf"), ("export", out)):
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(folder), json.dumps(ids)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        probes[label] = json.loads(done.stdout.strip().splitlines()[-1])
    a, b = (torch.tensor(probes[k]["logits"]) for k in ("training", "export"))
    assert (a - b).abs().max().item() < 1e-5
    assert len(probes["export"]["generated"]) == len(ids) + 8
    assert probes["export"]["generated"] == probes["training"]["generated"]


def test_export_refuses_a_damaged_checkpoint_naming_the_file(tmp_path):
    run(tmp_path, "dmg", "train.max_steps=3", "schedule.warmup_steps=1", nproc=1)
    checkpoint = tmp_path / "dmg" / "checkpoints" / "step-00000003"
    (checkpoint / "trainer.json").write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "export", str(checkpoint), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "trainer.json" in done.stderr and "the manifest says" in done.stderr
