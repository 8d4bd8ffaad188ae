"""One reader's pipeline: its share of every source -> mix -> shuffle window -> tokenize -> pack.

A reader is one DataLoader worker of one rank. Everything it needs to continue exactly where
it stopped is in ``state``: per source a cursor (which file segment, and the file position
after the last record consumed) and the epoch it last read, the tokens taken per source (for
the mix), the shuffle window's documents, the packer's leftover tokens, the long documents in
progress, the window's RNG and the skip counters. Each segment is reopened at its saved
position; the one record re-read on resume is a long document in progress.

The shuffle window is bounded by tokens (``data.shuffle_window_tokens``, optionally also by
documents) and reads at most one epoch ahead: once a source's next epoch is read, the reader
waits for that source's older documents to leave the window before reading it again, so a
corpus of one document never holds more than two readings of it. Documents longer than
``LONG_CHARS`` never wait in the window: they stream into the packer chunk by chunk as soon
as they are read (``chunks.py``), so the first batch comes after one chunk however long the
document, and the state names such a document by its place in its file, the chunk and the
tokens of it already packed (``streams``), never by its text or its tokens.

Mixing is by *tokens*: the next document comes from the source furthest below its share of
the tokens taken so far, so a 0.7 / 0.3 mix is 0.7 / 0.3 of the training tokens (within one
document), deterministically, whatever the documents' lengths.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import numpy as np

from launcher.data.chunks import (
    CHUNK_CHARS,
    LONG_CHARS,
    chunk_end,
    encode_chunk,
    encode_chunked,
    splices_cleanly,
)
from launcher.data.config import DataConfig
from launcher.data.documents import CorpusError, Document, scan
from launcher.data.masking import Masker
from launcher.data.packing import BEGINS, CONTINUES, Packer, Piece
from launcher.data.plan import Layout, SourcePlan, new_cursor
from launcher.data.sources import ResolvedCorpus, is_held_out
from launcher.data.tokenizer import TextTokenizer

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
        "streams": [],
        "read_epoch": [0] * n_sources,
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
        masker: Masker | None = None,
    ):
        self.corpus, self.cfg, self.tokenizer = corpus, cfg, tokenizer
        self.masker = masker
        self.layout = Layout(**state["layout"])
        self.plans = [
            SourcePlan(seed, s, len(src.files), cfg.shuffle) for s, src in enumerate(corpus.sources)
        ]
        self.cursors = copy.deepcopy(state["cursors"])
        self.mixed = list(state["mixed"])
        self.window = [Piece(p["tokens"], p["spans"]) for p in state["window"]]
        self.window_tokens = sum(len(p) for p in self.window)
        self._window_epochs: Counter = Counter()  # (source, epoch mod 256) -> spans in window
        for piece in self.window:
            self._count(piece, 1)
        # Long documents in progress: {"source", "segment" (file position before the record),
        # "line", "key", "length" (characters), "chars" (where the current chunk starts),
        # "taken" (its tokens packed so far), "restart" (after a hand-over)}.
        self.streams = copy.deepcopy(state.get("streams", []))
        self._text: str | None = None  # the text of streams[0], once read
        self._chunk: np.ndarray | None = None  # the tokens of its current chunk, once encoded
        self._chunk_end = 0
        self.read_epoch = list(state.get("read_epoch") or [_epoch(c) for c in self.cursors])
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
        cap = cfg.shuffle_window
        self._shuffled = cfg.shuffle and cfg.shuffle_window_tokens > 0 and (cap is None or cap > 1)
        self._long: int | None = LONG_CHARS  # None: nothing is cut into chunks
        self._chunk_chars = CHUNK_CHARS
        if not splices_cleanly(tokenizer):
            log.warning(
                "%s does not give the same ids when a text is cut at a space: long documents "
                "are encoded whole (their first batch waits for the whole document)",
                tokenizer.source or "the tokenizer",
            )
            self._long = None

    # -------------------------------------------------------------------------- documents

    def _next_document(self, s: int) -> tuple[Document, dict]:
        """The next good, not held-out document of source ``s`` and its file segment, with
        the position before the document as its ``start`` (where it can be read again)."""
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
            before = cursor["current"]["start"]
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
            return item, {**cursor["current"], "start": before}

    def _bad(self, error: CorpusError) -> None:
        if self.cfg.on_error == "raise":
            raise error
        kind = error.kind or "unreadable"
        self.counters[f"skipped_{kind}"] += 1
        if self.counters[f"skipped_{kind}"] <= self.cfg.log_bad_records:
            log.warning("skipped (%s): %s", kind, error)

    def _source(self) -> int:
        """The source furthest below its share of the tokens taken so far."""
        return int(np.argmax(self._weights * sum(self.mixed) - np.array(self.mixed)))

    def _next_piece(self) -> Piece | None:
        """Tokenize the next document of the source furthest below its share of tokens;
        ``None`` when it is long: it then streams (``streams``) before anything else."""
        s = self._source()
        while True:  # a document the tokenizer fails on is one skipped record, not the run's end
            doc, segment = self._next_document(s)
            epoch = self.read_epoch[s] = segment["epoch"]
            key = document_key(s, doc.file, doc.line, epoch)
            if self._long is not None and len(doc.text) > self._long:
                ref = {"source": s, "segment": segment, "line": doc.line, "key": key}
                self.streams.append({**ref, "length": len(doc.text), "chars": 0, "taken": 0})
                self._text = doc.text
                self.counters["documents"] += 1
                return None
            ids = self._encode(doc.file, doc.line, self._encode_text, doc.text)
            if ids is not None:
                break
        tokens = [*self._prefix, *ids, self.tokenizer.eos_id]
        self.mixed[s] += len(tokens)
        self.counters["documents"] += 1
        return Piece.document(tokens, s, key)

    def _encode(self, file: str, line: int, encode: Callable, *args: Any) -> Any:
        """``encode(*args)``, or ``None`` (a counted ``encode_error`` skip) when the tokenizer
        fails on the document at ``file:line``."""
        try:
            return encode(*args)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as exc:  # also Rust panics: pyo3's PanicException is one
            message = f"the tokenizer failed on it: {type(exc).__name__}: {exc}"
            self._bad(CorpusError(message, file=file, line=line, kind="encode_error"))
            return None

    def _encode_text(self, text: str) -> list[int]:
        if self._long is None:
            return self.tokenizer.encode(text)
        return encode_chunked(self.tokenizer, text, self._chunk_chars)  # faster when long

    # ----------------------------------------------------------------------- long documents

    def _next_part(self) -> Piece:
        """At most ``seq_len`` more tokens of the first long document in progress.

        Its current chunk is encoded once and held here, not in the state, which says where
        the chunk starts (``chars``) and how many of its tokens the packer took (``taken``):
        a resume encodes that chunk again. So the state stays small per batch.
        """
        ref = self.streams[0]
        if self._text is None:
            self._text = self._reread(ref)
            if self._text is None:  # skipped: it cannot be read again
                self.streams.pop(0)
                return Piece.document([], ref["source"], ref["key"])
        if self._chunk is None:
            self._chunk, self._chunk_end = self._encode_chunk(ref)
        taken = ref["taken"]
        tokens = self._chunk[taken : taken + self.cfg.seq_len]
        # A part continues the tokens before it, unless they went to another reader.
        restart = len(tokens) > 0 and ref.pop("restart", False)
        starts = BEGINS if restart or ref["chars"] == taken == 0 else CONTINUES
        ref["taken"] = taken + len(tokens)
        if ref["taken"] == len(self._chunk):
            if self._chunk_end == len(self._text):
                self.streams.pop(0)
                self._text = None
            ref["chars"], ref["taken"] = self._chunk_end, 0
            self._chunk = None
        self.mixed[ref["source"]] += len(tokens)
        spans = np.array([[ref["source"], ref["key"], len(tokens), starts]], dtype=np.int64)
        return Piece(tokens, spans)

    def _encode_chunk(self, ref: dict) -> tuple[np.ndarray, int]:
        """The tokens of the chunk of ``self._text`` from ``ref["chars"]``, and its end."""
        text, start = self._text, ref["chars"]
        end = chunk_end(text, start, self._chunk_chars if self._long else len(text))
        file = self.corpus.sources[ref["source"]].files[ref["segment"]["file"]]
        chunk = text[start:end]
        encoded = self._encode(file, ref["line"], encode_chunk, self.tokenizer, chunk, start > 0)
        if encoded is None:  # the rest is skipped: the document ends here
            ids, end = [], len(text)
        else:
            ids, clean = encoded
            self.counters["chunk_cut_mismatch"] += not clean
        head = self._prefix if start == 0 else []
        tail = [self.tokenizer.eos_id] if end == len(text) else []
        return np.asarray([*head, *ids, *tail], dtype=np.int32), end

    def _reread(self, ref: dict) -> str | None:
        """The text of a long document in progress, read again from its file (on resume);
        ``None`` (a counted ``changed_file`` skip) when it is not there any more."""
        source, seg = self.corpus.sources[ref["source"]], ref["segment"]
        path = source.files[seg["file"]]
        records = scan(
            path,
            format=source.format,
            text_field=source.text_field,
            start=seg["start"],
            stripe=seg["stripe"],
            stripes=seg["stripes"],
            max_bytes=self.cfg.max_document_bytes,
        )
        item = None
        with closing(records):
            for item, _ in records:
                if item.line is not None and item.line >= ref["line"]:
                    break
        found = isinstance(item, Document) and item.line == ref["line"]
        if found and len(item.text) == ref["length"]:
            return item.text
        message = "the long document in progress is not there any more (the file changed)"
        self._bad(CorpusError(message, file=path, line=ref["line"], kind="changed_file"))
        return None

    # -------------------------------------------------------------------------- sequences

    def sequences(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            while not self.packer.ready():
                self._feed()
            yield self.packer.pop()

    def _feed(self) -> None:
        """Add to the packer: the next chunk of a long document in progress; else a document
        drawn from the window, filled first as far as its bounds allow; else the next one."""
        if self.streams:
            self.packer.add(self._next_part())
            return
        if not self._shuffled and not self.window:
            if (piece := self._next_piece()) is not None:
                self.packer.add(piece)
            return
        while self._shuffled and self._room() and not self._blocked(self._source()):
            piece = self._next_piece()
            if piece is None:
                return  # a long document: it streams first
            self.window.append(piece)
            self.window_tokens += len(piece)
            self._count(piece, 1)
            self.window_ops.append(("add", piece.tokens, piece.spans))
        i = int(self.rng.integers(len(self.window)))
        piece = swap_pop(self.window, i)
        self.window_tokens -= len(piece)
        self._count(piece, -1)
        self.window_ops.append(("pop", i))
        self.packer.add(piece)

    def _room(self) -> bool:
        cap = self.cfg.shuffle_window
        full = cap is not None and len(self.window) >= cap
        return not full and self.window_tokens < self.cfg.shuffle_window_tokens

    def _blocked(self, s: int) -> bool:
        """Source ``s`` has moved to a new epoch while its older documents are in the window:
        reading on would read further ahead."""
        now = self.read_epoch[s] % 256
        return any(src == s and epoch != now for src, epoch in self._window_epochs)

    def _count(self, piece: Piece, sign: int) -> None:
        for source, key in piece.spans[:, :2].tolist():
            slot = (source, key >> EPOCH_SHIFT)
            self._window_epochs[slot] += sign
            if not self._window_epochs[slot]:
                del self._window_epochs[slot]

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """Stacked batches of ``batch_size`` sequences, each with the change of state it made.

        The change is small (cursors, packer, RNG, counters, and the window's additions and
        removals as ``window_ops``) so that it can travel with every batch; ``apply_delta``
        on the previous full state gives the state right after the batch.

        With a ``masker`` (the masked-LM objective) ``input_ids`` are corrupted, drawn from
        the reader's RNG (saved with the state), and ``mlm_targets`` replace ``targets``.
        """
        sequences = self.sequences()
        while True:
            rows = [next(sequences) for _ in range(batch_size)]
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "source_tokens"}
            batch["source_tokens"] = np.sum([r["source_tokens"] for r in rows], axis=0)
            if self.masker is not None:
                del batch["targets"]  # next tokens mean nothing to an encoder
                batch["input_ids"], batch["mlm_targets"] = self.masker(
                    batch["input_ids"], self.rng, batch.get("segment_ids")
                )
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
            "streams": [{**r, "segment": dict(r["segment"])} for r in self.streams],
            "read_epoch": list(self.read_epoch),
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


def _epoch(cursor: dict) -> int:
    return cursor["current"]["epoch"] if cursor["current"] else cursor["epoch"]


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
