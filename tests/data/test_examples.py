"""The record reader and example batches: the bad-input and resume guarantees of the text
stream, for chats, pairs and labelled texts.

- Every bad file or record of ``test_bad_input`` is skipped and counted by kind (or stops the
  run naming ``file:line`` with ``on_error: raise``); the fuzz shards of ``test_record_fuzz``
  give exactly one example or one counted skip per record.
- A stop at any step and a resume on another world size continues the exact sequence of
  examples, padded and packed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from launcher.data.batches import ExampleStream, evaluation_batches, pack_examples, pad_examples
from launcher.data.examples import Example, ExampleSource, read_examples
from launcher.data.packing import IGNORE
from launcher.data.records import CorpusError, Record, read_records

from .test_bad_input import write_bad_files
from .test_record_fuzz import MAX_BYTES, write_shards


def text_encoder(tokenizer):
    """The text stream's rules as an encode hook: a non-blank string ``text``, plus EOS."""

    def encode(record: Record) -> Example | CorpusError:
        text = record.data.get("text")
        if not isinstance(text, str):
            return CorpusError("'text' is not a string", kind="missing_text")
        if not text.strip():
            return CorpusError("'text' is empty or blank", kind="empty_text")
        ids = [*tokenizer.encode(text), tokenizer.eos_id]
        return Example(np.array(ids), np.ones(len(ids), dtype=bool))

    return encode


def test_every_bad_input_is_skipped_counted_and_logged(tmp_path, tokenizer, caplog):
    cases = write_bad_files(tmp_path)
    paths = [str(tmp_path / "a-good.jsonl")] + [str(tmp_path / f) for f, _, _ in cases.values()]
    paths += [str(tmp_path / "absent.jsonl"), str(tmp_path / "nothing-*.jsonl")]
    with caplog.at_level(logging.WARNING):
        got = read_examples(
            [ExampleSource(paths=paths)], text_encoder(tokenizer), key="data.train", log_bad=9
        )
    want: dict[str, int] = {"skipped_missing_file": 1, "skipped_empty_glob": 1}
    for name, counter, _ in cases.values():
        # A record keeps every column: a parquet file without `text` is 3 records without it.
        counter, n = ("skipped_missing_text", 3) if name == "no_text.parquet" else (counter, 1)
        want[counter] = want.get(counter, 0) + n
    assert {k: v for k, v in got.counters.items() if k.startswith("skipped_")} == want
    # The good records around the bad ones: 20, 12 before the gzip cut, 2 + 2 around the
    # bad JSON line, 1 + 1 around the bad UTF-8, surrogate and nesting, 2 of each parquet.
    assert len(got) == got.counters["examples"] == 20 + 12 + 4 + 2 + 2 + 2 + 2 + 2
    assert "invalid_json.jsonl:3" in caplog.text and "huge.jsonl:1" in caplog.text
    assert "lone_surrogate.jsonl:2: 'text' is not valid Unicode" in caplog.text
    assert "deep_nesting.jsonl:2: invalid JSON: nested too deeply" in caplog.text
    assert "missing_text.jsonl:1: 'text' is not a string" in caplog.text  # the hook's own
    assert all(e.where.startswith(str(tmp_path)) for e in got.examples)


@pytest.mark.parametrize(
    "case", ["truncated gzip", "invalid JSON", "invalid UTF-8", "lone surrogate", "empty text"]
)
def test_on_error_raise_stops_at_the_bad_input_naming_file_and_line(tmp_path, tokenizer, case):
    name, _, line = write_bad_files(tmp_path)[case]
    sources = [ExampleSource(paths=[str(tmp_path / "a-good.jsonl"), str(tmp_path / name)])]
    with pytest.raises(CorpusError) as info:
        read_examples(sources, text_encoder(tokenizer), key="data.train", on_error="raise")
    assert name in str(info.value)
    if line is not None:
        assert f"{name}:{line}" in str(info.value)


def test_a_missing_path_names_its_config_key_and_no_example_at_all_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    source = ExampleSource(paths=[str(tmp_path / "empty.jsonl"), str(tmp_path / "absent.jsonl")])
    with pytest.raises(CorpusError, match=r"data\.train\.0\.paths\.1: .*absent\.jsonl"):
        read_examples([source], lambda r: None, key="data.train", on_error="raise")
    with pytest.raises(CorpusError, match=r"data\.train: no usable example in 1 file.*empty"):
        read_examples([source], lambda r: None, key="data.train")


