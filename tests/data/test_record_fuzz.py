"""Fuzz: whatever a record holds, the real reader + tokenizer path yields it as one document or
counts it as one skip of a named kind; no exception ever leaves the stream.

Seeded hostile shards (random bytes, random JSON shapes, lone surrogates, NULs, deep nesting,
huge numbers, very long lines, wrong-typed text) mixed with good documents go through
``StreamLoader`` on 2 DataLoader workers and through tokenizer training.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import pytest

from launcher.data.config import DataConfig, SourceConfig
from launcher.data.documents import RECORD_ERRORS, CorpusError
from launcher.data.loader import StreamLoader
from launcher.data.sources import resolve_corpus, sample_texts
from launcher.data.stream import document_key
from launcher.data.tokenizer import TokenizerConfig
from launcher.data.tokenizer_training import train_tokenizer

from .data_fixtures import make_text, tokens_per_document

SEED = 20261201
MAX_BYTES = 300_000
"""data.max_document_bytes of the fuzz runs: deep nesting (200 kB) is read, longer lines are not."""
GOOD_HEAD = 8
"""Good documents that open every shard: a reader that has just entered epoch 1 reads only
these, so its skip counters are still those of epoch 0."""

Record = tuple[bytes, str | None]
"""A line and what it must become: ``"doc"``, a record-error kind, or None (a blank line)."""


def random_string(rng: random.Random, n: int) -> str:
    """Any characters but surrogates: control, NUL, specials, non-BMP, BOM, combining marks."""
    pool = ["\x00", "\x1f", "\r", "\t", "\u2028", "\ufeff", "\u0301", "▁", "</s>", "😀", " "]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(rng.choice(pool))
        elif r < 0.6:
            out.append(chr(rng.randint(0x20, 0x7E)))
        else:
            c = rng.randint(0x80, 0x10FFFF)
            out.append(chr(c if not 0xD800 <= c <= 0xDFFF else c + 0x800))
    return "".join(out)


def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth >= 4 or r < 0.45:
        return rng.choice(
            [
                None,
                True,
                rng.randint(-(10**30), 10**30),
                rng.uniform(-1e300, 1e300),
                float("inf"),
                random_string(rng, rng.randint(0, 30)),
            ]
        )
    if r < 0.7:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["text", "id", "meta", random_string(rng, 3)]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def outcome(value) -> str:
    """What a parsed JSON value must become."""
    if not isinstance(value, dict):
        return "invalid_json"
    if not isinstance(value.get("text"), str):
        return "missing_text"
    return "doc" if value["text"].strip() else "empty_text"


def good(rng: random.Random, i: int) -> Record:
    text = make_text(rng, rng.randint(40, 80))
    return json.dumps({"id": f"good-{i}", "text": text}).encode(), "doc"


def hostile(rng: random.Random) -> Record:
    """One record of a randomly chosen hostile family."""
    family = rng.randrange(11)
    if family == 0:  # random bytes, never UTF-8
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))).replace(b"\n", b"")
        cut = rng.randint(0, len(raw))
        return raw[:cut] + b"\xff" + raw[cut:], "invalid_utf8"
    if family == 1:  # a random JSON shape, written ASCII-escaped or raw
        value = random_json(rng) if rng.random() < 0.5 else {"text": random_json(rng)}
        if rng.random() < 0.3:
            value = {"id": random_json(rng), "text": random_string(rng, rng.randint(1, 200))}
        line = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        return line, outcome(json.loads(line))
    if family == 2:  # lone surrogates, where they matter and where they do not
        s = rng.choice(["\\ud800", "\\udfff", "\\udc00\\ud800", "x\\ud83d", "\\ude00y"])
        line, kind = rng.choice(
            [
                (f'{{"text": "lone {s} surrogate"}}', "invalid_unicode"),
                (f'{{"id": "{s}", "text": "a fine text"}}', "invalid_unicode"),
                (f'{{"text": "a fine text", "other": "{s}"}}', "doc"),
                (f'{{"text": "a fine text", "{s}": 1}}', "doc"),
                ('{"text": "a pair \\ud83d\\ude00 is fine"}', "doc"),
            ]
        )
        return line.encode(), kind
    if family == 3:  # NULs
        return rng.choice(
            [
                (b'{"text": "raw \x00 nul"}', "invalid_json"),
                (b'{"text": "escaped \\u0000 nul"}', "doc"),
                (b"\x00" * rng.randint(1, 50), "invalid_json"),
                (b'{"text": "trailing nul"}\x00', "invalid_json"),
            ]
        )
    if family == 4:  # deep nesting
        n = rng.choice([1_500, 5_000, 100_000])
        return rng.choice(
            [
                (b"[" * n + b"]" * n, "invalid_json"),
                (b'{"text": ' + b"[" * n + b"]" * n + b"}", "invalid_json"),
                (b'{"a": ' * n + b"1" + b"}" * n, "invalid_json"),
                (b"[" * n, "invalid_json"),
                (b'{"text": "nested meta", "m": ' + b"[" * 50 + b"]" * 50 + b"}", "doc"),
            ]
        )
    if family == 5:  # huge numbers
        digits = b"9" * rng.randint(4301, 20_000)
        return rng.choice(
            [
                (b'{"text": "ok", "n": ' + digits + b"}", "invalid_json"),
                (b'{"text": ' + digits + b"}", "invalid_json"),
                (b'{"text": 1e999}', "missing_text"),
                (b'{"text": "big but fine", "n": -1e400, "m": 1' + b"0" * 4000 + b"}", "doc"),
            ]
        )
    if family == 6:  # very long lines
        n = rng.randint(MAX_BYTES + 1, MAX_BYTES + 50_000)
        return rng.choice(
            [
                (b"x" * n, "too_long"),
                (json.dumps({"text": "y" * n}).encode(), "too_long"),
                (json.dumps({"text": make_text(rng, 8_000)}).encode(), "doc"),  # ~50 kB
            ]
        )
    if family == 7:  # wrong-typed or missing text
        value = rng.choice([42, 4.2, True, None, ["a", "list"], {"nested": "text"}])
        line = rng.choice(
            [json.dumps({"text": value}), '{"text": NaN}', '{"body": "no text"}', "{}"]
        )
        return line.encode(), "missing_text"
    if family == 8:  # blank text
        blank = rng.choice(["", "   ", "\\t\\n", "\\u3000", "\\u001c"])
        return f'{{"text": "{blank}"}}'.encode(), "empty_text"
    if family == 9:  # broken JSON and broken UTF-8
        line = json.dumps({"text": random_string(rng, 40)}, ensure_ascii=False)
        return rng.choice(
            [
                (line[: rng.randint(1, len(line) - 1)].encode(), "invalid_json"),
                (b'{"text": "cesu \xed\xa0\x80"}', "invalid_utf8"),
                (b'{"text": "overlong \xc0\xaf"}', "invalid_utf8"),
                (line.encode() + b"\r", outcome(json.loads(line))),  # CRLF line ending
            ]
        )
    return rng.choice([b"", b"   ", b"\r", b"\t "]), None  # blank lines are no records


def write_shards(root: Path, seed: int = SEED) -> dict[Path, list[Record]]:
    """Two .jsonl and two multi-member .jsonl.gz shards of good and hostile records."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards: dict[Path, list[Record]] = {}
    count = 0
    for i in range(4):
        records = []
        for _ in range(GOOD_HEAD):
            records.append(good(rng, count))
            count += 1
        for _ in range(90):
            if rng.random() < 0.4:
                records.append(good(rng, count))
                count += 1
            else:
                records.append(hostile(rng))
        # Whatever else is wrong with it, a line over the limit is never parsed.
        records = [
            (line, "too_long" if kind and len(line) > MAX_BYTES else kind) for line, kind in records
        ]
        lines = [line + b"\n" for line, _ in records]
        path = root / f"shard-{i}.jsonl{'.gz' if i % 2 else ''}"
        if i % 2:
            third = len(lines) // 3
            parts = [lines[:third], lines[third : 2 * third], lines[2 * third :]]
            path.write_bytes(b"".join(gzip.compress(b"".join(p), mtime=0) for p in parts))
        else:
            path.write_bytes(b"".join(lines))
        shards[path] = records
    return shards


