"""The parent every fine-tuning test starts from: the tiny decoder, pretrained once per test
session by the real pretraining stage (1 process) and exported as a plain HF directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launcher.runs import run

PRETRAIN_STEPS = 40


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """``runs/parent/hf``: model weights, config.json, tokenizer files and kiln.json."""
    root = tmp_path_factory.mktemp("parent")
    run(
        root,
        "parent",
        f"train.max_steps={PRETRAIN_STEPS}",
        "checkpoint.every=null",
        "metrics.log_every=10",
        nproc=1,
    )
    hf = root / "parent" / "hf"
    assert (hf / "config.json").exists() and (hf / "tokenizer.json").exists()
    return hf
