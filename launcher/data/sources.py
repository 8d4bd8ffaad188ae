"""Corpus sources resolved to files; the held-out split; bounded samples of the corpus."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from launcher.data.config import DataConfig, SourceConfig
from launcher.data.documents import CorpusError, Document, is_unicode, scan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """A source with its files listed (globs expanded) and its weight normalised."""

    label: str
    files: tuple[str, ...]
    format: str
    text_field: str
    weight: float


@dataclass
class ResolvedCorpus:
    sources: tuple[ResolvedSource, ...]
    problems: Counter = field(default_factory=Counter)
    """Files that were skipped while resolving, per kind (missing_file, empty_glob)."""

    def fingerprint(self) -> str:
        """Identifies the file lists; a data state only resumes on the same corpus."""
        h = hashlib.sha256()
        for s in self.sources:
            h.update(s.label.encode() + b"\0" + "\0".join(s.files).encode() + b"\1")
        return h.hexdigest()[:16]


def expand_paths(
    source: SourceConfig, key: str, on_error: str = "raise"
) -> tuple[list[str], list[CorpusError]]:
    """Every file of a source, globs expanded, in a stable order, and the paths that matched
    nothing (a glob without match is ``empty_glob``, an absent file ``missing_file``) or whose
    names are not UTF-8 (``invalid_file_name``).

    With ``on_error == "raise"`` the first such path raises ``CorpusError`` naming its key.
    """
    files: list[str] = []
    problems: list[CorpusError] = []

    def skip(problem: CorpusError) -> None:
        if on_error == "raise":
            raise problem
        log.warning("%s; skipped", problem)
        problems.append(problem)

    for i, pattern in enumerate(source.paths):
        if "://" in pattern:
            fs, _, _ = fsspec.get_fs_token_paths(pattern)
            protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
            if glob.has_magic(pattern):
                found = [f if "://" in f else f"{protocol}://{f}" for f in sorted(fs.glob(pattern))]
            else:
                found = [pattern] if fs.exists(pattern) else []
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            kind = "empty_glob" if glob.has_magic(pattern) else "missing_file"
            message = "matches no file" if kind == "empty_glob" else "no such file"
            skip(CorpusError(f"{key}.paths.{i}: '{pattern}' {message}", kind=kind))
        for path in found:
            if is_unicode(path):
                files.append(path)
            else:  # listed with lone surrogates, which no fingerprint, key or log can encode
                message = f"{key}.paths.{i}: '{path}' is not a UTF-8 file name; rename it"
                skip(CorpusError(message, kind="invalid_file_name"))
    return files, problems


def resolve_sources(
    sources: list[SourceConfig], key: str = "data.sources", on_error: str = "raise"
) -> ResolvedCorpus:
    """List every source's files. Raises ``CorpusError`` when a source has no file at all."""
    total = sum(s.weight for s in sources)
    resolved = []
    skipped: Counter = Counter()
    for i, source in enumerate(sources):
        where = f"{key}.{i}" if source.name != "builtin" else "data.builtin"
        files, problems = expand_paths(source, where, on_error)
        skipped.update(p.kind for p in problems)
        if not files:
            why = "; ".join(str(p) for p in problems)
            raise CorpusError(f"source {source.label!r} has no files: {why}")
        resolved.append(
            ResolvedSource(
                label=source.label,
                files=tuple(files),
                format=source.format,
                text_field=source.text_field,
                weight=source.weight / total,
            )
        )
    return ResolvedCorpus(tuple(resolved), skipped)


def resolve_corpus(cfg: DataConfig) -> ResolvedCorpus:
    """The training corpus of a data config (the built-in corpus must exist already)."""
    return resolve_sources(cfg.all_sources(), on_error=cfg.on_error)


def holdout_key(doc: Document) -> str:
    """The document's id, or ``<file name>:<line>`` when the record has none (so the split
    does not depend on where the corpus is mounted)."""
    if doc.id == f"{doc.file}:{doc.line}":
        return f"{Path(doc.file).name}:{doc.line}"
    return doc.id


def is_held_out(doc: Document, fraction: float) -> bool:
    """Whether ``doc`` belongs to the validation split: a fixed hash of its id, no seed."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(holdout_key(doc).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def check_corpus(
    corpus: ResolvedCorpus, on_error: str = "skip", max_bytes: int | None = None
) -> None:
    """Fail before training when a source yields no document at all.

    Reads each source's files in order until one good document is found, so a healthy
    corpus costs one record per source. Raises ``CorpusError`` listing what was wrong.
    """
    for source in corpus.sources:
        problems: Counter = Counter()
        found = False
        for path in source.files:
            try:
                for item, _ in scan(
                    path, format=source.format, text_field=source.text_field, max_bytes=max_bytes
                ):
                    if isinstance(item, CorpusError):
                        if on_error == "raise":
                            raise item
                        problems[item.kind] += 1
                        continue
                    found = True
                    break
            except CorpusError as exc:
                if on_error == "raise":
                    raise
                problems[exc.kind or "unreadable"] += 1
            if found:
                break
        if not found:
            seen = ", ".join(f"{n} {kind}" for kind, n in problems.items()) or "no records"
            raise CorpusError(
                f"source {source.label!r} yields no documents from its {len(source.files)} "
                f"files ({seen}); check the paths, format and text_field"
            )


def sample_texts(
    sources: list[SourceConfig],
    max_docs: int,
    max_bytes: int,
    seed: int,
    holdout: float = 0.0,
    on_error: str = "raise",
) -> Iterator[str]:
    """Documents drawn from every source in proportion to its weight, files in seeded order,
    held-out (validation) documents left out. Used to train the tokenizer on a bounded,
    representative slice of the corpus."""
    corpus = resolve_sources(sources, on_error=on_error)
    rng = random.Random(seed)
    for source in corpus.sources:
        doc_budget = max(1, int(max_docs * source.weight))
        byte_budget = max(1, int(max_bytes * source.weight))
        files = list(source.files)
        rng.shuffle(files)
        docs = n_bytes = 0
        for file in files:
            try:
                for doc, _ in scan(file, format=source.format, text_field=source.text_field):
                    if isinstance(doc, CorpusError) and on_error == "raise":
                        raise doc
                    if isinstance(doc, CorpusError) or is_held_out(doc, holdout):
                        continue  # bad records are the stream's to count, not the sample's
                    yield doc.text
                    docs += 1
                    n_bytes += len(doc.text.encode("utf-8"))
                    if docs >= doc_budget or n_bytes >= byte_budget:
                        break
            except CorpusError as exc:
                if on_error == "raise":
                    raise
                log.warning("tokenizer sample: skipping the rest of %s", exc)
            if docs >= doc_budget or n_bytes >= byte_budget:
                break