def fuzz_config(root: Path, **extra) -> DataConfig:
    return DataConfig.model_validate(
        {
            "sources": [{"name": "fuzz", "paths": [str(root / "shard-*")]}],
            "seq_len": 64,
            "shuffle": False,  # no window reading ahead: epoch 0's skips are counted exactly
            "num_workers": 2,
            "validation": {"fraction": 0.0},
            "track_documents": True,
            "max_document_bytes": MAX_BYTES,
            "log_bad_records": 0,
            **extra,
        }
    )


def good_texts(
    shards: dict[Path, list[Record]], kinds: tuple[str, ...] = ("doc",)
) -> dict[tuple[str, int], str]:
    """(file, 1-based line) -> text of every record of ``kinds`` that holds a text."""
    out = {}
    for path, records in shards.items():
        for n, (line, kind) in enumerate(records, start=1):
            if kind in kinds and (kind == "doc" or line.startswith(b'{"text": "')):
                out[(str(path), n)] = json.loads(line)["text"]
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[Path, list[Record]]]:
    root = tmp_path_factory.mktemp("fuzz")
    return root, write_shards(root)


@pytest.mark.slow
# serial: under pytest-xdist (a worker that had run other modules first) one of its forked
# DataLoader workers died of a segmentation fault once; alone it never has. Cause not
# pinned down (suspect: fork after pyarrow or OpenMP threads started in the worker).
@pytest.mark.serial
def test_every_record_is_one_document_or_one_counted_skip_on_two_workers(shards, tokenizer):
    root, written = shards
    cfg = fuzz_config(root)
    loader = StreamLoader(cfg, tokenizer, resolve_corpus(cfg), batch_size=4, seed=0)
    assert loader.workers == 2 and len(loader.readers) == 2
    expected = {
        document_key(0, f, n, 0): len(tokenizer.encode(text)) + 1
        for (f, n), text in good_texts(written).items()
    }
    batches, at_epoch_end = [], {}
    stream = iter(loader)
    try:
        for i, batch in enumerate(stream):  # an exception in a worker would end the test here
            batches.append({"doc_keys": batch["doc_keys"].clone()})
            for g in loader.readers:  # each reader's counters once it has finished epoch 0
                state = loader._states[g]
                if g not in at_epoch_end and state["cursors"][0]["epoch"] >= 1:
                    at_epoch_end[g] = dict(state["counters"])
            seen = tokens_per_document(batches, epoch=0)
            if len(at_epoch_end) == 2 and all(seen.get(k, 0) >= n for k, n in expected.items()):
                break
            assert i < 2_000, "the epoch never ended"
    finally:
        stream.close()  # shut the workers down now, even when an assertion failed
    # Every good document exactly once (token counts exact), nothing from a bad record.
    assert tokens_per_document(batches, epoch=0) == expected
    skipped: dict[str, int] = {}
    for counters in at_epoch_end.values():
        for key, n in counters.items():
            if key.startswith("skipped_"):
                skipped[key[len("skipped_") :]] = skipped.get(key[len("skipped_") :], 0) + n
    want: dict[str, int] = {}
    for records in written.values():
        for _, kind in records:
            if kind not in (None, "doc"):
                want[kind] = want.get(kind, 0) + 1
    assert skipped == want  # each kind counted exactly
    assert set(skipped) <= RECORD_ERRORS
    n_records = sum(kind is not None for records in written.values() for _, kind in records)
    assert len(expected) + sum(skipped.values()) == n_records
    # Every hostile family really occurred.
    assert {"invalid_utf8", "invalid_json", "invalid_unicode", "too_long"} <= set(skipped)


