"""The `data:` section of a streamed corpus: sources and their mix, packing, shuffling, bad-input
policy, validation. A stage may extend it (pretraining adds its generated built-in corpus)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import Field

from launcher.config import Section


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
    """Relative share of this source in the training tokens."""

    @property
    def label(self) -> str:
        return self.name or self.paths[0]


class ValidationConfig(Section):
    fraction: float = Field(0.005, ge=0, lt=1)
    """Share of documents held out of training, chosen by a hash of the document id (the same
    documents whatever the seed, world size or worker count). 0 disables the held-out split."""
    sources: list[SourceConfig] = Field(default_factory=list)
    """Separate validation files instead of (or besides) the hashed held-out documents."""
    max_docs: int = Field(1000, gt=0)
    """At most this many validation documents (they are read before training starts)."""


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    """The training corpus."""
    seq_len: int = Field(256, gt=0)
    """Tokens per training sequence."""
    add_bos: bool = False
    """Start every document with the tokenizer's BOS token (EOS always ends it)."""
    document_boundaries: bool = False
    """Reset position ids at every document and stop attention across documents in a
    packed sequence (costs a seq_len x seq_len mask per sequence with SDPA)."""
    shuffle: bool = True
    """Shuffle the order of files (and file stripes) every epoch."""
    shuffle_window_tokens: int = Field(262_144, ge=0)
    """Tokens held in the shuffle window of each reader, which packs the next document drawn
    at random from it (0: no shuffling). Filling it reads at most one epoch ahead (a source's
    next epoch waits until its previous one has left the window), and documents over 65,536
    characters do not wait in it: they stream into the packer chunk by chunk when read."""
    shuffle_window: int | None = Field(None, ge=0)
    """At most this many documents in the window besides the token bound (0 or 1: no
    shuffling; null: the token bound alone)."""
    num_workers: int = Field(1, ge=0)
    """DataLoader worker processes per rank reading and tokenizing (0: in the main process)."""
    on_error: Literal["skip", "raise"] = "skip"
    """Bad records and files: skip and count them, or stop at the first with file and line."""
    max_document_bytes: int | None = Field(5_000_000, gt=0)
    """Longer documents are skipped and counted as too_long; null accepts any length."""
    log_bad_records: int = Field(5, ge=0)
    """How many bad records of each kind each reader logs with file and line."""
    validation: ValidationConfig = ValidationConfig()
    track_documents: bool = False
    """Add a `doc_keys` tensor (which document each input token came from) to batches;
    for tests and data audits."""

    def problems(self) -> Iterable[tuple[str, str]]:
        if not self.all_sources():
            yield "sources", self.no_sources_hint()
        labels = [s.label for s in self.all_sources()]
        for label in {x for x in labels if labels.count(x) > 1}:
            yield "sources", f"two sources are called {label!r}; give them distinct names"

    def all_sources(self) -> list[SourceConfig]:
        """The sources to read (a stage's subclass may add its own)."""
        return list(self.sources)

    def no_sources_hint(self) -> str:
        return "no training data: list data.sources"
