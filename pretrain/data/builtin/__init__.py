"""The project's own seeded corpus: English-like documents about a small fictional world.

The default job must run with no data, so kiln can generate a corpus that is learnable yet not
trivial. A seed fixes a *world* (people, towns, rivers, hills, regions and trades, with facts
such as "The river that runs through Dunmere is the Ashwell." that every document agrees on)
and each document is drawn, from its own seeded stream, in one of five genres:

* ``story``: short stories from a small grammar (varied sentence templates, a bit of speech);
* ``encyclopedia``: paragraphs stating the world's facts;
* ``arithmetic``: worked examples whose results are correct ("17 + 25 = 42");
* ``list``: recipes, guides and checklists with numbered or indented lines;
* ``dialogue``: short conversations in quotes or as a script.

Words follow Zipf-like frequencies; a few names carry accents (é, ü, ø), the odd sentence has
an em dash or curly quotes, and fewer than 1% of documents contain a CJK character or an emoji.
Document lengths are log-normal (30 to 1500 words, about 1.5 KB on average).

``write_builtin_corpus`` writes ``shard-00000.jsonl.gz`` ... (one ``{"id", "text", "genre"}``
object per line) and a ``manifest.json``; the same config always gives byte-identical files,
and an existing corpus made from the same config is reused. Each shard is a concatenation of
independent gzip members of at most ``MEMBER_BYTES`` of JSON lines (cut between lines), so
a reader resuming inside a shard decodes one member, not the shard from its start.

The package holds one concern per module: ``lexicon`` (word lists and word helpers),
``world`` (the seeded world), ``writer`` (the document being written), ``genres`` (one
writer per genre) and this module (the public API: config, ``generate_document`` and
writing or reusing the shards; ``python -m pretrain.data.builtin`` runs ``__main__``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from launcher import atomic
from launcher.config import Section

from .genres import _GENRE_WRITERS
from .lexicon import _EXOTIC

# Re-exported: importable from this package as they were from the single-file module.
from .lexicon import article as article
from .lexicon import cap as cap
from .lexicon import number_words as number_words
from .lexicon import plural as plural
from .world import Person as Person
from .world import River as River
from .world import Town as Town
from .world import World
from .world import Zipf as Zipf
from .writer import _Writer

__all__ = [
    "GENRES",
    "BuiltinCorpusConfig",
    "CorpusInfo",
    "World",
    "generate_document",
    "write_builtin_corpus",
]

GENERATOR_VERSION = 2
"""Bumped whenever the generated text changes, so that old corpora are regenerated."""

GENRES = ("story", "encyclopedia", "arithmetic", "list", "dialogue")
_GENRE_WEIGHTS = (35, 22, 13, 13, 17)
_EXOTIC_RATE = 0.005
"""Share of documents that get one CJK or emoji sentence."""

MANIFEST = "manifest.json"
MEMBER_BYTES = 1 << 20
"""Most uncompressed bytes in one gzip member of a shard (unless one line is longer)."""


class BuiltinCorpusConfig(Section):
    docs: int = Field(20000, gt=0)
    """Number of documents to generate."""
    shards: int = Field(8, gt=0)
    """Number of jsonl.gz files the documents are split into (contiguous blocks)."""
    seed: int = Field(0, ge=0)
    """Seed of the world and of every document; the same seed gives the same files."""
    dir: str = "data/builtin"
    """Output folder for the shards and manifest.json."""

    def problems(self) -> Iterable[tuple[str, str]]:
        if self.shards > self.docs:
            yield (
                "shards",
                f"{self.shards} shards for {self.docs} documents would leave some shards empty; "
                f"use at most {self.docs} shards or raise docs",
            )


@dataclass
class CorpusInfo:
    dir: Path
    """The folder holding the shards and manifest.json."""
    files: list[Path]
    """The shard files, in order."""
    docs: int
    text_bytes: int
    """UTF-8 bytes of all document texts."""
    reused: bool
    """True when an existing corpus made from the same config was kept."""
    seconds: float


def generate_document(world: World, seed: int, index: int) -> tuple[str, str]:
    """``(genre, text)`` of document ``index``; depends only on the world, seed and index."""
    rng = random.Random(f"kiln-builtin-doc:{seed}:{index}")
    genre = rng.choices(GENRES, weights=_GENRE_WEIGHTS)[0]
    target = min(1400, max(30, int(rng.lognormvariate(5.1, 0.75))))
    d = _Writer(world, rng)
    _GENRE_WRITERS[genre](d, target)
    if rng.random() < _EXOTIC_RATE:
        p = world.person(rng)
        i = rng.randrange(len(d.paragraphs))
        d.paragraphs[i] += " " + rng.choice(_EXOTIC).format(
            town=p.town.name, name=p.first, pron=p.pron
        )
    while d.words > 1500 and len(d.paragraphs) > 1:  # keep within bounds; rarely needed
        d.words -= len(d.paragraphs.pop().split())
    return genre, d.text()


# ----------------------------------------------------------------------------------- writing


def _shard_ranges(docs: int, shards: int) -> list[range]:
    return [range(k * docs // shards, (k + 1) * docs // shards) for k in range(shards)]


def _recipe_of(config: dict) -> dict:
    """The part of a config that decides the generated bytes (not the folder they are in)."""
    return {k: v for k, v in config.items() if k != "dir"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reuse(cfg: BuiltinCorpusConfig, out: Path, start: float) -> CorpusInfo | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if manifest["generator"] != GENERATOR_VERSION or _recipe_of(
            manifest["config"]
        ) != _recipe_of(cfg.model_dump(mode="json")):
            return None
        entries = manifest["files"]
        files = [out / e["file"] for e in entries]
        if any(f.stat().st_size != e["bytes"] for f, e in zip(files, entries, strict=True)):
            return None
        return CorpusInfo(
            dir=out,
            files=files,
            docs=manifest["docs"],
            text_bytes=manifest["text_bytes"],
            reused=True,
            seconds=time.perf_counter() - start,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_builtin_corpus(cfg: BuiltinCorpusConfig) -> CorpusInfo:
    """Generate the corpus into ``cfg.dir`` (or reuse the one already there) and describe it.

    Shard files are written under a temporary name and renamed; ``manifest.json`` comes last,
    so a corpus with a matching manifest is always complete.
    """
    start = time.perf_counter()
    out = Path(cfg.dir)
    info = _reuse(cfg, out, start)
    if info is not None:
        return info
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    world = World(cfg.seed)
    entries = []
    files = []
    for k, indices in enumerate(_shard_ranges(cfg.docs, cfg.shards)):
        path = out / f"shard-{k:05d}.jsonl.gz"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        text_bytes = 0
        with open(tmp, "wb") as raw:
            block: list[bytes] = []  # the lines of the next gzip member
            size = 0
            for i in indices:
                genre, text = generate_document(world, cfg.seed, i)
                text_bytes += len(text.encode("utf-8"))
                record = {"id": f"builtin-{cfg.seed}-{i}", "text": text, "genre": genre}
                line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
                if block and size + len(line) > MEMBER_BYTES:
                    raw.write(gzip.compress(b"".join(block), compresslevel=6, mtime=0))
                    block, size = [], 0
                block.append(line)
                size += len(line)
            raw.write(gzip.compress(b"".join(block), compresslevel=6, mtime=0))
        tmp.replace(path)
        files.append(path)
        entries.append(
            {
                "file": path.name,
                "docs": len(indices),
                "text_bytes": text_bytes,
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
        )
    for stale in out.glob("shard-*.jsonl.gz"):  # left over from a config with more shards
        if stale not in files:
            stale.unlink(missing_ok=True)
    manifest = {
        "generator": GENERATOR_VERSION,
        "config": cfg.model_dump(mode="json"),
        "docs": cfg.docs,
        "text_bytes": sum(e["text_bytes"] for e in entries),
        "files": entries,
    }
    atomic.write_text(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return CorpusInfo(
        dir=out,
        files=files,
        docs=cfg.docs,
        text_bytes=manifest["text_bytes"],
        reused=False,
        seconds=time.perf_counter() - start,
    )
