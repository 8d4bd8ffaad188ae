"""The built-in corpus: deterministic, self-consistent, correctly described by its manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
from pydantic import ValidationError

from launcher.data.documents import scan
from pretrain.data import builtin
from pretrain.data.builtin import (
    GENRES,
    MEMBER_BYTES,
    BuiltinCorpusConfig,
    number_words,
    write_builtin_corpus,
)

DOCS = 300


def read_shard(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def members(path: Path) -> list[tuple[int, bytes, bytes]]:
    """``(compressed offset, header, uncompressed bytes)`` of each gzip member of a file."""
    data, at, out = path.read_bytes(), 0, []
    while at < len(data):
        stream = zlib.decompressobj(wbits=31)
        content = stream.decompress(data[at:])
        assert stream.eof
        out.append((at, data[at : at + 10], content))
        at = len(data) - len(stream.unused_data)
    return out


def make(tmp: Path, **kw) -> tuple[BuiltinCorpusConfig, object]:
    cfg = BuiltinCorpusConfig(**{"docs": DOCS, "shards": 3, "dir": str(tmp), **kw})
    return cfg, write_builtin_corpus(cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[dict]:
    """The documents of one small corpus, in id order."""
    _, info = make(tmp_path_factory.mktemp("builtin"))
    return [doc for path in info.files for doc in read_shard(path)]


def test_the_same_config_gives_byte_identical_shards(tmp_path):
    _, a = make(tmp_path / "a")
    _, b = make(tmp_path / "b")
    assert [p.name for p in a.files] == [p.name for p in b.files]
    for pa, pb in zip(a.files, b.files, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    manifest_a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest_b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest_a["files"] == manifest_b["files"]


def test_gzip_headers_carry_no_timestamp_or_file_name(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "MEMBER_BYTES", 30_000)
    _, info = make(tmp_path)
    for path in info.files:
        for _, head, _ in members(path):
            assert head[:2] == b"\x1f\x8b"
            assert head[4:8] == b"\0\0\0\0", "mtime must be 0"
            assert not head[3] & 0x08, "FNAME flag must be unset"


def test_shards_are_gzip_members_cut_between_lines_and_byte_identical(tmp_path, monkeypatch):
    assert MEMBER_BYTES == 1 << 20
    monkeypatch.setattr(builtin, "MEMBER_BYTES", 20_000)
    _, a = make(tmp_path / "a")
    _, b = make(tmp_path / "b")
    for path, again in zip(a.files, b.files, strict=True):
        assert path.read_bytes() == again.read_bytes()
        parts = members(path)
        assert len(parts) > 3
        assert b"".join(c for _, _, c in parts) == gzip.decompress(path.read_bytes())
        for _, _, content in parts:
            assert content.endswith(b"\n")
            assert len(content) <= 20_000 or content.count(b"\n") == 1


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory) -> Path:
    """One shard of about 2.5 MB of JSON lines, with the real member size."""
    _, info = make(tmp_path_factory.mktemp("big"), docs=1700, shards=1)
    return info.files[0]


def test_a_resume_inside_a_shard_decodes_at_most_one_member(big_shard):
    parts = members(big_shard)
    assert len(parts) >= 2 and all(len(c) <= MEMBER_BYTES for _, _, c in parts)
    positions = [pos for _, pos in scan(str(big_shard))]
    assert len(positions) == 1700
    # members end between lines, so the position after a member's last line is the next member
    assert [p["member"] for p in positions if p["skip"] == 0] == [s for s, _, _ in parts[1:]] + [
        big_shard.stat().st_size
    ]
    for i in (0, 900, 1650):
        stats: dict[str, int] = {}
        items = scan(str(big_shard), start=positions[i], stats=stats)
        doc, _ = next(items)
        items.close()
        assert doc.id == f"builtin-0-{i + 1}"
        assert stats["decoded_bytes"] <= MEMBER_BYTES


def test_a_different_seed_gives_different_text(tmp_path, corpus):
    _, info = make(tmp_path, seed=1)
    other = [doc for path in info.files for doc in read_shard(path)]
    assert [d["id"] for d in other] == [f"builtin-1-{i}" for i in range(DOCS)]
    same = sum(a["text"] == b["text"] for a, b in zip(corpus, other, strict=True))
    assert same == 0


def test_shard_and_document_counts_match_the_manifest(tmp_path):
    cfg, info = make(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"] == cfg.model_dump(mode="json")
    assert [tmp_path / e["file"] for e in manifest["files"]] == info.files
    assert [p.name for p in info.files] == [f"shard-{i:05d}.jsonl.gz" for i in range(3)]
    assert sorted(tmp_path.iterdir()) == sorted([*info.files, tmp_path / "manifest.json"])
    total_docs = total_bytes = 0
    for entry, path in zip(manifest["files"], info.files, strict=True):
        docs = read_shard(path)
        text_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
        assert entry["docs"] == len(docs) > 0
        assert entry["text_bytes"] == text_bytes
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        total_docs += len(docs)
        total_bytes += text_bytes
    assert manifest["docs"] == info.docs == total_docs == DOCS
    assert manifest["text_bytes"] == info.text_bytes == total_bytes
    assert info.reused is False and info.dir == tmp_path and info.seconds >= 0


def test_an_existing_corpus_is_reused_without_rewriting_or_printing(tmp_path, capsys):
    _, first = make(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    _, again = make(tmp_path)
    assert again.reused is True
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert (again.files, again.docs, again.text_bytes) == (
        first.files,
        first.docs,
        first.text_bytes,
    )
    assert capsys.readouterr().out == ""


def test_a_changed_config_regenerates_and_drops_stale_shards(tmp_path):
    make(tmp_path)
    _, info = make(tmp_path, docs=DOCS + 1, shards=2)
    assert info.reused is False
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [p.name for p in info.files]
    assert sum(len(read_shard(p)) for p in info.files) == DOCS + 1
    assert json.loads((tmp_path / "manifest.json").read_text())["docs"] == DOCS + 1


def test_a_damaged_shard_is_regenerated(tmp_path):
    _, info = make(tmp_path)
    good = info.files[1].read_bytes()
    info.files[1].write_bytes(good[:100])
    _, again = make(tmp_path)
    assert again.reused is False
    assert info.files[1].read_bytes() == good


def test_ids_are_unique_stable_and_in_order(corpus):
    assert [d["id"] for d in corpus] == [f"builtin-0-{i}" for i in range(DOCS)]
    assert all(set(d) == {"id", "text", "genre"} for d in corpus)


def test_documents_mix_genres_lengths_and_characters(corpus):
    assert {d["genre"] for d in corpus} == set(GENRES)
    words = [len(d["text"].split()) for d in corpus]
    assert min(words) >= 30 and max(words) <= 1500
    assert max(words) > 4 * sorted(words)[len(words) // 2], "lengths should have a heavy tail"
    mean_bytes = sum(len(d["text"].encode("utf-8")) for d in corpus) / len(corpus)
    assert 1000 <= mean_bytes <= 2000
    texts = "\n".join(d["text"] for d in corpus)
    assert "\n\n" in texts and "\t" in texts and "—" in texts and "“" in texts
    assert re.search(r"[éüøöåÉÜØ]", texts)
    assert not any(d["text"] != d["text"].strip() for d in corpus)


def test_world_facts_agree_across_documents(corpus):
    texts = [d["text"] for d in corpus]
    river_of: dict[str, set[str]] = defaultdict(set)
    distance: dict[frozenset, set[int]] = defaultdict(set)
    person: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for text in texts:
        for town, river in re.findall(r"The river that runs through (\S+) is the (\w+)", text):
            river_of[town].add(river)
        for a, km, b in re.findall(r"(\w+) lies (\d+) kilometres from (\w+)\.", text):
            distance[frozenset((a, b))].add(int(km))
        for a, b, km in re.findall(r"From (\w+) to (\w+) is (\d+) kilometres", text):
            distance[frozenset((a, b))].add(int(km))
        for name, trade, town in re.findall(
            r"(\w+ \w+) \(born \d+\) is an? ([a-z]+) from (\w+)\.", text
        ):
            person[name].add((trade, town))
        for town, trade, name in re.findall(
            r"Once, in (\w+), there lived an? ([a-z]+) named (\w+ \w+)\.", text
        ):
            person[name].add((trade, town))
    assert len(river_of) >= 20 and len(distance) >= 20 and len(person) >= 20
    assert {t: r for t, r in river_of.items() if len(r) > 1} == {}
    assert {k: v for k, v in distance.items() if len(v) > 1} == {}
    assert {k: v for k, v in person.items() if len(v) > 1} == {}


def test_arithmetic_results_are_correct(corpus):
    ops = {"+": int.__add__, "-": int.__sub__, "×": int.__mul__, "÷": int.__floordiv__}
    checked = 0
    for doc in corpus:
        text = doc["text"]
        sums = re.findall(r"(\d+) ([-+×÷]) (\d+) = (\d+)", text)
        assert len(sums) == text.count(" = "), "every '=' should be a checkable sum"
        for a, op, b, result in sums:
            a, b, result = int(a), int(b), int(result)
            assert ops[op](a, b) == result, f"{a} {op} {b} = {result} in {doc['id']}"
            if op == "÷":
                assert a % b == 0
            checked += 1
    assert checked >= 100
    value = {number_words(n): n for n in range(2000)}
    in_words = [
        m
        for d in corpus
        for m in re.findall(r"In words: ([a-z -]+) plus ([a-z -]+) is ([a-z -]+)\.", d["text"])
    ]
    assert in_words
    for a, b, total in in_words:
        assert value[a] + value[b] == value[total]


def test_number_words_spells_numbers():
    assert number_words(0) == "zero"
    assert number_words(42) == "forty-two"
    assert number_words(305) == "three hundred and five"
    assert number_words(1017) == "one thousand and seventeen"


def test_config_flags_more_shards_than_documents():
    assert list(BuiltinCorpusConfig(docs=4, shards=4).problems()) == []
    problems = list(BuiltinCorpusConfig(docs=3, shards=4).problems())
    assert [key for key, _ in problems] == ["shards"]
    assert "4 shards for 3 documents" in problems[0][1]
    with pytest.raises(ValidationError):
        BuiltinCorpusConfig(docs=0)
    with pytest.raises(ValidationError):
        BuiltinCorpusConfig(shard=2)