def test_a_hook_that_fails_is_one_counted_skip_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"n": n}) + "\n" for n in range(4)))

    def encode(record: Record) -> Example:
        if record.data["n"] == 2:
            raise RuntimeError("boom")
        return Example(np.array([1, 2]), np.array([False, True]))

    with caplog.at_level(logging.WARNING):
        got = read_examples([ExampleSource(paths=[str(path)])], encode, key="k")
    assert len(got) == 3 and got.counters["skipped_encode_error"] == 1
    assert f"{path}:3: cannot encode the record: RuntimeError: boom" in caplog.text


def record_outcome(line: bytes, kind: str | None) -> str | None:
    """The fuzz record's fate in the record reader: the text stream's, except that every
    string of a record must be Unicode (the text stream reads only `text` and `id`)."""
    if kind != "doc":
        return kind
    try:
        json.dumps(json.loads(line), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in some key or value
        return "invalid_unicode"
    return "doc"


def test_every_fuzz_record_is_one_example_or_one_counted_skip(tmp_path, tokenizer):
    written = write_shards(tmp_path)
    source = ExampleSource(paths=[str(tmp_path / "shard-*")])
    got = read_examples([source], text_encoder(tokenizer), key="k", max_bytes=MAX_BYTES)
    want: dict[str, int] = {}
    for records in written.values():
        for line, kind in records:
            if (fate := record_outcome(line, kind)) is not None:
                want[fate] = want.get(fate, 0) + 1
    assert len(got) == want.pop("doc")
    assert {k[len("skipped_") :]: v for k, v in got.counters.items() if "skipped" in k} == want
    assert {"invalid_utf8", "invalid_json", "invalid_unicode", "too_long"} <= set(want)


def test_a_record_is_the_whole_object_or_parquet_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = {"messages": [{"role": "user", "content": "hi"}], "id": 7, "meta": {"k": [1, None]}}
    (tmp_path / "a.jsonl").write_text(json.dumps(chat) + "\n")
    pq.write_table(pa.table({"prompt": ["p"], "label": [3]}), tmp_path / "b.parquet")
    (record,) = read_records(str(tmp_path / "a.jsonl"))
    assert record.data == chat and record.id == "7" and record.where == f"{tmp_path}/a.jsonl:1"
    (row,) = read_records(str(tmp_path / "b.parquet"))
    assert row.data == {"prompt": "p", "label": 3} and row.id == f"{tmp_path}/b.parquet:1"


# ------------------------------------------------------------------------------- batches


def numbered(n: int, seed: int = 0) -> list[Example]:
    """Examples of 3-12 tokens whose first token is their index; the mask trains the rest."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 13))
        tokens = np.concatenate([[i], rng.integers(100, 200, length - 1)])
        out.append(Example(tokens, np.arange(length) > 0))
    return out


def steps(examples, world: int, micro: int, accum: int, count: int, pack_len=None, state=None):
    """The first example indices of ``count`` optimizer steps (a set per step) on ``world``
    ranks, and the state after them."""
    streams = [
        ExampleStream(
            examples,
            batch_size=micro,
            rank=r,
            world_size=world,
            seed=3,
            pad_id=0,
            pack_len=pack_len,
        )
        for r in range(world)
    ]
    for s in streams:
        if state is not None:
            s.load_state_dict(state)
    its = [iter(s) for s in streams]
    out = []
    for _ in range(count):
        seen: list[int] = []
        for it in its:
            for _ in range(accum):
                batch = next(it)
                ids, starts = batch["input_ids"], batch.get("position_ids")
                first = ids[:, 0] if starts is None else ids[starts == 0]
                seen += [
                    int(x) for x, real in zip(first, _real(batch, starts), strict=True) if real
                ]
        out.append(sorted(seen))
    return out, [s.state_dict() for s in streams]


def _real(batch, starts):
    if starts is None:
        return batch["example_mask"].tolist()
    return (batch["segment_ids"][starts == 0] > 0).tolist()


@pytest.mark.parametrize("pack_len", [None, 24])
def test_a_stop_anywhere_resumes_exactly_on_another_world_size(pack_len):
    examples = numbered(37)
    whole, _ = steps(examples, world=2, micro=2, accum=2, count=12, pack_len=pack_len)
    assert whole[:1] != [sorted(range(8))]  # shuffled
    for stop in (1, 4, 9):
        first, state = steps(examples, 2, 2, 2, stop, pack_len)
        # the same global step on 1 rank is 4 micro-batches
        rest, _ = steps(examples, 1, 2, 4, 12 - stop, pack_len, state=state)
        assert first + rest == whole
    # every example once per epoch: the first epoch's steps hold each index once
    per_epoch = [i for step in whole for i in step][: len(examples)]
    if pack_len is None:
        assert sorted(per_epoch) == list(range(37))


def test_one_rank_with_accumulation_sees_the_steps_of_two_ranks():
    examples = numbered(50)
    assert steps(examples, 2, 3, 1, 6)[0] == steps(examples, 1, 3, 2, 6)[0]
    assert steps(examples, 2, 2, 1, 6, 30)[0] == steps(examples, 1, 2, 2, 6, 30)[0]


def test_a_state_from_another_set_is_refused():
    stream = ExampleStream(numbered(5), batch_size=2, rank=0, world_size=1, seed=0, pad_id=0)
    with pytest.raises(ValueError, match="trained on 7 examples, this set has 5"):
        stream.load_state_dict([{"epoch": 0, "next": 2, "examples": 7}])


def test_padded_and_packed_rows_hold_the_same_targets():
    examples = numbered(6)
    padded = pad_examples(examples, pad_id=0)
    packed = pack_examples([examples[:3], examples[3:]], pack_len=40, pad_id=0)
    for row, example in enumerate(examples):
        n = len(example)
        want = [*example.tokens[1:].tolist(), IGNORE]  # the mask trains every token but the first
        assert padded["targets"][row, :n].tolist() == want
        assert (padded["targets"][row, n:] == IGNORE).all() and padded["attention_mask"][
            row
        ].sum() == n
    packed_targets = packed["targets"][packed["segment_ids"] > 0].tolist()
    assert packed_targets == [
        t for row in range(6) for t in padded["targets"][row, : len(examples[row])].tolist()
    ]
    assert packed["position_ids"][0, : len(examples[0]) + 1].tolist() == [
        *range(len(examples[0])),
        0,
    ]


def test_extras_are_batched_and_pairs_padded_under_their_key():
    chosen, rejected = numbered(2)
    pair = Example(chosen.tokens, chosen.loss_mask, {"rejected": rejected, "label": 2})
    batch = pad_examples([pair, pair], pad_id=0)
    assert batch["label"].tolist() == [2, 2]
    assert batch["rejected_input_ids"][0, : len(rejected)].tolist() == rejected.tokens.tolist()


def test_evaluation_gives_every_rank_the_same_number_of_batches():
    examples = numbered(7)
    shares = [
        evaluation_batches(examples, rank=r, world_size=3, batch_size=2, pad_id=0) for r in range(3)
    ]
    assert [len(s) for s in shares] == [2, 2, 2]
    real = sum(int(b["example_mask"].sum()) for s in shares for b in s)
    targets = sum(int((b["targets"] != IGNORE).sum()) for s in shares for b in s)
    assert real == 7 and targets == sum(e.targets for e in examples)


def test_examples_check_their_shapes():
    with pytest.raises(ValueError, match=r"x\.jsonl:3: tokens"):
        Example(np.array([1, 2]), np.array([True]), where="x.jsonl:3")
    assert Example.from_segments([([1, 2], False), ([3], True)]).loss_mask.tolist() == [
        False,
        False,
        True,
    ]


def test_a_too_long_example_for_packing_is_refused_naming_it():
    long = Example(np.arange(30), np.ones(30, dtype=bool), where="f.jsonl:9")
    with pytest.raises(ValueError, match=r"f\.jsonl:9: an example of 30 tokens does not fit"):
        ExampleStream([long], batch_size=1, rank=0, world_size=1, seed=0, pad_id=0, pack_len=20)


def test_files_are_listed(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    got = read_examples(
        [ExampleSource(paths=[str(tmp_path / "*.jsonl")])],
        lambda r: Example(np.array([1, 2]), np.array([False, True])),
        key="k",
    )
    assert got.files == [str(tmp_path / "a.jsonl")]
