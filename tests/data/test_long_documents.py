"""Long documents stream through chunk by chunk; the shuffle window is bounded by tokens."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, models

from launcher.data import stream
from launcher.data.chunks import CHUNK_CHARS, chunk_end, encode_chunked, splices_cleanly
from launcher.data.config import DataConfig
from launcher.data.loader import _decode
from launcher.data.tokenizer import TextTokenizer, TokenizerConfig
from launcher.data.tokenizer_training import train_tokenizer

from .data_fixtures import (
    data_config,
    loaders,
    make_text,
    take,
    tokens_per_document,
    write_jsonl,
)
from .test_stream import assert_same, expected_ids, run, targets_per_document

SPACES = (
    "  two  spaces,\ttab\t\tend.\n\n  indented\r\n windows\u00a0nbsp \u3000 wide 中文字符 🤖 </s>"
)


@pytest.fixture(scope="module")
def real_tokenizers(shared_data, web_texts, tmp_path_factory) -> dict[str, TextTokenizer]:
    """The Llama and GPT-Neo tokenizer files, and sentencepiece trained on real web text."""
    out = {
        name: TextTokenizer.load(shared_data / "tokenizers" / f"{name}-test-tokenizer.json")
        for name in ("llama", "gpt-neo")
    }
    folder = tmp_path_factory.mktemp("sp")
    out["sentencepiece"] = train_tokenizer(TokenizerConfig(vocab_size=1200), web_texts, folder)
    out["sentencepiece"] = out["sentencepiece"].tokenizer
    return out


@pytest.mark.parametrize("name", ["llama", "gpt-neo", "sentencepiece"])
def test_chunks_have_the_ids_of_the_whole_document(real_tokenizers, web_texts, name):
    tok = real_tokenizers[name]
    text = "\n\n".join(web_texts) + SPACES
    assert splices_cleanly(tok)
    whole = tok.encode(text)
    for size in (64, 5000):
        assert encode_chunked(tok, text, size) == whole, size
    short = text[:20_000] + SPACES  # cut at every place a cut may go
    assert encode_chunked(tok, short, 1) == tok.encode(short)


def test_chunks_end_before_a_space_or_newline_that_follows_a_non_space():
    text = "abc  def\n\nghi jkl"
    assert chunk_end(text, 0, 1) == 3  # not inside the run of spaces
    assert chunk_end(text, 0, 4) == 8  # "\n" after "f"
    assert chunk_end(text, 0, 9) == 13
    assert chunk_end(text, 0, 14) == len(text)
    assert chunk_end("x" * 10, 0, 2) == 10  # no cut: one chunk


def test_a_tokenizer_that_merges_across_spaces_is_not_chunked():
    vocab = {"a": 0, " ": 1, "b": 2, "a ": 3, "a b": 4, "</s>": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", " "), ("a ", "b")]))
    assert not splices_cleanly(TextTokenizer(backend, eos_token="</s>"))


def one_document(tmp_path, words: int, **overrides) -> DataConfig:
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": make_text(random.Random(0), words)}])
    base = {
        "sources": [{"paths": [str(path)]}],
        "seq_len": 32,
        "validation": {"fraction": 0.0},
        "track_documents": True,
        "max_document_bytes": None,
    }
    return DataConfig.model_validate({**base, **overrides})


def test_a_long_document_gives_its_first_batch_after_one_chunk(tmp_path, tokenizer, monkeypatch):
    cfg = one_document(tmp_path, 300_000)  # 2 MB on one line
    text = json.loads((tmp_path / "one.jsonl").read_text())["text"]
    assert len(text) > 30 * CHUNK_CHARS
    encoded = []
    real = tokenizer.encode

    def counting(piece: str, **kw):
        encoded.append(len(piece))
        assert sum(encoded) < 4 * CHUNK_CHARS, "encoded far more than one chunk"
        return real(piece, **kw)

    monkeypatch.setattr(tokenizer, "encode", counting)
    [loader] = loaders(cfg, tokenizer, 1)
    [batch] = take(loader, 1)
    assert sum(encoded) < CHUNK_CHARS + 1000  # one chunk (and the tokenizer probe)
    first = real(text[: chunk_end(text, 0)])
    assert batch["input_ids"].flatten().tolist() == first[:64]
    reader = loader.state_dict()["readers"]["0"]
    # The state names the document by its place; it holds no text and at most a sequence of
    # tokens, however long the document.
    assert reader["streams"][0]["chars"] == 0 and reader["streams"][0]["taken"] > 0
    assert len(json.dumps(loader.state_dict())) < 4000


def test_a_one_document_corpus_is_never_read_more_than_once_ahead(tmp_path, tokenizer):
    cfg = one_document(tmp_path, 40)  # short: it goes through the shuffle window
    [loader] = loaders(cfg, tokenizer, 1)
    per_doc = len(tokenizer.encode(json.loads((tmp_path / "one.jsonl").read_text())["text"])) + 1
    for _ in zip(range(40), loader, strict=False):
        reader = loader._states[0]
        assert len(reader["window"]) <= 2  # this epoch's reading and at most the next one's
    packed = loader.batches * 2 * 32
    assert reader["counters"]["documents"] <= packed / per_doc + 3


def test_the_window_is_bounded_by_tokens(corpus_dir, tokenizer):
    cfg = data_config(corpus_dir, shuffle_window=None, shuffle_window_tokens=600)
    [loader] = loaders(cfg, tokenizer, 1)
    longest = 0
    for _ in zip(range(60), loader, strict=False):
        window = _decode(loader._states[0]["window"])
        sizes = [len(p["tokens"]) for p in window]
        longest = max([longest, *sizes])
        assert sum(sizes) < 600 + longest  # filling stops once the bound is reached
        assert len(window) >= 2  # and it does shuffle


@pytest.fixture
def long_corpus(tmp_path, monkeypatch):
    """Short and long documents (over 2,000 characters here, in chunks of 500, to keep the
    test small) in a multi-member gzip file, so that long documents are re-read from inside a
    member."""
    monkeypatch.setattr(stream, "LONG_CHARS", 2000)
    monkeypatch.setattr(stream, "CHUNK_CHARS", 500)
    rng = random.Random(5)
    docs = [{"text": make_text(rng, rng.choice([20, 60, 900, 2500, 4000]))} for _ in range(24)]
    write_jsonl(tmp_path / "mixed.jsonl.gz", docs, members=3)
    base = {
        "sources": [{"paths": [str(tmp_path / "mixed.jsonl.gz")]}],
        "seq_len": 32,
        "shuffle_window": 6,
        "validation": {"fraction": 0.0},
        "track_documents": True,
        "document_boundaries": True,
    }
    return lambda **kw: DataConfig.model_validate({**base, **kw})


def test_resume_inside_a_long_document_is_exact(long_corpus, tokenizer):
    cfg = long_corpus(num_workers=0)
    full, _ = run(cfg, tokenizer, 1, 60)
    streaming = 0
    for k in (11, 23, 37):
        head, states = run(cfg, tokenizer, 1, k)
        reader = states[0]["readers"]["0"]
        streaming += bool(reader["streams"] and reader["streams"][0]["taken"])
        tail, _ = run(cfg, tokenizer, 1, 60 - k, states)
        assert_same(head[0] + tail[0], full[0])
    assert streaming >= 2  # most stops fell inside a long document


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [((1, 2), (1, 1)), ((1, 1), (2, 1))])
def test_elastic_resume_inside_long_documents_reads_every_token_once(
    long_corpus, tokenizer, before, after
):
    cfg = long_corpus(num_workers=before[1])
    ids = expected_ids(cfg, tokenizer)
    first, states = run(cfg, tokenizer, before[0], 9)
    readers = [r for part in states for r in part["readers"].values()]
    assert any(r["streams"] for r in readers)  # a long document was in progress
    cfg = long_corpus(num_workers=after[1])
    ls = loaders(cfg, tokenizer, after[0])
    for loader in ls:
        loader.load_state_dict(states)
    seen = [b for rank in first for b in rank]
    iters = [iter(loader) for loader in ls]
    for _ in range(2000):
        seen.extend(next(it) for it in iters)
        counts = tokens_per_document(seen, epoch=0)
        if all(counts.get(k, 0) >= len(v) for k, v in ids.items()):
            break
    assert counts == {k: len(v) for k, v in ids.items()}
    got = targets_per_document(seen, epoch=0)
    old, new = before[0] * max(1, before[1]), after[0] * max(1, after[1])
    began = [k for k in ids if got[k] != ids[k]]
    assert all(got[k] == ids[k][1:] for k in began) and len(began) <= max(old, new)
    for batch in seen:
        same_segment = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
        same_document = batch["doc_keys"][:, 1:] == batch["doc_keys"][:, :-1]
        assert bool((same_document | ~same_segment).all())
