"""SFT data: labels from spans, the chat template's HF twin, pad == EOS, bad records, config
errors. No training here: tokenizers and the record reader only."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from finetune.config import SFTConfig
from finetune.data import SFTEncoder, read_sft_sets
from finetune.sft import save_tokenizer
from launcher.cli import main as kiln
from launcher.config import ConfigError, load_config
from launcher.data.batches import pad_examples
from launcher.data.packing import IGNORE
from launcher.data.records import CorpusError, Record
from launcher.data.tokenizer import TextTokenizer

from .sft_fixtures import SFT_TINY, overrides, write_jsonl


@pytest.fixture
def parent(pretrained):
    """The pretrained tiny model every SFT test starts from (tests/finetune/conftest.py)."""
    return pretrained


CHAT = [
    {"role": "system", "content": "You answer in few words."},
    {"role": "user", "content": "What runs past the old mill?"},
    {"role": "assistant", "content": "The river, every day."},
    {"role": "user", "content": "And the miller?"},
    {"role": "assistant", "content": "He counts 12 sacks of grain.\nThen he sleeps."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": " Because it is late. "},
]


def expected_positions(hf, text: str, messages: list[dict]) -> tuple[list[int], set[int]]:
    """HF's ids of the rendered chat and the positions of the tokens inside an assistant
    content span or the end-of-turn right after it, from character offsets alone."""
    spans, cursor = [], 0
    for message in messages:
        start = text.index(message["content"], cursor)
        cursor = start + len(message["content"])
        if message["role"] == "assistant":
            assert text.startswith(hf.eos_token, cursor)
            spans.append((start, cursor + len(hf.eos_token)))
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = {
        i
        for i, (a, b) in enumerate(encoded["offset_mapping"])
        if any(s <= a and b <= e for s, e in spans)
    }
    return encoded["input_ids"], trained


def tokenizers(parent, shared_data):
    yield "kiln-sentencepiece", TextTokenizer.load(parent)
    yield "gpt-neo (pad == EOS)", neo(shared_data)


def neo(shared_data) -> TextTokenizer:
    """The GPT-Neo tokenizer with padding by EOS, as brought tokenizers without a pad have."""
    path = shared_data / "tokenizers" / "gpt-neo-test-tokenizer.json"
    return TextTokenizer.load(path, pad_token="<|endoftext|>")


def test_labels_are_assistant_spans_and_apply_chat_template_gives_kilns_ids(
    parent, shared_data, tmp_path
):
    for name, tok in tokenizers(parent, shared_data):
        out = tmp_path / name
        save_tokenizer(tok, out, None, 128)  # what the export and checkpoints write
        hf = AutoTokenizer.from_pretrained(out)
        text = hf.apply_chat_template(CHAT, tokenize=False)
        hf_ids, trained = expected_positions(hf, text, CHAT)
        example = SFTEncoder(tok, 512)(Record(data={"messages": CHAT}, id="x", file="f", line=1))
        assert example.tokens.tolist() == hf_ids, name
        assert hf.apply_chat_template(CHAT, tokenize=True, return_dict=False) == hf_ids, name
        assert set(np.flatnonzero(example.loss_mask).tolist()) == trained, name
        # shifted targets: position i predicts token i + 1 exactly where it is trained
        batch = pad_examples([example], tok.pad_id)
        targets = batch["targets"][0].tolist()
        assert {i + 1 for i, t in enumerate(targets) if t != IGNORE} == trained, name
        # every assistant end-of-turn is a target, the others are not (3 of 7 turns)
        eos_positions = [i for i, t in enumerate(example.tokens) if t == tok.eos_id]
        assert len(eos_positions) == len(CHAT)
        assert [bool(example.loss_mask[i]) for i in eos_positions] == [
            m["role"] == "assistant" for m in CHAT
        ], name
        prompt = hf.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=False)
        assert text.startswith(prompt) and prompt.endswith("Assistant:\n")


def test_pad_equal_to_eos_never_makes_padding_a_target_nor_hides_end_of_turn(shared_data):
    tok = neo(shared_data)
    assert tok.pad_is_eos
    encoder = SFTEncoder(tok, 512)
    short = encoder(Record(data={"messages": CHAT[1:3]}, id="a", file="f", line=1))
    long = encoder(Record(data={"messages": CHAT}, id="b", file="f", line=2))
    batch = pad_examples([short, long], tok.pad_id)
    ids, targets = batch["input_ids"][0], batch["targets"][0]
    n = len(short)
    assert (ids[n:] == tok.eos_id).all() and (targets[n - 1 :] == IGNORE).all()  # padding
    assert targets[n - 2] == tok.eos_id  # the assistant's end of turn is predicted
    assert int((batch["targets"] == tok.eos_id).sum()) == 1 + 3


def test_prompt_completion_trains_completion_and_eos_without_bos(parent):
    tok = TextTokenizer.load(parent)
    record = Record(data={"prompt": "Q: 2 + 2?\n", "completion": "4"}, id="x", file="f", line=1)
    example = SFTEncoder(tok, 512)(record)
    prompt = tok.encode("Q: 2 + 2?\n")
    assert example.tokens.tolist() == prompt + tok.encode("4") + [tok.eos_id]
    assert tok.bos_id not in example.tokens.tolist()
    trained = len(example) - len(prompt)
    assert example.loss_mask.tolist() == [False] * len(prompt) + [True] * trained


BAD = {
    "unknown_role": {"messages": [{"role": "robot", "content": "x"}]},
    "empty_messages": {"messages": []},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "hi"}]},
    "non_string_content": {"messages": [{"role": "assistant", "content": ["a", "b"]}]},
    "missing_prompt_completion": {"prompt": "only a prompt"},
    "invalid_json": '{"messages": [',
    "invalid_message": {"messages": ["just text"]},
}


def test_bad_records_are_counted_by_kind_and_raise_names_file_and_line(parent, tmp_path):
    tok = TextTokenizer.load(parent)
    good = {"messages": CHAT[1:3]}
    records = [good, *BAD.values(), good, {"prompt": "a\n", "completion": "b"}]
    data = write_jsonl(tmp_path / "mixed.jsonl", records)
    cfg = load_config(
        SFTConfig, SFT_TINY, overrides(tmp_path, "bad", parent, data, "data.max_seq_len=64")
    )
    train, _ = read_sft_sets(cfg.data, SFTEncoder(tok, 64), seed=0)
    assert len(train) == 3
    assert {k: v for k, v in train.counters.items() if k.startswith("skipped_")} == {
        f"skipped_{kind}": 1 for kind in BAD
    }
    cfg.data.on_error = "raise"
    with pytest.raises(CorpusError, match=rf"{data}:2: .*robot"):
        read_sft_sets(cfg.data, SFTEncoder(tok, 64), seed=0)
    # a whole set of bad records: an error before training that names the file
    only_bad = write_jsonl(tmp_path / "bad.jsonl", list(BAD.values()))
    cfg.data.on_error = "skip"
    cfg.data.train[0].paths = [str(only_bad)]
    with pytest.raises(CorpusError, match=rf"no usable example .*{only_bad}"):
        read_sft_sets(cfg.data, SFTEncoder(tok, 64), seed=0)


def test_a_record_without_a_trained_token_after_truncation_is_skipped(parent, tmp_path):
    tok = TextTokenizer.load(parent)
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, CHAT[2]]}
    data = write_jsonl(tmp_path / "long.jsonl", [long_prompt, {"messages": CHAT[1:3]}])
    cfg = load_config(SFTConfig, SFT_TINY, overrides(tmp_path, "t", parent, data))
    train, _ = read_sft_sets(cfg.data, SFTEncoder(tok, 64), seed=0)
    assert len(train) == 1 and train.counters["skipped_no_target"] == 1


def test_raise_on_bad_data_exits_1_with_file_line_and_leaves_no_run_dir(parent, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT[1:3]}, BAD["unknown_role"]])
    args = [*overrides(tmp_path, "raise", parent, data), "data.on_error=raise"]
    code = kiln(["sft", SFT_TINY, *args])
    assert code == 1
    assert f"{data}:2: " in capsys.readouterr().err
    assert not (tmp_path / "raise" / "config.yaml").exists()
    assert not (tmp_path / "raise" / "checkpoints").exists()


def test_config_errors_name_the_key_and_its_yaml_line(parent, tmp_path, capsys):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(parent, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT[1:3]}])
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        f"extends: {SFT_TINY}\ninit:\n  path: {no_tokenizer}\ndata:\n  max_seq_len: 100000\n"
    )
    args = [a for a in overrides(tmp_path, "c", parent, data) if not a.startswith("init.")]
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, recipe, args)
    message = str(error.value)
    assert "init.path" in message and "no tokenizer.json" in message and "sft.yaml:3" in message
    assert kiln(["sft", str(recipe), *args]) == 2
    # with a tokenizer, the sequence length over the model's positions is the one problem
    limit = json.loads((parent / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ConfigError, match=rf"sft.yaml:5: data.max_seq_len: .*\({limit},"):
        load_config(SFTConfig, recipe, [*args, f"init.path={parent}"])
    no_config = tmp_path / "no-config"
    shutil.copytree(parent, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"init\.path.*no config\.json"):
        load_config(SFTConfig, SFT_TINY, overrides(tmp_path, "c", no_config, data))
    with pytest.raises(ConfigError, match=r"data\.packing.*prompt tuning"):
        load_config(
            SFTConfig,
            SFT_TINY,
            overrides(tmp_path, "c", parent, data, "data.packing=true", "peft={method: prompt}"),
        )
