"""Examples: finite training sets of encoded records, for the stages that start from a parent.

A fine-tuning set (chats, preference pairs, labelled texts) is read whole before training:
every file of every source through the record reader (``records.scan_records`` with
``RecordView``), and every record through the stage's *encode hook*, ``Record -> Example``.
An ``Example`` is token ids plus a loss mask (which tokens are trained) plus ``extras`` (a
class label, a second sequence of a pair, ...). Whatever a record holds, it becomes one example
or one counted skip: a bad line (``RECORD_ERRORS``), a record the hook refuses (a
``CorpusError`` of the stage's own kind, e.g. ``unknown_role``) or one it fails on
(``encode_error``) is skipped and counted as ``skipped_<kind>`` and the first few are logged
with ``file:line``; with ``on_error: raise`` the first one stops the run with that message.

Sets are held in memory (a 100k-chat set of 500 tokens each is 200 MB of int32): fine-tuning
sets are small next to a pretraining corpus, and a set in memory is what makes the order a
plain seeded permutation, so a resume on any world size continues exactly (``batches.py``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from launcher.config import Section
from launcher.data.records import CorpusError, Record, RecordView, scan_records
from launcher.data.sources import expand_paths

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One encoded record: ``tokens`` (int32) and ``loss_mask`` (bool, same length): token
    ``i`` is a training target (predicted from the tokens before it) where the mask is set.
    ``extras`` holds what else a batch carries per example: numbers (a label, a score) or
    another ``Example`` (the rejected answer of a pair), batched under its key."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    extras: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    """``file:line`` of the record it came from."""

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int32)
        self.loss_mask = np.asarray(self.loss_mask, dtype=bool)
        if self.tokens.shape != self.loss_mask.shape or self.tokens.ndim != 1:
            raise ValueError(
                f"{self.where or 'example'}: tokens {self.tokens.shape} and loss_mask "
                f"{self.loss_mask.shape} must be two vectors of the same length"
            )

    @classmethod
    def from_segments(
        cls, segments: Iterable[tuple[Iterable[int], bool]], where: str = "", **extras: Any
    ) -> Example:
        """Concatenated ``(token ids, trained)`` segments: a chat is header (not trained),
        content and end of turn (trained for the assistant), and so on."""
        tokens: list[int] = []
        mask: list[bool] = []
        for ids, trained in segments:
            ids = list(ids)
            tokens += ids
            mask += [trained] * len(ids)
        return cls(np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=bool), extras, where)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def targets(self) -> int:
        """Trained tokens (the first token is never one: nothing predicts it)."""
        return int(self.loss_mask[1:].sum())

    def truncated(self, length: int) -> Example:
        return Example(self.tokens[:length], self.loss_mask[:length], self.extras, self.where)


Encoder = Callable[[Record], "Example | CorpusError | None"]
"""A stage's encode hook: the example of a record, or why it has none (a ``CorpusError`` with
the stage's own ``kind``), or None to drop it silently."""


class ExampleSource(Section):
    name: str | None = None
    """Label in logs (defaults to the first path)."""
    paths: list[str] = Field(min_length=1)
    """Files, globs or fsspec URLs of jsonl (plain, .gz, .zst) or parquet records."""
    format: Literal["auto", "jsonl", "jsonl.gz", "jsonl.zst", "parquet"] = "auto"
    """File format; auto detects it from the suffix."""

    @property
    def label(self) -> str:
        return self.name or self.paths[0]


@dataclass
class ExampleSet:
    examples: list[Example]
    counters: Counter
    """``examples``, ``records`` and ``skipped_<kind>`` counts."""
    files: list[str]

    def __len__(self) -> int:
        return len(self.examples)


def read_examples(
    sources: list[ExampleSource],
    encode: Encoder,
    *,
    key: str,
    on_error: str = "skip",
    log_bad: int = 5,
    max_bytes: int | None = 5_000_000,
    required: bool = True,
) -> ExampleSet:
    """Every example of ``sources`` (config key ``key``), in file order; records over
    ``max_bytes`` are ``too_long`` skips, never held whole in memory.

    Raises ``CorpusError``: with ``on_error == "raise"``, at the first bad path, file or
    record (the message names the key or ``file:line``); with ``required``, when no example at
    all came out (naming the files and what was skipped).
    """
    counters: Counter = Counter()
    examples: list[Example] = []
    files: list[str] = []

    def skip(error: CorpusError) -> None:
        if on_error == "raise":
            raise error
        kind = error.kind or "unreadable"
        counters[f"skipped_{kind}"] += 1
        if counters[f"skipped_{kind}"] <= log_bad:
            log.warning("skipped (%s): %s", kind, error)

    view = RecordView()
    for i, source in enumerate(sources):
        found, problems = expand_paths(source, f"{key}.{i}", on_error)  # type: ignore[arg-type]
        for problem in problems:
            counters[f"skipped_{problem.kind}"] += 1
        files += found
        for path in found:
            try:
                for item, _ in scan_records(path, view, format=source.format, max_bytes=max_bytes):
                    counters["records"] += 1
                    if isinstance(item, CorpusError):
                        skip(item)
                    elif (example := _encoded(encode, item, skip)) is not None:
                        examples.append(example)
            except CorpusError as exc:  # the rest of this file cannot be read
                skip(exc)
    counters["examples"] = len(examples)
    if required and not examples:
        skipped = {k: v for k, v in counters.items() if k.startswith("skipped_")}
        raise CorpusError(
            f"{key}: no usable example in {len(files)} file(s) "
            f"({', '.join(files[:5]) or 'none found'}); skipped: {skipped or 'nothing'}"
        )
    return ExampleSet(examples, counters, files)


def _encoded(
    encode: Encoder, record: Record, skip: Callable[[CorpusError], None]
) -> Example | None:
    """The hook's example of ``record``; a refusal or a failure of the hook is the record's
    counted skip (``encode_error`` for an exception), never the run's end."""
    try:
        out = encode(record)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # also Rust panics of the tokenizer (pyo3's PanicException)
        message = f"cannot encode the record: {type(exc).__name__}: {exc}"
        skip(CorpusError(message, file=record.file, line=record.line, kind="encode_error"))
        return None
    if isinstance(out, CorpusError):
        if out.file is None:  # the hook need not say where: the reader knows
            out = CorpusError(out.reason, file=record.file, line=record.line, kind=out.kind)
        skip(out)
        return None
    if out is not None and not out.where:
        out.where = record.where
    return out
