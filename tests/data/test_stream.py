"""The training stream: exact resume, elastic resume, O(1) resume, mixing, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launcher.data.documents import read_documents
from launcher.data.loader import DataStateError
from launcher.data.packing import IGNORE
from launcher.data.sources import resolve_corpus
from launcher.data.stream import EPOCH_SHIFT, document_key

from .data_fixtures import (
    data_config,
    expected_tokens,
    loaders,
    make_corpus,
    take,
    tokens_per_document,
)


def run(cfg, tokenizer, world, n, states=None):
    """n batches from every rank (optionally after loading the saved states of all ranks)."""
    ls = loaders(cfg, tokenizer, world)
    if states is not None:
        for loader in ls:
            loader.load_state_dict(json.loads(json.dumps(states)))  # as a checkpoint would
    batches = [take(loader, n) for loader in ls]
    return batches, [loader.state_dict() for loader in ls]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.slow
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 2)])
def test_resume_gives_the_remaining_batches_token_for_token(corpus_dir, tokenizer, world, workers):
    cfg = data_config(corpus_dir, num_workers=workers)
    total = 40
    full, _ = run(cfg, tokenizer, world, total)
    for k in (3, 17):
        head, states = run(cfg, tokenizer, world, k)
        for r in range(world):
            assert_same(head[r], full[r][:k])
        # Stopping here is mid-document (the packer holds the rest of one) and mid-file.
        readers = [s for st in states for s in st["readers"].values()]
        assert any(p["spans"] for r in readers for p in r["packer"])
        assert any(c["current"] and c["current"]["start"] for r in readers for c in r["cursors"])
        tail, _ = run(cfg, tokenizer, world, total - k, states)
        for r in range(world):
            assert_same(tail[r], full[r][k:])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after"), [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((1, 0), (2, 1)), ((2, 1), (3, 2))]
)
def test_elastic_resume_reads_every_document_of_the_epoch_exactly_once(
    corpus_dir, tokenizer, before, after
):
    expected = expected_tokens(data_config(corpus_dir), tokenizer)
    cfg = data_config(corpus_dir, num_workers=before[1], document_boundaries=True)
    first, states = run(cfg, tokenizer, before[0], 7)
    cfg = data_config(corpus_dir, num_workers=after[1], document_boundaries=True)
    ls = loaders(cfg, tokenizer, after[0])
    for loader in ls:
        loader.load_state_dict(states)
    seen = [b for rank in first for b in rank]
    resumed = len(seen)
    iters = [iter(loader) for loader in ls]
    for _ in range(500):  # until every document of epoch 0 is complete
        seen.extend(next(it) for it in iters)
        counts = tokens_per_document(seen, epoch=0)
        if all(counts.get(k, 0) >= n for k, n in expected.items()):
            break
    assert set(counts) == set(expected)  # nothing missing, nothing foreign
    assert counts == expected  # and no document read twice (token counts exact)

    # Every token is a target exactly once, in order, across the resume; only the first token
    # of a document that began a reader's stream (one per reader) is never a target.
    old, new = before[0] * max(1, before[1]), after[0] * max(1, after[1])
    ids = expected_ids(cfg, tokenizer)
    got = targets_per_document(seen, epoch=0)
    assert set(got) == set(ids)
    whole = {k for k in ids if got[k] == ids[k]}
    began = {k for k in ids if got[k] == ids[k][1:]}
    assert whole | began == set(ids)
    assert len(began) <= old + max(0, new - old)
    # The overlap token of an old packer that does not start a new one is not a target again.
    ignored = sum(int((b["targets"] == IGNORE).sum()) for b in seen[resumed:])
    assert ignored == max(0, old - new)
    # A segment (attention block) never holds two documents.
    for batch in seen:
        same_segment = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
        same_document = batch["doc_keys"][:, 1:] == batch["doc_keys"][:, :-1]
        assert bool((same_document | ~same_segment).all())


def expected_ids(cfg, tokenizer) -> dict[int, list[int]]:
    """The tokens of every document of the corpus, keyed like ``tokens_per_document``."""
    corpus = resolve_corpus(cfg)
    out = {}
    for s, source in enumerate(corpus.sources):
        for path in source.files:
            for doc in read_documents(path):
                ids = [*tokenizer.encode(doc.text), tokenizer.eos_id]
                out[document_key(s, path, doc.line, 0)] = ids
    return out


def targets_per_document(batches: list[dict], epoch: int) -> dict[int, list[int]]:
    """The targets of each document of ``epoch``, in the order of ``batches``."""
    out: dict[int, list[int]] = {}
    for batch in batches:
        keys = batch["target_doc_keys"].numpy().ravel()
        targets = batch["targets"].numpy().ravel()
        for key, target in zip(keys.tolist(), targets.tolist(), strict=True):
            if key >> EPOCH_SHIFT == epoch and target != IGNORE:
                out.setdefault(key & ((1 << EPOCH_SHIFT) - 1), []).append(target)
    return out


def test_a_later_resume_reads_no_more_than_an_early_one(corpus_dir, tokenizer, monkeypatch):
    """Resume is O(1) in the position: files are reopened at the saved offsets."""
    from launcher.data import stream

    opened = []
    real_scan = stream.scan

    def recording_scan(path, **kw):
        opened.append((path, kw["start"]))
        return real_scan(path, **kw)

    monkeypatch.setattr(stream, "scan", recording_scan)
    cfg = data_config(corpus_dir, shuffle_window=4)
    cost = {}
    for k in (10, 2000):
        _, states = run(cfg, tokenizer, 1, k)
        corpus = resolve_corpus(cfg)
        reader = states[0]["readers"]["0"]
        saved = {
            (corpus.sources[s].files[c["current"]["file"]], json.dumps(c["current"]["start"]))
            for s, c in enumerate(reader["cursors"])
            if c["current"]
        }
        before = dict(reader["counters"])
        opened.clear()
        ls = loaders(cfg, tokenizer, 1)
        ls[0].load_state_dict(states)
        take(ls[0], 8)  # enough to need new documents, whatever the packer holds
        after = ls[0].stats()
        # Files in progress are reopened at their saved positions, never from the start.
        assert opened
        in_progress = {path for path, _ in saved}
        for path, start in opened:
            if path in in_progress:
                assert (path, json.dumps(start)) in saved
        cost[k] = after["data/decoded_bytes"] - before.get("decoded_bytes", 0)
    assert cost[2000] <= 2 * cost[10] + 64 * 1024, cost


def test_weighted_mix_is_realised_in_tokens_within_two_percent(corpus_dir, tokenizer):
    cfg = data_config(
        corpus_dir,
        sources=[
            {"name": "web", "paths": [str(corpus_dir / "web-*")], "weight": 0.7},
            {"name": "books", "paths": [str(corpus_dir / "books-*")], "weight": 0.3},
        ],
        track_documents=False,
        seq_len=64,
    )
    [loader] = loaders(cfg, tokenizer, 1, batch_size=100)
    take(loader, 100)  # 10,000 sequences
    stats = loader.stats()
    assert abs(stats["data/mix/web"] - 0.7) < 0.02
    assert abs(stats["data/mix/books"] - 0.3) < 0.02


def test_batches_hold_shifted_targets_and_document_positions(corpus_dir, tokenizer):
    cfg = data_config(corpus_dir, document_boundaries=True)
    [batch] = take(loaders(cfg, tokenizer, 1)[0], 1)
    assert batch["input_ids"].shape == batch["targets"].shape == (2, 32)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    starts = batch["position_ids"] == 0
    # positions restart exactly where a new segment (document) starts
    new_segment = torch.ones_like(starts)
    new_segment[:, 1:] = batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]
    assert torch.equal(starts, new_segment)
    eos = tokenizer.eos_id
    ends = batch["input_ids"][:, :-1] == eos
    assert torch.equal(ends, starts[:, 1:])  # a document starts right after every EOS


def test_documents_start_with_bos_when_configured(corpus_dir, tokenizer):
    [batch] = take(loaders(data_config(corpus_dir, add_bos=True), tokenizer, 1)[0], 1)
    ids = batch["input_ids"]
    after_eos = ids[:, 1:][ids[:, :-1] == tokenizer.eos_id]
    assert len(after_eos) > 0 and bool((after_eos == tokenizer.bos_id).all())
    [plain] = take(loaders(data_config(corpus_dir), tokenizer, 1)[0], 1)
    assert not bool((plain["input_ids"] == tokenizer.bos_id).any())


def test_a_state_from_another_corpus_is_refused(corpus_dir, tokenizer, tmp_path):
    _, states = run(data_config(corpus_dir), tokenizer, 1, 2)
    other = tmp_path / "other"
    make_corpus(other, seed=1)
    [loader] = loaders(data_config(other), tokenizer, 1)
    with pytest.raises(DataStateError, match="corpus files differ"):
        loader.load_state_dict(states)
    _, two = run(data_config(corpus_dir), tokenizer, 2, 2)
    [loader] = loaders(data_config(corpus_dir), tokenizer, 1)
    with pytest.raises(DataStateError, match="load the data states of all ranks"):
        loader.load_state_dict(two[0])


def test_the_stream_is_deterministic_and_seeded(corpus_dir, tokenizer):
    cfg = data_config(corpus_dir)
    a = take(loaders(cfg, tokenizer, 1, seed=0)[0], 5)
    b = take(loaders(cfg, tokenizer, 1, seed=0)[0], 5)
    c = take(loaders(cfg, tokenizer, 1, seed=1)[0], 5)
    assert_same(a, b)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))
    assert np.all(
        np.concatenate([x["input_ids"].numpy().ravel() for x in a]) < tokenizer.vocab_size
    )
