"""Corpus sources: which files make up the corpus, in what proportion, and how to sample it."""

from __future__ import annotations

import glob
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import fsspec
from pydantic import Field

from launcher.config import Section
from pretrain.data.builtin import BuiltinCorpusConfig
from pretrain.data.documents import CorpusError, read_documents


class SourceConfig(Section):
    name: str | None = None
    """Label used in metrics and logs (defaults to the first path)."""
    paths: list[str] = Field(min_length=1)
    """Files, globs or fsspec URLs (s3://, gs://, https://, hf://) of jsonl/parquet shards."""
    format: Literal["auto", "jsonl", "jsonl.gz", "jsonl.zst", "parquet"] = "auto"
    """File format; auto detects it from the suffix."""
    text_field: str = "text"
    """The field (or parquet column) that holds the document text."""
    weight: float = Field(1.0, gt=0)
    """Relative share of this source in the mix."""

    @property
    def label(self) -> str:
        return self.name or self.paths[0]


class DataConfig(Section):
    sources: list[SourceConfig] = []
    """The training corpus; may be empty when `builtin` is set."""
    builtin: BuiltinCorpusConfig | None = None
    """Generate the project's own seeded corpus and train on it (no data needed)."""
    seq_len: int = Field(256, gt=0)
    """Tokens per training sequence."""

    def problems(self):
        if not self.sources and self.builtin is None:
            yield "sources", "no training data: list data.sources, or set data.builtin: {} to use the generated corpus"

    def all_sources(self) -> list[SourceConfig]:
        """The configured sources, plus the built-in corpus when enabled."""
        sources = list(self.sources)
        if self.builtin is not None:
            pattern = str(Path(self.builtin.dir) / "shard-*.jsonl.gz")
            sources.append(SourceConfig(name="builtin", paths=[pattern]))
        return sources


def expand_paths(source: SourceConfig, key: str = "data.sources") -> list[str]:
    """Every file of a source, globs expanded, in a stable order.

    Raises ``CorpusError`` naming the config key when a path or glob matches nothing.
    """
    files: list[str] = []
    for i, pattern in enumerate(source.paths):
        if "://" in pattern:
            fs, _, _ = fsspec.get_fs_token_paths(pattern)
            protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
            found = sorted(fs.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            found = [f if "://" in f else f"{protocol}://{f}" for f in found]
        else:
            found = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else (
                [pattern] if Path(pattern).exists() else []
            )
        if not found:
            raise CorpusError(f"{key}.paths.{i}: '{pattern}' matches no file")
        files.extend(found)
    return files


def sample_texts(
    sources: list[SourceConfig], max_docs: int, max_bytes: int, seed: int
) -> Iterator[str]:
    """Documents drawn from every source in proportion to its weight, files in seeded order.

    Used to train the tokenizer on a bounded, representative slice of the corpus.
    """
    total = sum(s.weight for s in sources)
    rng = random.Random(seed)
    for source in sources:
        share = source.weight / total
        doc_budget, byte_budget = max(1, int(max_docs * share)), max(1, int(max_bytes * share))
        files = expand_paths(source)
        rng.shuffle(files)
        docs = n_bytes = 0
        for file in files:
            for doc in read_documents(file, text_field=source.text_field, format=source.format):
                yield doc.text
                docs += 1
                n_bytes += len(doc.text.encode("utf-8"))
                if docs >= doc_budget or n_bytes >= byte_budget:
                    break
            if docs >= doc_budget or n_bytes >= byte_budget:
                break