def test_on_error_raise_stops_at_the_first_bad_record_with_the_message_it_logs(
    shards, tokenizer, caplog
):
    root, written = shards
    first = sorted(written)[0]  # one reader, no shuffle: files in order
    line, (_, kind) = next(
        (n, r) for n, r in enumerate(written[first], start=1) if r[1] not in (None, "doc")
    )
    cfg = fuzz_config(root, num_workers=0, log_bad_records=1)
    loader = StreamLoader(cfg, tokenizer, resolve_corpus(cfg), batch_size=4, seed=0)
    with caplog.at_level(logging.WARNING):
        for _ in zip(range(50), loader, strict=False):
            pass
    cfg = fuzz_config(root, num_workers=0, on_error="raise")
    loader = StreamLoader(cfg, tokenizer, resolve_corpus(cfg), batch_size=4, seed=0)
    with pytest.raises(CorpusError) as info:
        for _ in zip(range(50), loader, strict=False):
            pass
    assert (info.value.file, info.value.line, info.value.kind) == (str(first), line, kind)
    assert f"skipped ({kind}): {info.value}" in caplog.text


def test_tokenizer_training_on_a_hostile_corpus_uses_every_good_document(shards, tmp_path, caplog):
    root, written = shards
    source = SourceConfig(name="fuzz", paths=[str(root / "shard-*")])
    texts = list(sample_texts([source], 10_000, 10**9, seed=0, on_error="skip"))
    # The sample has no length limit: the too_long documents are in it.
    assert sorted(texts) == sorted(good_texts(written, ("doc", "too_long")).values())
    texts = [t for t in texts if len(t) <= MAX_BYTES]  # 300 kB of "y" only cost time here
    # Random symbols give more distinct characters than 400 tokens hold: the rarest are left
    # to byte fallback instead of failing; bad texts handed in directly are skipped.
    with caplog.at_level(logging.WARNING):
        trained = train_tokenizer(
            TokenizerConfig(vocab_size=400), [*texts, "lone \ud800", 42], tmp_path / "tok"
        )
    assert "are left to byte fallback" in caplog.text
    assert "skipped 2 texts that are not valid Unicode" in caplog.text
    assert trained.docs == len(texts)
    tok = trained.tokenizer
    assert all(tok.decode(tok.encode(t)) == t for t in texts if "▁" not in t)
