"""Bad input in the stream: skipped and counted by default, named exactly under on_error=raise."""

from __future__ import annotations

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pretrain.data.config import DataConfig
from pretrain.data.documents import CorpusError
from pretrain.data.loader import StreamLoader
from pretrain.data.sources import check_corpus, resolve_corpus

from .data_fixtures import make_text


def good_lines(n: int, tag: str) -> str:
    import random

    rng = random.Random(tag)
    return "".join(
        json.dumps({"id": f"{tag}-{i}", "text": make_text(rng, 40)}) + "\n" for i in range(n)
    )


def write_bad_files(root) -> dict[str, tuple[str, str, int | None]]:
    """kind -> (file name, counter it must raise, line in the message or None)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a-good.jsonl").write_text(good_lines(20, "good"))
    blob = gzip.compress(good_lines(30, "gz").encode(), mtime=0)
    (root / "truncated.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    blob = zstandard.ZstdCompressor().compress(good_lines(30, "zst").encode())
    (root / "truncated.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    (root / "invalid_json.jsonl").write_text(
        good_lines(2, "j") + "{not json\n" + good_lines(2, "k")
    )
    (root / "invalid_utf8.jsonl").write_bytes(
        good_lines(1, "u").encode() + b'{"text": "caf\xe9 \xff"}\n' + good_lines(1, "v").encode()
    )
    (root / "missing_text.jsonl").write_text('{"id": 1, "body": "no text field"}\n')
    (root / "nonstring_text.jsonl").write_text('{"text": 42}\n')
    (root / "empty_text.jsonl").write_text('{"text": ""}\n')
    (root / "huge.jsonl").write_text(json.dumps({"text": "x" * 10_000_000}) + "\n")
    pq.write_table(pa.table({"body": ["no text column"] * 3}), root / "no_text.parquet")
    return {
        "truncated gzip": ("truncated.jsonl.gz", "skipped_truncated", None),
        "truncated zstd": ("truncated.jsonl.zst", "skipped_truncated", None),
        "invalid JSON": ("invalid_json.jsonl", "skipped_invalid_json", 3),
        "invalid UTF-8": ("invalid_utf8.jsonl", "skipped_invalid_utf8", 2),
        "missing text": ("missing_text.jsonl", "skipped_missing_text", 1),
        "non-string text": ("nonstring_text.jsonl", "skipped_missing_text", 1),
        "empty text": ("empty_text.jsonl", "skipped_empty_text", 1),
        "10 MB document": ("huge.jsonl", "skipped_too_long", 1),
        "parquet without text": ("no_text.parquet", "skipped_missing_column", None),
    }


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, write_bad_files(root)


def config(paths: list[str], **extra) -> DataConfig:
    return DataConfig.model_validate(
        {
            "sources": [{"name": "mixed", "paths": paths}],
            "seq_len": 32,
            "shuffle": False,
            "num_workers": 0,
            "validation": {"fraction": 0.0},
            **extra,
        }
    )


def one_epoch(loader: StreamLoader) -> None:
    """Iterate until the reader has finished the first pass over every file."""
    for i, _ in enumerate(loader):
        state = loader._states[loader.readers[0]]
        if state["cursors"][0]["epoch"] >= 1 or i > 5000:
            return


def test_every_bad_input_is_skipped_counted_and_logged(bad_dir, tokenizer, caplog):
    root, cases = bad_dir
    paths = [str(root / "a-good.jsonl")] + [str(root / f) for f, _, _ in cases.values()]
    paths += [str(root / "absent.jsonl"), str(root / "nothing-*.jsonl")]
    cfg = config(paths)
    corpus = resolve_corpus(cfg)
    check_corpus(corpus)  # one good file is enough to train
    loader = StreamLoader(cfg, tokenizer, corpus, batch_size=2, seed=0)
    with caplog.at_level(logging.WARNING):
        one_epoch(loader)
    stats = loader.stats()
    expected: dict[str, int] = {}
    for _, counter, _ in cases.values():
        expected[f"data/{counter}"] = expected.get(f"data/{counter}", 0) + 1
    expected["data/skipped_missing_file"] = 1
    expected["data/skipped_empty_glob"] = 1
    skipped = {k: int(v) for k, v in stats.items() if k.startswith("data/skipped_")}
    assert skipped == expected
    # The good records around the bad ones still stream (20 + 4 + 2 documents).
    assert stats["data/documents"] >= 26
    assert "invalid_json.jsonl:3" in caplog.text and "huge.jsonl:1" in caplog.text


@pytest.mark.parametrize(
    "case",
    [
        "truncated gzip",
        "truncated zstd",
        "invalid JSON",
        "invalid UTF-8",
        "missing text",
        "non-string text",
        "empty text",
        "10 MB document",
        "parquet without text",
    ],
)
def test_on_error_raise_stops_at_the_bad_input_naming_file_and_line(bad_dir, tokenizer, case):
    root, cases = bad_dir
    name, _, line = cases[case]
    cfg = config([str(root / "a-good.jsonl"), str(root / name)], on_error="raise")
    loader = StreamLoader(cfg, tokenizer, resolve_corpus(cfg), batch_size=2, seed=0)
    with pytest.raises(CorpusError) as info:
        one_epoch(loader)
    message = str(info.value)
    assert name in message
    if line is not None:
        assert f"{name}:{line}" in message


@pytest.mark.parametrize("missing", ["absent.jsonl", "nothing-*.jsonl"])
def test_on_error_raise_names_the_config_key_of_a_missing_path(bad_dir, missing):
    root, _ = bad_dir
    cfg = config([str(root / "a-good.jsonl"), str(root / missing)], on_error="raise")
    with pytest.raises(
        CorpusError, match=r"data\.sources\.0\.paths\.1: .*" + missing.replace("*", r"\*")
    ):
        resolve_corpus(cfg)


def test_a_corpus_without_any_good_document_fails_before_training(bad_dir):
    root, _ = bad_dir
    header_only = root / "header_only.jsonl.gz"
    header_only.write_bytes(gzip.compress(good_lines(5, "h").encode(), mtime=0)[:15])
    names = ["missing_text.jsonl", "empty_text.jsonl", "huge.jsonl", "no_text.parquet"]
    cfg = config([str(header_only), *(str(root / n) for n in names)])
    with pytest.raises(CorpusError, match="yields no documents") as info:
        check_corpus(resolve_corpus(cfg), max_bytes=cfg.max_document_bytes)
    for kind in ("truncated", "missing_text", "empty_text", "too_long", "missing_column"):
        assert kind in str(info.value)
    with pytest.raises(CorpusError, match="has no files"):
        resolve_corpus(config([str(root / "nothing-*.jsonl")]))


def test_real_web_documents_stream_without_a_single_skip(shared_data, tokenizer):
    web = shared_data / "web"
    cfg = config([str(web / "*.jsonl.gz"), str(web / "documents-000.json.gz")])
    loader = StreamLoader(cfg, tokenizer, resolve_corpus(cfg), batch_size=4, seed=0)
    one_epoch(loader)
    stats = loader.stats()
    assert not [k for k in stats if k.startswith("data/skipped_")]
    assert stats["data/documents"] >= 30
