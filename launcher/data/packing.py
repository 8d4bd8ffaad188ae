"""Packing: tokenized documents in, fixed-length training sequences out, no padding.

Documents arrive as ``Piece``s (tokens ending with EOS, plus which source and document each
run of tokens came from). The packer concatenates them and cuts windows of ``seq_len + 1``
tokens that overlap by one token: ``input_ids = window[:-1]``, ``targets = window[1:]``, so
every token of the stream is an input exactly once and a target exactly once. (``targets``
are already shifted: do not hand them to a transformers model as ``labels``, which it would
shift again.)

With document boundaries on, ``position_ids`` restart at every document (and at the start of
each sequence) and ``segment_ids`` number the documents inside the sequence, from which the
task builds a block-diagonal causal mask. A segment never holds two documents: a piece that
continues a document after unrelated tokens (an elastic hand-over) begins a segment of its own.

On an elastic resume an old packer's leftovers continue in another reader's packer, where
their first token, the overlap token (already a target in the old reader), would become a
target again: the target before it is ``IGNORE`` (``HANDED_OVER``), so that across the resume
every token is still an input once and a target once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100
"""A target that the loss skips (``torch.nn.functional.cross_entropy``'s default)."""
CONTINUES, BEGINS, HANDED_OVER = 0, 1, 2
"""Values of a span's ``starts``: it continues the tokens before it; it begins a segment; it
begins a segment with a token that was a target in another reader (no target before it)."""


@dataclass(frozen=True)
class Piece:
    """Tokens plus their origin: ``spans`` rows are (source, document key, length, starts),
    ``starts`` = ``BEGINS`` when the span begins a segment (its document's start, or a
    continuation that follows unrelated tokens), ``CONTINUES`` when it continues the tokens
    before it, ``HANDED_OVER`` (see there)."""

    tokens: np.ndarray  # int32
    spans: np.ndarray  # int64, shape (n, 4)

    @classmethod
    def document(cls, tokens: list[int], source: int, key: int) -> Piece:
        spans = np.array([[source, key, len(tokens), BEGINS]], dtype=np.int64)
        return cls(np.asarray(tokens, dtype=np.int32), spans)

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self) -> list[Piece]:
        """One piece per span (per document)."""
        ends = np.cumsum(self.spans[:, 2])
        return [
            Piece(self.tokens[end - row[2] : end], row[None].copy())
            for row, end in zip(self.spans, ends, strict=True)
            if row[2]
        ]

    def tail(self, start: int) -> Piece:
        """The piece without its first ``start`` tokens."""
        if len(self.spans) == 1:  # the common case, without the searches below
            spans = self.spans.copy()
            if start:
                spans[0, 2] -= start
                spans[0, 3] = CONTINUES
            return Piece(self.tokens[start:], spans)
        ends = np.cumsum(self.spans[:, 2])
        first = int(np.searchsorted(ends, start, side="right"))
        spans = self.spans[first:].copy()
        if ends[first] - start != spans[0, 2]:
            spans[0, 2] = ends[first] - start
            spans[0, 3] = CONTINUES  # cut inside this document: the rest continues it
        return Piece(self.tokens[start:], spans)


