"""Reading documents from jsonl (plain, gzip, zstd) and parquet files, and reporting bad data."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import tracemalloc
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from launcher.data.documents import (
    RECORD_ERRORS,
    CorpusError,
    Document,
    detect_format,
    iter_records,
    read_documents,
    scan,
)

WEB = Path("/work/shared/data/web")

RECORDS = [
    {"id": "a", "text": "Plain ASCII text.\n\nWith a second paragraph."},
    {"id": "b", "text": "Accents: café, Zürich, Søren — and “curly quotes”."},
    {"id": 7, "text": "CJK 河川 and emoji 🙂, tabs\tand\r\ncarriage returns, U+2028:\u2028end."},
    {"text": "No id here; the reader makes one from the file and line."},
    {"id": "e", "text": "  A last one, with spaces around.  "},
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


# --------------------------------------------------------------------- scan: resume, stripes


def varied_lines(n: int = 70) -> list[bytes]:
    """Documents of varied length, with empty lines and bad records among them."""
    rng = random.Random(n)
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(["river", "Zürich", "hill", "🙂", "dune"]) for _ in range(i))
        lines.append(json.dumps({"id": f"d{i}", "text": f"Doc {i}. {words}"}).encode())
    lines[5] = lines[31] = b""
    lines[9] = b"   "
    lines[12] = b'{"text": "bro'
    lines[20] = b'{"text": "caf\xe9"}'
    lines[26] = b'{"body": "no text"}'
    lines[40] = b'{"text": " \\n "}'
    return lines


def cut(data: bytes, every: int) -> list[bytes]:
    return [data[i : i + every] for i in range(0, len(data), every)]


def make_file(tmp_path: Path, kind: str, lines: list[bytes] | None = None) -> str:
    data = b"\n".join(lines or varied_lines()) + b"\n"
    if kind == "jsonl":
        return write(tmp_path / "f.jsonl", data)
    if kind == "gz":
        return write(tmp_path / "f.jsonl.gz", gzip.compress(data))
    if kind == "gz-members":  # BGZF-like: members end mid-line; one is empty
        parts = [gzip.compress(p) for p in cut(data, 97)]
        parts.insert(3, gzip.compress(b""))
        return write(tmp_path / "m.jsonl.gz", b"".join(parts))
    if kind == "zst":
        return write(tmp_path / "f.jsonl.zst", zstandard.ZstdCompressor().compress(data))
    if kind == "zst-frames":
        cctx = zstandard.ZstdCompressor(write_checksum=True)
        return write(tmp_path / "f.jsonl.zst", b"".join(cctx.compress(p) for p in cut(data, 211)))
    path = str(tmp_path / "f.parquet")  # rows of varied length, some null or blank
    texts: list[str | None] = [f"Row {i}. " + "Zürich 🙂 " * i for i in range(60)]
    texts[3], texts[10], texts[11] = None, "", "  "
    ids = [f"r{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"text": texts, "id": ids}), path, row_group_size=7)
    return path


KINDS = ["jsonl", "gz", "gz-members", "zst-frames", "parquet"]


def key(item: Document | CorpusError) -> tuple:
    if isinstance(item, CorpusError):
        return ("error", item.kind, item.line)
    return ("doc", item.text, item.id, item.line)


def keys(items) -> list[tuple]:
    return [(key(item), pos) for item, pos in items]


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_at_every_position_gives_exactly_the_rest_of_the_file(tmp_path, kind):
    path = make_file(tmp_path, kind)
    full = keys(scan(path))
    assert sum(k[0] == "doc" for k, _ in full) > 40 and any(k[0] == "error" for k, _ in full)
    for i, (_, pos) in enumerate(full):
        assert json.loads(json.dumps(pos)) == pos
        assert all(type(v) is int for v in pos.values())
        assert keys(scan(path, start=pos)) == full[i + 1 :], (i, pos)
    assert list(scan(path, start=full[-1][1])) == []


@pytest.mark.parametrize("kind", KINDS)
def test_three_stripes_are_disjoint_and_together_the_whole_file(tmp_path, kind):
    path = make_file(tmp_path, kind)
    full = [key(item) for item, _ in scan(path)]
    stripes = [[key(item) for item, _ in scan(path, stripe=s, stripes=3)] for s in range(3)]
    for s, items in enumerate(stripes):
        assert items and all((k[-1] - 1) % 3 == s for k in items)
    assert sorted(itertools.chain(*stripes), key=lambda k: k[-1]) == full


@pytest.mark.parametrize("kind", KINDS)
def test_a_resume_in_a_stripe_continues_that_stripe_only(tmp_path, kind):
    path = make_file(tmp_path, kind)
    stripe = keys(scan(path, stripe=1, stripes=3))
    for i, (_, pos) in enumerate(stripe):
        assert keys(scan(path, start=pos, stripe=1, stripes=3)) == stripe[i + 1 :]


@pytest.mark.parametrize("kind", KINDS)
def test_a_position_is_a_place_in_the_file_whatever_the_striping(tmp_path, kind):
    path = make_file(tmp_path, kind)
    full = [key(item) for item, _ in scan(path)]
    for _, pos in list(scan(path, stripe=1, stripes=3))[::4]:
        rest = [k for k in full if k[-1] > pos.get("line", pos.get("row"))]
        assert [key(i) for i, _ in scan(path, start=pos)] == rest
        halves = [key(i) for i, _ in scan(path, start=pos, stripe=0, stripes=2)]
        assert halves == [k for k in rest if (k[-1] - 1) % 2 == 0]


@pytest.mark.parametrize("kind", ["jsonl", "gz-members", "parquet"])
def test_records_of_other_stripes_are_not_parsed(tmp_path, kind):
    path = make_file(tmp_path, kind)
    counts = []
    for s in range(3):
        stats: dict[str, int] = {}
        n = sum(
            isinstance(item, Document) for item, _ in scan(path, stripe=s, stripes=3, stats=stats)
        )
        counts.append(stats["parsed_records"])
        assert n <= stats["parsed_records"] <= n + 3
    whole: dict[str, int] = {}
    list(scan(path, stats=whole))
    assert sum(counts) == whole["parsed_records"]


def test_other_stripes_bad_bytes_go_unnoticed(tmp_path):
    lines = [b'{"text": "ok"}', b'{"text": "caf\xe9"}', b"{oops", b'{"text": "fine"}']
    path = make_file(tmp_path, "jsonl", lines)
    assert [key(i) for i, _ in scan(path, stripe=0, stripes=3)] == [
        ("doc", "ok", f"{path}:1", 1),
        ("doc", "fine", f"{path}:4", 4),
    ]


# ------------------------------------------------------------------------------ resume cost

MEMBER = 64 << 10


@pytest.fixture(scope="module")
def big_lines() -> list[bytes]:
    """About 3 MB of JSON lines."""
    rng = random.Random(1)
    vocab = ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(2, 9))) for _ in range(3000)]
    return [
        json.dumps({"id": i, "text": " ".join(rng.choices(vocab, k=rng.randint(50, 400)))}).encode()
        for i in range(2200)
    ]


def first_record_stats(path: str, pos: dict) -> dict[str, int]:
    stats: dict[str, int] = {}
    items = scan(path, start=pos, stats=stats)
    next(items)
    items.close()
    return stats


def inner_positions(lines: list[bytes], unit: int) -> tuple[int, int]:
    """Indices of records whose next line lies within one unit: near the start, and the last
    more than one read chunk (1 MiB) before the end of the file."""
    ends = list(itertools.accumulate(len(x) + 1 for x in lines))
    inside = [i for i in range(len(lines) - 1) if ends[i] // unit == (ends[i + 1] - 1) // unit]
    return inside[0], max(i for i in inside if ends[-1] - ends[i] > 1 << 20)


@pytest.mark.parametrize("kind", ["jsonl", "gz-bgzf", "zst-frames"])
def test_a_resume_near_the_end_decodes_no_more_than_one_near_the_start(tmp_path, big_lines, kind):
    data = b"\n".join(big_lines) + b"\n"
    assert len(data) > 3_000_000
    unit = {"jsonl": 1 << 20, "gz-bgzf": MEMBER, "zst-frames": 4 * MEMBER}[kind]
    if kind == "jsonl":
        path = write(tmp_path / "big.jsonl", data)
    elif kind == "gz-bgzf":
        path = write(tmp_path / "big.jsonl.gz", b"".join(gzip.compress(p) for p in cut(data, unit)))
    else:
        cctx = zstandard.ZstdCompressor()
        path = write(
            tmp_path / "big.jsonl.zst", b"".join(cctx.compress(p) for p in cut(data, unit))
        )
    positions = [pos for _, pos in scan(path)]
    near, far = inner_positions(big_lines, unit)
    near_stats = first_record_stats(path, positions[near])
    far_stats = first_record_stats(path, positions[far])
    print(kind, "near", near_stats, "far", far_stats)
    assert far_stats["decoded_bytes"] <= unit and near_stats["decoded_bytes"] <= unit
    if kind != "zst-frames":  # zstd decodes by 128 KiB block: the far one may need one more
        assert far_stats["decoded_bytes"] <= near_stats["decoded_bytes"]
    assert far_stats["read_bytes"] <= near_stats["read_bytes"] <= 1 << 20
    assert far_stats["parsed_records"] == 1


def test_a_parquet_resume_converts_rows_of_one_row_group_at_most(tmp_path):
    path = str(tmp_path / "big.parquet")
    texts = [f"row {i} " + "x" * (i % 50) for i in range(6000)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=500)
    positions = [pos for _, pos in scan(path)]
    for i in (0, 4321, 5998):
        stats = first_record_stats(path, positions[i])
        assert stats["parsed_records"] < 500
    stats: dict[str, int] = {}
    assert [d.text for d, _ in scan(path, start=positions[4321], stats=stats)] == texts[4322:]
    assert stats["parsed_records"] == 6000 - 4322


# ---------------------------------------------------------------------- scan: bad records


@pytest.mark.parametrize("kind", ["jsonl", "gz-members", "zst-frames"])
def test_each_bad_record_is_yielded_with_its_position_and_the_scan_goes_on(tmp_path, kind):
    lines = [
        b'{"text": "first"}',
        b'{"text": "bro',
        b'{"text": "caf\xe9"}',
        b'{"body": "no text"}',
        b'{"text": null}',
        b'{"text": 42}',
        b'{"text": ""}',
        b'{"text": " \\t\\n "}',
        json.dumps({"text": "y" * 3000}).encode(),
        b'["a", "list"]',
        b'{"text": "lone \\ud800"}',
        b'{"text": "last"}',
    ]
    path = make_file(tmp_path, kind, lines)
    out = list(scan(path, max_bytes=1000))
    kinds = [i.kind if isinstance(i, CorpusError) else "doc" for i, _ in out]
    assert kinds == [
        "doc",
        "invalid_json",
        "invalid_utf8",
        "missing_text",
        "missing_text",
        "missing_text",
        "empty_text",
        "empty_text",
        "too_long",
        "invalid_json",
        "invalid_unicode",
        "doc",
    ]
    # invalid_record is the net for the unforeseen; encode_error is the tokenizer's (stream)
    assert set(kinds) - {"doc"} == RECORD_ERRORS - {"invalid_record", "encode_error"}
    for n, (item, pos) in enumerate(out):
        assert item.line == n + 1 and pos["line"] == n + 1
        if isinstance(item, CorpusError):
            assert item.file == path and f"{path}:{n + 1}:" in str(item)
        assert [key(i) for i, _ in scan(path, start=pos, max_bytes=1000)] == [
            key(i) for i, _ in out[n + 1 :]
        ]
    assert "3012 bytes" in str(out[8][0])


def test_parquet_null_empty_and_too_long_rows_are_yielded(tmp_path):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"text": ["a", None, " ", "z" * 50, "b"]}), path, row_group_size=2)
    out = [key(i) for i, _ in scan(path, max_bytes=20)]
    assert out == [
        ("doc", "a", f"{path}:1", 1),
        ("error", "missing_text", 2),
        ("error", "empty_text", 3),
        ("error", "too_long", 4),
        ("doc", "b", f"{path}:5", 5),
    ]


@pytest.mark.parametrize("kind", ["jsonl", "gz", "zst"])
def test_a_10_mb_line_is_too_long_without_being_held_in_memory(tmp_path, kind):
    huge = b'{"text": "' + b"x" * (10 << 20) + b'"}'
    path = make_file(tmp_path, kind, [b'{"text": "a"}', huge, b'{"text": "b"}'])
    del huge
    tracemalloc.start()
    try:
        out = [(key(i), pos["line"]) for i, pos in scan(path, max_bytes=1 << 20)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [k[:2] for k, _ in out] == [("doc", "a"), ("error", "too_long"), ("doc", "b")]
    assert [line for _, line in out] == [1, 2, 3]
    assert peak < 5 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_empty_texts_are_errors_to_scan_but_skipped_by_read_documents(tmp_path):
    path = make_file(tmp_path, "jsonl", [b'{"text": "a"}', b'{"text": "  "}', b'{"text": "b"}'])
    assert [type(r) for r in iter_records(path)] == [Document, CorpusError, Document]
    assert [d.text for d in read_documents(path)] == ["a", "b"]


# --------------------------------------------------------------------- scan: broken files


def scan_until_error(path: str, **kw) -> tuple[list, CorpusError]:
    out = []
    with pytest.raises(CorpusError) as info:
        for item, _ in scan(path, **kw):
            out.append(key(item))
    assert path in str(info.value)
    return out, info.value


def test_file_level_problems_raise_after_the_good_records(tmp_path, big_lines):
    data = b"\n".join(big_lines[:300]) + b"\n"
    members = [gzip.compress(p) for p in cut(data, 50_000)]
    whole = write(tmp_path / "whole.jsonl.gz", b"".join(members))
    full = [key(i) for i, _ in scan(whole)]
    cctx = zstandard.ZstdCompressor()
    frames = b"".join(cctx.compress(p) for p in cut(data, 50_000))
    broken = {
        "truncated": write(tmp_path / "cut.jsonl.gz", b"".join(members)[:-500]),
        "unreadable": write(tmp_path / "bad.jsonl.gz", b"".join(members[:2]) + b"\x1f\x8bjunk!"),
        "zst-truncated": write(tmp_path / "cut.jsonl.zst", frames[:-500]),
    }
    for name, path in broken.items():
        out, err = scan_until_error(path)
        assert err.kind == name.removeprefix("zst-") and err.line == len(out) + 1 > 50
        assert out == full[: len(out)] and f"{path}:{err.line}:" in str(err)
    good = b'{"text": "fine"}\n'
    for pack, kind in [(gzip.compress, "gz"), (zstandard.ZstdCompressor().compress, "zst")]:
        tail = write(tmp_path / f"tail.jsonl.{kind}", pack(good) + pack(good) + b"\x00garbage")
        out, err = scan_until_error(tail)
        assert len(out) == 2 and (err.kind, err.line) == ("unreadable", 3)


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [
        ("gone.jsonl", None, "missing_file"),
        ("x.txt", b"{}", "unknown_format"),
        ("notext.parquet", "parquet", "missing_column"),
        ("junk.parquet", b"PAR1 not really", "unreadable"),
    ],
)
def test_files_that_cannot_be_read_at_all_raise_naming_them(tmp_path, name, content, kind):
    path = tmp_path / name
    if content == "parquet":
        pq.write_table(pa.table({"body": ["a"]}), path)
    elif content is not None:
        path.write_bytes(content)
    out, err = scan_until_error(str(path))
    assert out == [] and err.kind == kind and err.file == str(path)


def test_bad_positions_and_stripes_are_rejected(tmp_path):
    path = make_file(tmp_path, "jsonl")
    for start in [{"line": 1}, {"row": 3}, {"line": 1, "offset": -1}, {"line": 1, "offset": "2"}]:
        with pytest.raises(ValueError, match="position"):
            list(scan(path, start=start))
    for stripe, stripes in [(3, 3), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="stripe"):
            list(scan(path, stripe=stripe, stripes=stripes))


@pytest.mark.parametrize(
    "name", ["cc_en_head-0091.jsonl.gz", "cc_en_head-0174.jsonl.gz", "documents-000.json.gz"]
)
def test_shared_web_files_scan_without_errors_and_resume_anywhere(name):
    path = WEB / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    full = keys(scan(str(path), max_bytes=1 << 20))
    assert full and all(k[0] == "doc" for k, _ in full)
    for i, (_, pos) in enumerate(full):
        assert keys(scan(str(path), start=pos, max_bytes=1 << 20)) == full[i + 1 :]
