"""Bad input in the stream: skipped and counted by default, named exactly under on_error=raise."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from launcher.data.config import DataConfig
from launcher.data.documents import CorpusError, scan
from launcher.data.loader import StreamLoader
from launcher.data.sources import check_corpus, resolve_corpus

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
    # Valid JSON whose string is not Unicode: "\ud800" decodes to a lone surrogate.
    (root / "lone_surrogate.jsonl").write_text(
        good_lines(1, "s") + '{"text": "lone surrogate \\ud800 here"}\n' + good_lines(1, "t")
    )
    (root / "deep_nesting.jsonl").write_text(
        good_lines(1, "n") + "[" * 100_000 + "]" * 100_000 + "\n" + good_lines(1, "m")
    )
    texts = pa.array(["a good row here", None, "another good row"])
    pq.write_table(pa.table({"text": texts}), root / "null_text.parquet")
    pq.write_table(pa.table({"text": not_utf8_strings()}), root / "bad_utf8.parquet")
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
        "lone surrogate": ("lone_surrogate.jsonl", "skipped_invalid_unicode", 2),
        "deep nesting": ("deep_nesting.jsonl", "skipped_invalid_json", 2),
        "parquet null text": ("null_text.parquet", "skipped_missing_text", 2),
        "parquet invalid UTF-8": ("bad_utf8.parquet", "skipped_invalid_utf8", 2),
    }


def not_utf8_strings() -> pa.Array:
    """A string column whose second value is not UTF-8 (Arrow does not check what it reads)."""
    data = b"a good row here" + b"caf\xe9 \xff" + b"another good row"
    offsets = pa.array([0, 15, 21, 37], type=pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(data)])


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
    skipped = {k: int(v) for k, v in stats.items() if k.startswith("data/skipped_") and v}
    assert skipped == expected
    assert set(expected) <= set(stats)  # every kind met is one of the names every rank reports
    # The good records around the bad ones still stream (20 + 4 + 2 + 2 + 2 + 2 + 2 documents).
    assert stats["data/documents"] >= 34
    assert "invalid_json.jsonl:3" in caplog.text and "huge.jsonl:1" in caplog.text
    assert "lone_surrogate.jsonl:2: 'text' is not valid Unicode" in caplog.text
    assert "deep_nesting.jsonl:2: invalid JSON: nested too deeply" in caplog.text


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
        "lone surrogate",
        "deep nesting",
        "parquet null text",
        "parquet invalid UTF-8",
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
    assert not [k for k, v in stats.items() if k.startswith("data/skipped_") and v]
    assert stats["data/documents"] >= 30


def test_parquet_text_may_be_dictionary_encoded(tmp_path):
    """pandas writes a categorical text column as a dictionary of strings: rows, not a skip."""
    path = tmp_path / "categorical.parquet"
    texts = pa.array(["spam", "eggs", None, "spam"]).dictionary_encode()
    pq.write_table(pa.table({"text": texts, "id": [[1], [2], [3], None]}), path)
    out = [item for item, _ in scan(str(path))]
    assert [getattr(i, "text", getattr(i, "kind", None)) for i in out] == [
        "spam",
        "eggs",
        "missing_text",
        "spam",
    ]
    assert out[0].id == "[1]" and out[3].id == f"{path}:4"


class PoisonedTokenizer:
    """The fixture's tokenizer, failing with ``error`` on any text that contains POISON."""

    def __init__(self, inner, error: BaseException):
        self._inner, self._error = inner, error

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, text: str) -> list[int]:
        if "POISON" in text:
            raise self._error
        return self._inner.encode(text)


def poisoned_file(root) -> str:
    path = root / "poisoned.jsonl"
    poison = json.dumps({"text": "river POISON town"}) + "\n"
    path.write_text(good_lines(2, "p") + poison + good_lines(2, "q"))
    return str(path)


def test_a_document_the_tokenizer_fails_on_is_skipped_with_file_and_line(
    tmp_path, tokenizer, caplog
):
    path = poisoned_file(tmp_path)
    tok = PoisonedTokenizer(tokenizer, ValueError("cannot encode this"))
    cfg = config([path])
    loader = StreamLoader(cfg, tok, resolve_corpus(cfg), batch_size=2, seed=0)
    with caplog.at_level(logging.WARNING):
        one_epoch(loader)
    stats = loader.stats()
    assert stats["data/skipped_encode_error"] == 1
    assert f"{path}:3: the tokenizer failed on it: ValueError: cannot encode this" in caplog.text
    cfg = config([path], on_error="raise")
    loader = StreamLoader(cfg, tok, resolve_corpus(cfg), batch_size=2, seed=0)
    with pytest.raises(CorpusError, match=r"poisoned\.jsonl:3: the tokenizer failed on it"):
        one_epoch(loader)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), MemoryError()])
def test_an_interrupt_or_memory_error_in_the_tokenizer_is_not_swallowed(tmp_path, tokenizer, error):
    cfg = config([poisoned_file(tmp_path)])
    tok = PoisonedTokenizer(tokenizer, error)
    loader = StreamLoader(cfg, tok, resolve_corpus(cfg), batch_size=2, seed=0)
    with pytest.raises(type(error)):
        one_epoch(loader)


def test_a_file_name_that_is_not_utf8_is_skipped_by_name(tmp_path):
    (tmp_path / "good.jsonl").write_text(good_lines(3, "f"))
    with open(bytes(tmp_path / "caf") + b"\xe9.jsonl", "w") as f:  # os.fsdecode: lone surrogate
        f.write(good_lines(3, "g"))
    corpus = resolve_corpus(config([str(tmp_path / "*.jsonl")]))
    assert [Path(f).name for f in corpus.sources[0].files] == ["good.jsonl"]
    assert corpus.problems == {"invalid_file_name": 1}
    corpus.fingerprint()  # every name left is encodable
    with pytest.raises(CorpusError, match=r"paths\.0: .*caf\\udce9\.jsonl' is not a UTF-8 file"):
        resolve_corpus(config([str(tmp_path / "*.jsonl")], on_error="raise"))


def test_every_rank_reports_the_same_data_counter_names(tmp_path, tokenizer):
    """The metrics all-reduce needs the same names on every rank, but which kinds a rank
    meets depends on its share (a rank with held-out documents and one without crashed a
    2-rank run): the names are fixed, zeros included; an unknown kind is skipped_other."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    cfg = config([str(good)])
    names = []
    for rank in (0, 1):
        loader = StreamLoader(
            cfg, tokenizer, resolve_corpus(cfg), batch_size=2, seed=0, rank=rank, world_size=2
        )
        loader._states[loader.readers[0]]["counters"]["some_new_kind"] = 2 + rank
        stats = loader.stats()
        names.append(sorted(stats))
        assert stats["data/skipped_other"] == 2 + rank
    assert names[0] == names[1]
