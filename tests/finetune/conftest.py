"""The parent every fine-tuning test starts from: the tiny decoder, pretrained once per `make
test` (``tests/shared_dirs.py``) by the real pretraining stage (1 process) and exported as a
plain HF directory; and the fixtures built on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.config import CONFIG_ROOT
from tests.launcher.runs import run

from ..shared_dirs import built_once
from .distill_fixtures import shared_teacher
from .sft_fixtures import run_sft, write_format_task

PRETRAIN_STEPS = 40


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """``parent/parent/hf``: model weights, config.json, tokenizer files and kiln.json;
    built once per `make test` (``tests/shared_dirs.py``)."""

    def build(root: Path) -> None:
        run(root, "parent", f"train.max_steps={PRETRAIN_STEPS}", "checkpoint.every=null",
            "metrics.log_every=10", nproc=1)  # fmt: skip

    hf = built_once(tmp_path_factory, "parent", build) / "parent" / "hf"
    assert (hf / "config.json").exists() and (hf / "tokenizer.json").exists()
    return hf


@pytest.fixture(scope="session")
def pretrained_corpus(pretrained) -> Path:
    """The built-in corpus ``pretrained`` trained on (``tests.launcher.runs`` writes it beside
    the run), for stages that read its text again: distillation, compression's validation."""
    return pretrained.parents[1] / "corpus"


@pytest.fixture(scope="session")
def distill_teacher(tmp_path_factory) -> Path:
    """The distillation tests' teacher (``distill_fixtures.shared_teacher``): ``runs/teacher/hf``
    under a root whose ``corpus/`` it trained on, once per `make test`."""
    return shared_teacher(tmp_path_factory)


@pytest.fixture(scope="session")
def neo_pretrained(tmp_path_factory, shared_data) -> Path:
    """A parent whose tokenizer pads with its end-of-text token, as brought tokenizers without
    a pad token do: GPT-Neo's (50k tokens, with an unused ``<|padding|>``) with
    ``tokenizer.pad_token=<|endoftext|>``, 10 steps of the real pretraining stage."""
    root = tmp_path_factory.mktemp("neo")
    neo = shared_data / "tokenizers" / "gpt-neo-test-tokenizer.json"
    run(root, "neo", f"tokenizer.path={neo}", "tokenizer.pad_token=<|endoftext|>",
        "model.vocab_size=50304", "train.max_steps=10", "checkpoint.every=null",
        nproc=1)  # fmt: skip
    return root / "neo" / "hf"


@dataclass(frozen=True)
class FormatRun:
    """`kiln sft` of ``pretrained`` on the format task with `configs/finetune/sft-tiny.yaml`'s
    settings (4 epochs of 2000 chats, no validation), and the data: 50 held-out chats."""

    train: Path
    validation: Path
    hf: Path
    seconds: float


@pytest.fixture(scope="session")
def sft_format(tmp_path_factory, pretrained) -> FormatRun:
    """The chain's second link: the SFT model the format test scores and DPO starts from."""
    root = tmp_path_factory.mktemp("sft-format")
    train, validation = write_format_task(root / "data")
    started = time.time()
    run_sft(root, "format", pretrained, train, f"data.validation=[{{paths: [{validation}]}}]",
            "checkpoint.every=null", "eval.every=null", "eval.at_start=true",
            "generation.exact_match=50", "generation.max_new_tokens=32")  # fmt: skip
    return FormatRun(train, validation, root / "format" / "hf", time.time() - started)


@dataclass(frozen=True)
class GenreRun:
    """`kiln classify configs/finetune/classify-tiny.yaml` on ``pretrained`` (the genre of the
    parent's own corpus): the run directory (``hf/``, ``report.json``), the corpus and the
    wall time."""

    run_dir: Path
    corpus: Path
    seconds: float


@pytest.fixture(scope="session")
def genre_classifier(tmp_path_factory, pretrained, pretrained_corpus) -> GenreRun:
    """The classification link of the chain, run once per `make test` (``tests/shared_dirs.py``):
    its own test asserts the recipe's quality; the compress stage's classifier test quantizes
    it."""

    def build(root: Path) -> None:
        env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        shards = f"{pretrained_corpus}/shard-*.jsonl.gz"
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "launcher", "classify",
             str(CONFIG_ROOT / "finetune" / "classify-tiny.yaml"), f"run.output_dir={root}",
             f"init.path={pretrained}", f"data.train.0.paths=[{shards}]",
             "metrics.wandb=false", "metrics.progress_bar=false"],
            cwd=root, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (root / "seconds.json").write_text(json.dumps(time.time() - started))

    root = built_once(tmp_path_factory, "genre", build)
    seconds = json.loads((root / "seconds.json").read_text())
    return GenreRun(root / "classify-tiny", pretrained_corpus, seconds)
