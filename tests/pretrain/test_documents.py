"""Reading documents from jsonl (plain, gzip, zstd) and parquet files, and reporting bad data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pretrain.data.documents import (
    RECORD_ERRORS,
    CorpusError,
    Document,
    detect_format,
    iter_records,
    read_documents,
)

WEB = Path("/work/shared/data/web")

RECORDS = [
    {"id": "a", "text": "Plain ASCII text.\n\nWith a second paragraph."},
    {"id": "b", "text": "Accents: café, Zürich, Søren — and “curly quotes”."},
    {"id": 7, "text": "CJK 河川 and emoji 🙂, tabs\tand\r\ncarriage returns, U+2028:\u2028end."},
    {"text": "No id here; the reader makes one from the file and line."},
    {"id": "e", "text": ""},
]


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def errors_of(path: str, **kw) -> CorpusError:
    with pytest.raises(CorpusError) as info:
        list(read_documents(path, **kw))
    return info.value


# ------------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "name", ["cc_en_head-0091.jsonl.gz", "cc_en_head-0174.jsonl.gz", "documents-000.json.gz"]
)
def test_shared_web_files_are_read_completely(name):
    path = WEB / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    with gzip.open(path, "rb") as f:
        expected = [json.loads(line) for line in f if line.strip()]
    docs = list(read_documents(str(path)))
    assert len(docs) == len(expected) > 0
    assert [d.text for d in docs] == [r["text"] for r in expected]
    assert [d.id for d in docs] == [r["id"] for r in expected]
    assert [d.line for d in docs] == list(range(1, len(expected) + 1))
    assert all(d.file == str(path) and d.text for d in docs)


# ---------------------------------------------------------------------------------- formats


def test_every_format_gives_the_same_documents(tmp_path):
    data = jsonl_bytes(RECORDS)
    paths = {
        "jsonl": write(tmp_path / "docs.jsonl", data),
        "jsonl.gz": write(tmp_path / "docs.jsonl.gz", gzip.compress(data)),
        "jsonl.zst": write(tmp_path / "docs.jsonl.zst", zstandard.ZstdCompressor().compress(data)),
        "parquet": str(tmp_path / "docs.parquet"),
    }
    table = pa.table(
        {
            "id": [None if "id" not in r else str(r["id"]) for r in RECORDS],
            "text": [r["text"] for r in RECORDS],
            "score": list(range(len(RECORDS))),
        }
    )
    pq.write_table(table, paths["parquet"], row_group_size=2)
    for fmt, path in paths.items():
        assert detect_format(path) == fmt
        docs = list(read_documents(path))
        assert [d.text for d in docs] == [r["text"] for r in RECORDS], fmt
        assert [d.id for d in docs] == ["a", "b", "7", f"{path}:4", "e"], fmt
        assert [d.line for d in docs] == [1, 2, 3, 4, 5], fmt
        assert docs[0] == Document(text=RECORDS[0]["text"], id="a", file=path, line=1)


def test_an_explicit_format_overrides_the_suffix_and_text_field_is_configurable(tmp_path):
    data = jsonl_bytes([{"content": "x", "uid": 1}, {"content": "y", "uid": 2}])
    path = write(tmp_path / "docs.data", gzip.compress(data))
    docs = list(read_documents(path, text_field="content", format="jsonl.gz", id_field="uid"))
    assert [(d.text, d.id) for d in docs] == [("x", "1"), ("y", "2")]


def test_empty_lines_are_skipped_but_counted(tmp_path):
    data = b'\n{"text": "one"}\n   \n\n{"text": "two"}\n{"text": "three"}'  # no final newline
    path = write(tmp_path / "gaps.jsonl", data)
    assert [(d.text, d.line) for d in read_documents(path)] == [
        ("one", 2),
        ("two", 5),
        ("three", 6),
    ]


def test_concatenated_gzip_members_and_zstd_frames_are_read_whole(tmp_path):
    a, b = jsonl_bytes(RECORDS[:2]), jsonl_bytes(RECORDS[2:])
    gz = write(tmp_path / "multi.jsonl.gz", gzip.compress(a) + gzip.compress(b))
    cctx = zstandard.ZstdCompressor()
    zst = write(tmp_path / "multi.ndjson.zst", cctx.compress(a) + cctx.compress(b))
    for path in (gz, zst):
        assert [d.text for d in read_documents(path)] == [r["text"] for r in RECORDS]


def test_fsspec_urls_are_read(tmp_path):
    fs = fsspec.filesystem("memory")
    with fs.open("/corpus/docs.jsonl.gz", "wb") as f:
        f.write(gzip.compress(jsonl_bytes(RECORDS)))
    docs = list(read_documents("memory://corpus/docs.jsonl.gz"))
    assert [d.text for d in docs] == [r["text"] for r in RECORDS]
    local = write(tmp_path / "docs.jsonl", jsonl_bytes(RECORDS))
    assert [d.text for d in read_documents(f"file://{local}")] == [r["text"] for r in RECORDS]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.jsonl", "jsonl"),
        ("a.json", "jsonl"),
        ("a.NDJSON", "jsonl"),
        ("a.json.gz", "jsonl.gz"),
        ("s3://bucket/x/a.ndjson.gz", "jsonl.gz"),
        ("a.jsonl.zst", "jsonl.zst"),
        ("a.json.zstd", "jsonl.zst"),
        ("hf://datasets/x/train-0.parquet", "parquet"),
    ],
)
def test_detect_format_reads_the_suffix(name, fmt):
    assert detect_format(name) == fmt


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl.bz2", "a.csv", "data/a"])
def test_unknown_suffixes_are_rejected_naming_the_file(name):
    with pytest.raises(CorpusError, match=name) as info:
        detect_format(name)
    assert info.value.kind == "unknown_format" and info.value.file == name


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("lines", "line", "kind", "words"),
    [
        ([b'{"text": "ok"}', b'{"text": "ok"}', b'{"text": "broken'], 3, "invalid_json", "JSON"),
        ([b'{"text": "ok"}', b'{"text": "caf\xe9"}'], 2, "invalid_utf8", "UTF-8"),
        ([b'{"text": "ok"}', b'{"body": "no text"}'], 2, "missing_text", "'text'"),
        ([b'{"text": 42}'], 1, "missing_text", "not a string"),
        ([b'{"text": null}'], 1, "missing_text", "not a string"),
        ([b'{"text": "ok"}', b'["text", "a list"]'], 2, "invalid_json", "JSON object"),
    ],
)
def test_bad_records_raise_naming_file_and_line(tmp_path, lines, line, kind, words):
    for suffix, pack in [(".jsonl", bytes), (".jsonl.gz", gzip.compress)]:
        path = write(tmp_path / f"bad{suffix}", pack(b"\n".join(lines) + b"\n"))
        err = errors_of(path)
        assert (err.file, err.line, err.kind) == (path, line, kind)
        assert f"{path}:{line}:" in str(err) and words in str(err)
        assert kind in RECORD_ERRORS


def test_iter_records_yields_bad_records_and_goes_on(tmp_path):
    path = write(tmp_path / "mixed.jsonl", b'{"text": "a"}\n{oops\n{"text": "b"}\n')
    out = list(iter_records(path))
    assert [type(x) for x in out] == [Document, CorpusError, Document]
    assert (out[1].line, out[1].kind) == (2, "invalid_json")
    assert [out[0].text, out[2].text] == ["a", "b"]


def test_a_missing_file_raises_naming_it(tmp_path):
    path = str(tmp_path / "nowhere.jsonl.gz")
    err = errors_of(path)
    assert err.kind == "missing_file" and path in str(err)


def test_truncated_gzip_raises_naming_file_and_line(tmp_path):
    data = gzip.compress(jsonl_bytes(RECORDS * 50))
    path = write(tmp_path / "cut.jsonl.gz", data[: len(data) - 30])
    err = errors_of(path)
    assert err.kind == "truncated" and err.line is not None and err.line > 1
    assert f"{path}:{err.line}:" in str(err)


def test_truncated_zstd_raises_naming_file_and_line(tmp_path):
    data = zstandard.ZstdCompressor().compress(jsonl_bytes(RECORDS * 50))
    path = write(tmp_path / "cut.jsonl.zst", data[: len(data) - 30])
    err = errors_of(path)
    assert err.kind == "truncated" and err.line is not None
    assert f"{path}:{err.line}:" in str(err)


def test_corrupt_gzip_raises_naming_the_file(tmp_path):
    path = write(tmp_path / "junk.jsonl.gz", b"this is not gzip at all")
    err = errors_of(path)
    assert err.kind == "unreadable" and path in str(err)


def test_parquet_without_the_text_column_raises_naming_it(tmp_path):
    path = str(tmp_path / "notext.parquet")
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    err = errors_of(path)
    assert err.kind == "missing_column" and path in str(err) and "'text'" in str(err)
    assert "body" in str(err)


def test_parquet_with_a_non_string_text_column_or_null_rows_raises(tmp_path):
    ints = str(tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    assert errors_of(ints).kind == "missing_column"
    nulls = str(tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), nulls)
    err = errors_of(nulls)
    assert (err.kind, err.line) == ("missing_text", 2) and f"{nulls}:2:" in str(err)


def test_a_corrupt_parquet_file_raises_naming_it(tmp_path):
    path = write(tmp_path / "junk.parquet", b"PAR1 but not really")
    err = errors_of(path)
    assert err.kind == "unreadable" and path in str(err)


def test_corpus_error_accepts_a_plain_message():
    err = CorpusError("data.sources.0.paths.0: 'x*' matches no file")
    assert str(err) == "data.sources.0.paths.0: 'x*' matches no file"
    assert isinstance(err, ValueError) and err.file is None and err.line is None
