"""Packing: no padding, every token an input once and a target once, exact state."""

from __future__ import annotations

import random

import numpy as np

from launcher.data.packing import IGNORE, Packer, Piece, hand_over


def pieces(n: int, seed: int = 0) -> list[Piece]:
    rng = random.Random(seed)
    out, token = [], 0
    for i in range(n):
        length = rng.randint(1, 40)
        out.append(Piece.document(list(range(token, token + length)), source=i % 3, key=1000 + i))
        token += length
    return out


def drain(packer: Packer, feed: list[Piece]) -> list[dict]:
    out = []
    for piece in feed:
        packer.add(piece)
        while packer.ready():
            out.append(packer.pop())
    return out


def test_every_token_is_an_input_once_and_a_target_once():
    feed = pieces(200)
    seqs = drain(Packer(seq_len=16, track=True, n_sources=3), feed)
    inputs = np.concatenate([s["input_ids"] for s in seqs])
    targets = np.concatenate([s["targets"] for s in seqs])
    assert all(len(s["input_ids"]) == 16 for s in seqs)  # no padding, ever
    assert np.array_equal(inputs, np.arange(len(inputs)))  # consecutive, none twice
    assert np.array_equal(targets, inputs + 1)  # targets are the next token
    # doc_keys and source counts describe the inputs exactly
    keys = np.concatenate([s["doc_keys"] for s in seqs])
    lengths = {1000 + i: len(p) for i, p in enumerate(feed)}
    values, counts = np.unique(keys, return_counts=True)
    for key, count in zip(values[:-1], counts[:-1], strict=True):  # the last may be partial
        assert count == lengths[key]
    per_source = sum(s["source_tokens"] for s in seqs)
    assert per_source.sum() == len(inputs)


def test_positions_restart_at_documents_and_at_each_sequence():
    feed = [Piece.document([1, 2, 3], 0, 7), Piece.document([4, 5, 6, 7, 8, 9], 0, 8)]
    packer = Packer(seq_len=4, boundaries=True)
    first, second = drain(packer, feed)
    assert first["input_ids"].tolist() == [1, 2, 3, 4]
    assert first["position_ids"].tolist() == [0, 1, 2, 0]
    assert first["segment_ids"].tolist() == [0, 0, 0, 1]
    # the second document continues into the next sequence, where positions start again
    assert second["input_ids"].tolist() == [5, 6, 7, 8]
    assert second["position_ids"].tolist() == [0, 1, 2, 3]
    assert second["segment_ids"].tolist() == [0, 0, 0, 0]


def test_a_packer_restored_from_its_state_continues_identically():
    feed = pieces(120, seed=3)
    whole = drain(Packer(seq_len=16, boundaries=True, track=True, n_sources=3), feed)
    first = Packer(seq_len=16, boundaries=True, track=True, n_sources=3)
    head = drain(first, feed[:57])
    second = Packer(seq_len=16, boundaries=True, track=True, n_sources=3)
    second.load_state_dict(first.state_dict())
    tail = drain(second, feed[57:])
    assert len(head) + len(tail) == len(whole)
    for a, b in zip(head + tail, whole, strict=True):
        for key in a:
            assert np.array_equal(a[key], b[key]), key


def test_handed_over_leftovers_keep_every_token_an_input_once_and_a_target_once():
    old = Packer(seq_len=4, boundaries=True, track=True)
    [first] = drain(old, [Piece.document([1, 2, 3, 4, 5, 6, 7], 0, 70)])
    assert first["targets"].tolist() == [2, 3, 4, 5]
    leftovers = [Piece(p["tokens"], p["spans"]) for p in old.state_dict()]
    assert np.concatenate([p.tokens for p in leftovers]).tolist() == [5, 6, 7]  # 5: overlap
    # In another reader, behind a document of its own: 5 is an input but not a target again,
    # and the rest of document 70 is a segment of its own, not part of document 80's.
    new = Packer(seq_len=4, boundaries=True, track=True)
    new.add(Piece.document([10, 11], 0, 80))
    for piece in hand_over(leftovers):
        new.add(piece)
    [seq] = drain(new, [Piece.document([20, 21, 22], 0, 90)])[:1]
    assert seq["input_ids"].tolist() == [10, 11, 5, 6]
    assert seq["targets"].tolist() == [11, IGNORE, 6, 7]
    assert seq["segment_ids"].tolist() == [0, 0, 1, 1]
    assert seq["position_ids"].tolist() == [0, 1, 0, 1]
    assert seq["doc_keys"].tolist() == [80, 80, 70, 70]
    assert seq["target_doc_keys"].tolist() == [80, 70, 70, 70]
    # The same leftovers starting a packer: 5 is its first input, so no target is dropped.
    fresh = Packer(seq_len=2, boundaries=True)
    for piece in hand_over(leftovers):
        fresh.add(piece)
    seq = fresh.pop()
    assert seq["input_ids"].tolist() == [5, 6] and seq["targets"].tolist() == [6, 7]
