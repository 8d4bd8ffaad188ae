"""One reader's pipeline: its share of every source -> mix -> shuffle window -> tokenize -> pack.

A reader is one DataLoader worker of one rank. Everything it needs to continue exactly where
it stopped is in ``state``: per source a cursor (which file segment, and the file position
after the last record consumed), the tokens taken per source (for the mix), the shuffle
window's documents, the packer's leftover tokens, the window's RNG and the skip counters.
Nothing is re-read on resume: each segment is reopened at its saved position.

Mixing is by *tokens*: the next document comes from the source furthest below its share of
the tokens taken so far, so a 0.7 / 0.3 mix is 0.7 / 0.3 of the training tokens (within one
document), deterministically, whatever the documents' lengths.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import Counter
from collections.abc import Iterator

import numpy as np

from pretrain.data.config import DataConfig
from pretrain.data.documents import CorpusError, Document, scan
from pretrain.data.packing import Packer, Piece
from pretrain.data.plan import Layout, SourcePlan, new_cursor
from pretrain.data.sources import ResolvedCorpus, is_held_out
from pretrain.tokenizer import TextTokenizer

log = logging.getLogger(__name__)
_MAX_EMPTY_SEGMENTS = 10_000


EPOCH_SHIFT = 55
"""Document keys: the epoch (mod 256) in the top bits, a hash of (source, file, line) below."""


def document_key(source: int, file: str, line: int, epoch: int) -> int:
    """A 63-bit id of one reading of a document: ``key >> EPOCH_SHIFT`` is the epoch (mod 256),
    ``key & (2**EPOCH_SHIFT - 1)`` identifies the document."""
    raw = f"{source}\0{file}\0{line}".encode()
    digest = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    return (epoch % 256) << EPOCH_SHIFT | digest & ((1 << EPOCH_SHIFT) - 1)


def fresh_state(layout: Layout, n_sources: int, seed: int) -> dict:
    return {
        "layout": {"index": layout.index, "count": layout.count},
        "cursors": [new_cursor() for _ in range(n_sources)],
        "mixed": [0] * n_sources,
        "window": [],
        "packer": [],
        "rng": np.random.default_rng([seed, layout.count, layout.index]).bit_generator.state,
        "counters": {},
        "generation": 0,
    }


class ReaderStream:
    """The infinite stream of packed sequences of one reader."""

    def __init__(
        self,
        corpus: ResolvedCorpus,
        cfg: DataConfig,
        tokenizer: TextTokenizer,
        seed: int,
        state: dict,
    ):
        self.corpus, self.cfg, self.tokenizer = corpus, cfg, tokenizer
        self.layout = Layout(**state["layout"])
        self.plans = [
            SourcePlan(seed, s, len(src.files), cfg.shuffle) for s, src in enumerate(corpus.sources)
        ]
        self.cursors = copy.deepcopy(state["cursors"])
        self.mixed = list(state["mixed"])
        self.window = [Piece(p["tokens"], p["spans"]) for p in state["window"]]
        self.packer = Packer(
            cfg.seq_len, cfg.document_boundaries, cfg.track_documents, len(self.plans)
        )
        self.packer.load_state_dict(state["packer"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.counters = Counter(state["counters"])
        self.generation = state["generation"]
        self.window_ops: list[tuple] = []
        self._scans: list[Iterator | None] = [None] * len(self.plans)
        self._empty_segments = [0] * len(self.plans)
        self._weights = np.array([src.weight for src in corpus.sources])
        self._prefix = [tokenizer.bos_id] if cfg.add_bos else []
        if cfg.add_bos and tokenizer.bos_id is None:
            raise CorpusError("data.add_bos is set but the tokenizer has no BOS token")

    # -------------------------------------------------------------------------- documents

    def _next_document(self, s: int) -> tuple[Document, int]:
        """The next good, not held-out document of source ``s`` and its epoch."""
        source, cursor = self.corpus.sources[s], self.cursors[s]
        while True:
            if self._scans[s] is None:
                if cursor["current"] is None:
                    self.plans[s].advance(cursor, self.layout)
                seg = cursor["current"]
                self._scans[s] = scan(
                    source.files[seg["file"]],
                    format=source.format,
                    text_field=source.text_field,
                    start=seg["start"],
                    stripe=seg["stripe"],
                    stripes=seg["stripes"],
                    max_bytes=self.cfg.max_document_bytes,
                    stats=self.counters,
                )
            try:
                item, position = next(self._scans[s])
            except StopIteration:
                item = None
            except CorpusError as exc:  # the rest of this file is unreadable
                self._bad(exc)
                item = None
            if item is None:
                self._scans[s] = None
                cursor["current"] = None
                self._empty_segments[s] += 1
                # A safety net: the corpus was checked before training, so this means its
                # files went bad since (a reader's share can be empty for a while, not forever).
                if self._empty_segments[s] > _MAX_EMPTY_SEGMENTS:
                    raise CorpusError(
                        f"source {source.label!r}: {_MAX_EMPTY_SEGMENTS} file segments in a row "
                        f"gave no document (reader {self.layout.index}; {dict(self.counters)})"
                    )
                continue
            cursor["current"]["start"] = position
            if isinstance(item, CorpusError):
                self._bad(item)
                continue
            if is_held_out(item, self.cfg.validation.fraction):
                self.counters["held_out"] += 1
                continue
            self._empty_segments[s] = 0
            return item, cursor["current"]["epoch"]

    def _bad(self, error: CorpusError) -> None:
        if self.cfg.on_error == "raise":
            raise error
        kind = error.kind or "unreadable"
        self.counters[f"skipped_{kind}"] += 1
        if self.counters[f"skipped_{kind}"] <= self.cfg.log_bad_records:
            log.warning("skipped (%s): %s", kind, error)

    def _next_piece(self) -> Piece:
        """Tokenize the next document of the source furthest below its share of tokens."""
        deficit = self._weights * sum(self.mixed) - np.array(self.mixed)
        s = int(np.argmax(deficit))
        doc, epoch = self._next_document(s)
        tokens = [*self._prefix, *self.tokenizer.encode(doc.text), self.tokenizer.eos_id]
        self.mixed[s] += len(tokens)
        self.counters["documents"] += 1
        return Piece.document(tokens, s, document_key(s, doc.file, doc.line, epoch))

    # -------------------------------------------------------------------------- sequences

    def sequences(self) -> Iterator[dict[str, np.ndarray]]:
        window = self.cfg.shuffle_window if self.cfg.shuffle else 0
        while True:
            while not self.packer.ready():
                if window <= 1 and not self.window:
                    self.packer.add(self._next_piece())
                    continue
                while len(self.window) < window:
                    piece = self._next_piece()
                    self.window.append(piece)
                    self.window_ops.append(("add", piece.tokens, piece.spans))
                i = int(self.rng.integers(len(self.window)))
                self.packer.add(swap_pop(self.window, i))
                self.window_ops.append(("pop", i))
            yield self.packer.pop()

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """Stacked batches of ``batch_size`` sequences, each with the change of state it made.

        The change is small (cursors, packer, RNG, counters, and the window's additions and
        removals as ``window_ops``) so that it can travel with every batch; ``apply_delta``
        on the previous full state gives the state right after the batch.
        """
        sequences = self.sequences()
        while True:
            rows = [next(sequences) for _ in range(batch_size)]
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "source_tokens"}
            batch["source_tokens"] = np.sum([r["source_tokens"] for r in rows], axis=0)
            delta = self._light_state()
            delta["window_ops"], self.window_ops = self.window_ops, []
            yield batch, delta

    def _light_state(self) -> dict:
        return {
            "layout": {"index": self.layout.index, "count": self.layout.count},
            "cursors": [
                {**{k: v for k, v in c.items() if k != "carry"}, "current": copy.copy(c["current"])}
                for c in self.cursors
            ],
            "mixed": list(self.mixed),
            "packer": self.packer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "counters": dict(self.counters),
            "generation": self.generation,
        }

    def state_dict(self) -> dict:
        """The full state (plain data; arrays are shared, never modified in place)."""
        state = self._light_state()
        for cursor, mine in zip(state["cursors"], self.cursors, strict=True):
            cursor["carry"] = mine["carry"]
        state["window"] = [{"tokens": p.tokens, "spans": p.spans} for p in self.window]
        return state


def swap_pop(items: list, i: int):
    """Remove and return ``items[i]`` in O(1) (the last item takes its place)."""
    items[i], items[-1] = items[-1], items[i]
    return items.pop()


def apply_delta(state: dict, delta: dict) -> dict:
    """The full state after a batch: ``state`` (before it) updated by the batch's ``delta``."""
    window = list(state["window"])
    for op in delta["window_ops"]:
        if op[0] == "add":
            window.append({"tokens": op[1], "spans": op[2]})
        else:
            swap_pop(window, op[1])
    new = {k: v for k, v in delta.items() if k != "window_ops"}
    for cursor, old in zip(new["cursors"], state["cursors"], strict=True):
        cursor["carry"] = old["carry"]
    new["window"] = window
    return new
