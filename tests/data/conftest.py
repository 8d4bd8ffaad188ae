"""Fixtures shared by the data tests: a small two-source corpus and a tokenizer for it."""

from __future__ import annotations

import pytest

from .data_fixtures import make_corpus, train_small_tokenizer


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Source `web` (5 files, short documents) and `books` (2 files, long documents)."""
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root)
    return root


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A 400-token sentencepiece BPE trained on text like the corpus's."""
    return train_small_tokenizer(None, tmp_path_factory.mktemp("tok"))