class Packer:
    """Cuts a stream of pieces into ``seq_len + 1`` windows overlapping by one token."""

    def __init__(
        self, seq_len: int, boundaries: bool = False, track: bool = False, n_sources: int = 1
    ):
        self.seq_len = seq_len
        self.boundaries = boundaries
        self.track = track
        self.n_sources = n_sources
        self.pieces: list[Piece] = []
        self.size = 0

    def add(self, piece: Piece) -> None:
        if len(piece):
            self.pieces.append(piece)
            self.size += len(piece)

    def ready(self) -> bool:
        return self.size >= self.seq_len + 1

    def pop(self) -> dict[str, np.ndarray]:
        """The next sequence; keeps its last token as the first input of the following one."""
        need = self.seq_len + 1
        taken: list[Piece] = []
        got = 0
        while got < need:
            piece = self.pieces[0]
            if got + len(piece) <= need:
                taken.append(self.pieces.pop(0))
                got += len(piece)
            else:
                cut = need - got
                taken.append(Piece(piece.tokens[:cut], _head_spans(piece.spans, cut)))
                self.pieces[0] = piece.tail(cut)
                got = need
        # The window's last token starts the next window (one token of overlap).
        last = taken[-1]
        self.pieces.insert(0, last.tail(len(last) - 1))
        self.size -= need - 1
        return self._arrays(taken)

    def _arrays(self, taken: list[Piece]) -> dict[str, np.ndarray]:
        tokens = np.concatenate([p.tokens for p in taken]).astype(np.int64)
        spans = np.concatenate([p.spans for p in taken])
        spans = spans[spans[:, 2] > 0]
        out = {"input_ids": tokens[:-1], "targets": tokens[1:]}
        begin = np.cumsum(spans[:, 2]) - spans[:, 2]
        again = begin[(spans[:, 3] == HANDED_OVER) & (begin > 0)]
        if len(again):  # tokens that were targets in another reader are not targets again
            out["targets"] = out["targets"].copy()
            out["targets"][again - 1] = IGNORE
        last_key = spans[-1, 1]
        # Drop the overlap token from the span accounting: spans describe the inputs only.
        spans[-1, 2] -= 1
        spans = spans[spans[:, 2] > 0]
        lengths = spans[:, 2]
        out["source_tokens"] = np.bincount(
            spans[:, 0], weights=lengths, minlength=self.n_sources
        ).astype(np.int64)
        if self.boundaries:
            # A new segment at every document start (and at the sequence start).
            new = spans[:, 3].astype(bool)
            new[0] = True
            segment = np.cumsum(new) - 1
            seg_of_token = np.repeat(segment, lengths)
            starts = np.r_[0, np.flatnonzero(np.diff(seg_of_token)) + 1]
            seg_len = np.diff(np.r_[starts, len(seg_of_token)])
            out["segment_ids"] = seg_of_token
            out["position_ids"] = np.arange(len(seg_of_token)) - np.repeat(starts, seg_len)
        if self.track:
            out["doc_keys"] = np.repeat(spans[:, 1], lengths)
            # The document of each target: the inputs' keys shifted by one token.
            out["target_doc_keys"] = np.r_[out["doc_keys"][1:], last_key]
        return out

    def state_dict(self) -> list[dict]:
        return [{"tokens": p.tokens, "spans": p.spans} for p in self.pieces]

    def load_state_dict(self, pieces: list[dict]) -> None:
        self.pieces = [
            Piece(
                np.asarray(p["tokens"], np.int32), np.asarray(p["spans"], np.int64).reshape(-1, 4)
            )
            for p in pieces
        ]
        self.size = sum(len(p) for p in self.pieces)


def hand_over(pieces: list[Piece]) -> list[Piece]:
    """An old packer's leftovers as they continue in another reader's packer, each a piece of
    its own document: the first (the overlap token, a target in the old reader) begins a
    ``HANDED_OVER`` segment, so it is an input there but never a target again."""
    pieces = list(pieces)
    if pieces:
        pieces[0] = own_segment(pieces[0], HANDED_OVER)
    return pieces


def own_segment(piece: Piece, starts: int = BEGINS) -> Piece:
    """``piece`` beginning a segment of its own, wherever it is packed."""
    spans = piece.spans.copy()
    spans[0, 3] = starts
    return Piece(piece.tokens, spans)


def _head_spans(spans: np.ndarray, n: int) -> np.ndarray:
    """Spans covering the first ``n`` tokens of a piece."""
    if len(spans) == 1:
        head = spans.copy()
        head[0, 2] = n
        return head
    ends = np.cumsum(spans[:, 2])
    last = int(np.searchsorted(ends, n, side="left"))
    head = spans[: last + 1].copy()
    head[-1, 2] -= ends[last] - n
    return head
