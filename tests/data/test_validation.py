"""The validation split: fixed, disjoint from training, the same for every layout."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.data.documents import read_documents
from launcher.data.sources import is_held_out, resolve_corpus
from launcher.data.stream import document_key
from launcher.data.validation import IGNORE, build_validation
from launcher.runtime import Runtime
from launcher.task import Task
from pretrain.model import ModelConfig, build_model
from pretrain.task import PretrainTask

from .data_fixtures import (
    data_config,
    loaders,
    make_corpus,
    tokens_per_document,
)


@pytest.fixture
def setup(corpus_dir, tokenizer):
    cfg = data_config(corpus_dir, validation={"fraction": 0.15, "max_docs": 1000})
    return corpus_dir, tokenizer, cfg


def held_out_documents(cfg):
    corpus = resolve_corpus(cfg)
    out = []
    for s, source in enumerate(corpus.sources):
        for path in source.files:
            out += [(s, d) for d in read_documents(path) if is_held_out(d, cfg.validation.fraction)]
    return out


def test_validation_set_is_the_held_out_documents_byte_for_byte(setup):
    _, tokenizer, cfg = setup
    val = build_validation(cfg, resolve_corpus(cfg), tokenizer)
    held = held_out_documents(cfg)
    assert 10 <= val.documents == len(held)
    assert val.text_bytes == sum(len(d.text.encode("utf-8")) for _, d in held)
    expected_tokens = sum(len(tokenizer.encode(d.text)) + 1 for _, d in held)
    assert val.target_tokens == expected_tokens - 1  # every token but the first is a target
    again = build_validation(cfg, resolve_corpus(cfg), tokenizer)
    assert np.array_equal(val.input_ids, again.input_ids)
    assert np.array_equal(val.targets, again.targets)


def test_held_out_documents_never_reach_training(setup):
    _, tokenizer, cfg = setup
    held = {document_key(s, d.file, d.line, 0) for s, d in held_out_documents(cfg)}
    [loader] = loaders(cfg, tokenizer, 1, batch_size=8)
    batches = [b for _, b in zip(range(300), loader, strict=False)]
    trained = set(tokens_per_document(batches, epoch=0))
    assert held and not held & trained
    assert loader.stats()["data/held_out"] >= len(held)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_gets_the_same_number_of_batches_covering_the_set_once(setup, world):
    _, tokenizer, cfg = setup
    val = build_validation(cfg, resolve_corpus(cfg), tokenizer)
    shards = [val.batches(rank, world, batch_size=4) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    rows = torch.cat([b["targets"] for s in shards for b in s])
    real = rows[(rows != IGNORE).any(dim=1)]
    assert (rows != IGNORE).sum() == val.target_tokens
    assert sorted(map(tuple, real.tolist())) == sorted(
        map(tuple, val.targets[(val.targets != IGNORE).any(axis=1)].tolist())
    )


def test_separate_validation_files_are_used_whole(setup, tmp_path):
    root, tokenizer, _ = setup
    other = tmp_path / "val"
    files = make_corpus(other, seed=5)
    cfg = data_config(
        root,
        validation={"fraction": 0.0, "sources": [{"paths": [str(files["books"][0])]}]},
    )
    val = build_validation(cfg, resolve_corpus(cfg), tokenizer)
    docs = list(read_documents(str(files["books"][0])))
    assert val.documents == len(docs) == 25
    assert val.text_bytes == sum(len(d.text.encode()) for d in docs)


# ---------------------------------------------------------------- document boundaries


def validation_sets(corpus_dir, tokenizer):
    """The same held-out documents packed into 64-token rows, with and without boundaries."""
    out = {}
    for boundaries in (True, False):
        cfg = data_config(
            corpus_dir,
            seq_len=64,
            document_boundaries=boundaries,
            validation={"fraction": 0.15, "max_docs": 1000},
        )
        out[boundaries] = (cfg, build_validation(cfg, resolve_corpus(cfg), tokenizer))
    return out


def test_boundaries_add_restarting_positions_and_segments_to_the_same_rows(corpus_dir, tokenizer):
    sets = validation_sets(corpus_dir, tokenizer)
    (_, on), (_, off) = sets[True], sets[False]
    assert np.array_equal(on.input_ids, off.input_ids) and np.array_equal(on.targets, off.targets)
    assert off.position_ids is None and off.segment_ids is None
    assert all(set(b) == {"input_ids", "targets"} for b in off.batches(0, 2, batch_size=4))
    # A document starts at every row start and after every EOS (so does the final padding).
    ids = on.input_ids
    starts = np.ones_like(ids, dtype=bool)
    starts[:, 1:] = ids[:, :-1] == tokenizer.eos_id
    assert np.array_equal(on.position_ids == 0, starts)
    assert np.all((np.diff(on.position_ids, axis=1) == 1) | starts[:, 1:])
    assert np.array_equal(on.segment_ids, np.cumsum(starts, axis=1) - 1)
    real = (on.targets != IGNORE).any(axis=1)
    for world in (1, 3):  # every rank's batches carry them, all-ignored padding rows included
        shards = [on.batches(rank, world, batch_size=4) for rank in range(world)]
        rows = {k: torch.cat([b[k] for s in shards for b in s]) for k in shards[0][0]}
        assert set(rows) == {"input_ids", "targets", "position_ids", "segment_ids"}
        mine = (rows["targets"] != IGNORE).any(dim=1)
        assert sorted(map(tuple, rows["position_ids"][mine].tolist())) == sorted(
            map(tuple, on.position_ids[real].tolist())
        )


def evaluate(validation, model) -> dict[str, float]:
    """``PretrainTask.evaluate`` on one CPU process, without building a run around it."""
    task = object.__new__(PretrainTask)
    cfg = SimpleNamespace(
        train=SimpleNamespace(micro_batch_size=4), eval=SimpleNamespace(max_batches=None)
    )
    cpu = torch.device("cpu")
    runtime = Runtime(None, 0, 0, 1, cpu, torch.float32, 0, {})
    Task.__init__(task, cfg, runtime)
    task.validation = validation
    with torch.no_grad():
        return task.evaluate(model.eval())


def documents_alone(model, documents: list[np.ndarray], seq_len: int) -> tuple[float, int]:
    """Summed nats and target count of every document run by itself: the stream is the
    documents one after another, a validation row holds inputs ``[i*L, (i+1)*L)`` of it, so a
    document is cut where a row ends and each of its pieces runs alone from position 0; each
    input token is scored against the next token of the stream (the very last has none)."""
    stream = torch.from_numpy(np.concatenate(documents))
    nats, count, start = 0.0, 0, 0
    for doc in documents:
        end = start + len(doc)
        cuts = [start, *range((start // seq_len + 1) * seq_len, end, seq_len), end]
        for a, b in itertools.pairwise(cuts):
            targets = stream[a + 1 : b + 1]
            with torch.no_grad():
                logits = model(input_ids=stream[None, a:b], use_cache=False).logits[0]
            nats += F.cross_entropy(logits[: len(targets)], targets, reduction="sum").item()
            count += len(targets)
        start = end
    return nats, count


def test_eval_loss_with_boundaries_is_the_token_weighted_mean_of_documents_run_alone(
    corpus_dir, tokenizer
):
    sets = validation_sets(corpus_dir, tokenizer)
    cfg, val = sets[True]
    documents = [
        np.array([*tokenizer.encode(d.text), tokenizer.eos_id]) for _, d in held_out_documents(cfg)
    ]
    stream = np.concatenate(documents)
    assert np.array_equal(val.input_ids.reshape(-1)[: len(stream)], stream)  # same order
    model = build_model(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            d_model=32,
            n_layers=2,
            n_heads=2,
            ffn_size=64,
            max_seq_len=64,
            init_std=0.2,  # far from uniform logits: attending another document shows
        ),
        seed=0,
    )
    nats, count = documents_alone(model, documents, cfg.seq_len)
    assert count == val.target_tokens == len(stream) - 1
    expected = nats / count
    packed = evaluate(val, model)
    assert packed["eval/loss"] == pytest.approx(expected, rel=1e-5)
    assert packed["eval/bits_per_byte"] == pytest.approx(
        nats / val.text_bytes / math.log(2), rel=1e-5
    )
    # Without boundaries the same rows attend across documents: the check above can fail.
    crossing = evaluate(sets[False][1], model)["eval/loss"]
    assert abs(crossing - expected) > 1e-3
