"""Small multi-source corpora on disk, and a helper to run the stream of every rank."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np

from launcher.data.config import DataConfig
from launcher.data.loader import StreamLoader
from launcher.data.sources import resolve_corpus
from launcher.data.stream import EPOCH_SHIFT, document_key
from launcher.data.tokenizer import TextTokenizer, TokenizerConfig
from launcher.data.tokenizer_training import train_tokenizer

WORDS = [
    "river",
    "town",
    "baker",
    "stone",
    "road",
    "winter",
    "lamp",
    "garden",
    "letter",
    "window",
    "market",
    "bridge",
    "quiet",
    "bright",
    "slowly",
    "morning",
    "evening",
    "harbour",
    "field",
    "story",
    "number",
    "seven",
    "twelve",
]


def make_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def write_jsonl(path: Path, docs: list[dict], members: int = 1) -> Path:
    """Plain jsonl, or gzip with ``members`` independent members (resume points)."""
    lines = [json.dumps(d) + "\n" for d in docs]
    if path.suffix == ".gz":
        step = -(-len(lines) // members)
        blob = b"".join(
            gzip.compress("".join(lines[i : i + step]).encode(), mtime=0)
            for i in range(0, len(lines), step)
        )
        path.write_bytes(blob)
    else:
        path.write_text("".join(lines))
    return path


def make_corpus(root: Path, seed: int = 0) -> dict[str, list[Path]]:
    """Source `web`: 5 files (jsonl and multi-member jsonl.gz), short documents.
    Source `books`: 2 files (fewer than 4 readers: they are striped), long documents."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {"web": [], "books": []}
    for i in range(5):
        suffix = ".jsonl.gz" if i % 2 else ".jsonl"
        docs = [
            {"id": f"web-{i}-{j}", "text": make_text(rng, rng.randint(5, 60))} for j in range(30)
        ]
        files["web"].append(write_jsonl(root / f"web-{i}{suffix}", docs, members=4))
    for i in range(2):
        docs = [
            {"id": f"book-{i}-{j}", "text": make_text(rng, rng.randint(80, 300))} for j in range(25)
        ]
        files["books"].append(write_jsonl(root / f"books-{i}.jsonl.gz", docs, members=5))
    return files


def data_config(root: Path, **overrides) -> DataConfig:
    base = {
        "sources": [
            {"name": "web", "paths": [str(root / "web-*")], "weight": 0.6},
            {"name": "books", "paths": [str(root / "books-*.jsonl.gz")], "weight": 0.4},
        ],
        "seq_len": 32,
        "shuffle_window": 8,
        "num_workers": 0,
        "validation": {"fraction": 0.0},
        "track_documents": True,
    }
    base.update(overrides)
    return DataConfig.model_validate(base)


def train_small_tokenizer(_root: Path | None, out: Path) -> TextTokenizer:
    rng = random.Random(1)
    texts = [make_text(rng, 200) for _ in range(50)]
    return train_tokenizer(TokenizerConfig(vocab_size=400), texts, out).tokenizer


def loaders(cfg: DataConfig, tokenizer, world_size: int, batch_size: int = 2, seed: int = 0):
    corpus = resolve_corpus(cfg)
    return [
        StreamLoader(
            cfg, tokenizer, corpus, batch_size=batch_size, seed=seed, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]


def take(loader: StreamLoader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if len(out) == n:
            break
    return out


def expected_tokens(cfg: DataConfig, tokenizer) -> dict[int, int]:
    """Input tokens each document contributes in one epoch, keyed like the stream's doc_keys
    (epoch bits cleared)."""
    corpus = resolve_corpus(cfg)
    out = {}
    for s, source in enumerate(corpus.sources):
        for path in source.files:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line_no, line in enumerate(f, start=1):
                    text = json.loads(line)["text"]
                    key = document_key(s, path, line_no, 0)
                    out[key] = len(tokenizer.encode(text)) + 1
    return out


def tokens_per_document(batches: list[dict], epoch: int) -> dict[int, int]:
    keys = np.concatenate([b["doc_keys"].numpy().ravel() for b in batches])
    keys = keys[(keys >> EPOCH_SHIFT) == epoch]
    doc = keys & ((1 << EPOCH_SHIFT) - 1)
    values, counts = np.unique(doc, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))
