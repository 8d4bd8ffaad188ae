"""The validation split: fixed, disjoint from training, the same for every layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data.documents import read_documents
from pretrain.data.sources import is_held_out, resolve_corpus
from pretrain.data.stream import document_key
from pretrain.data.validation import IGNORE, build_validation

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
