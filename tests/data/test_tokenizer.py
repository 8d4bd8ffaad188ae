"""Tokenizers: lossless on real web text, identical ids from sentencepiece, our wrapper and HF."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

from launcher.data.tokenizer import (
    TextTokenizer,
    TokenizerConfig,
    TokenizerError,
    roundtrip_failures,
)
from launcher.data.tokenizer_training import train_tokenizer

FIXTURES = ["llama-test-tokenizer.json", "gpt-neo-test-tokenizer.json"]
STRESS = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\r\nwindows\r\nlines\n\n\nblank",
    "    indented code:\n        return x  # comment",
    "naïve café — “quotes” ‘single’ … Ωμέγα Привет 中文字符 日本語 한국어 🤖🚀👩‍👩‍👧",
    "digits 1234567890 3.14159 1e-9 0x1F",
    "\x00\x01\x7f control \u200b zero width \ufeff bom",
    "a |||EMAIL_ADDRESS||| b",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, web_texts):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(TokenizerConfig(vocab_size=1200), web_texts, out)


def substrings(texts, n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        text = rng.choice(texts)
        start = rng.randrange(len(text))
        yield text[start : start + rng.randint(1, 300)]


def test_trained_tokenizer_round_trips_every_real_web_document(trained, web_texts):
    assert roundtrip_failures(trained.tokenizer, web_texts) == []
    assert roundtrip_failures(trained.tokenizer, STRESS) == []


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_tokenizers_round_trip_every_real_web_document(shared_data, web_texts, name):
    tok = TextTokenizer.load(shared_data / "tokenizers" / name)
    assert roundtrip_failures(tok, web_texts) == []


def test_hf_files_give_sentencepiece_ids_exactly(trained, web_texts):
    sp = spm.SentencePieceProcessor(model_file=str(trained.out_dir / "tokenizer.model"))
    texts = web_texts + STRESS + list(substrings(web_texts, 2000))
    mismatches = [t for t in texts if sp.encode(t) != trained.tokenizer.encode(t)]
    assert mismatches == []


def test_autotokenizer_on_the_saved_directory_matches_the_wrapper(trained, web_texts):
    hf = AutoTokenizer.from_pretrained(trained.out_dir)
    ours = trained.tokenizer
    for text in web_texts + STRESS[1:]:
        ids = ours.encode(text)
        assert hf.encode(text) == ids
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == ours.decode(ids) == text
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (2, 1, 3)
    assert (ours.eos_id, ours.bos_id, ours.pad_id) == (2, 1, 3)
    assert ours.vocab_size == len(hf) == 1200


@pytest.mark.parametrize("name", FIXTURES)
def test_autotokenizer_matches_the_wrapper_for_fixture_tokenizers(
    shared_data, tmp_path, web_texts, name
):
    ours = TextTokenizer.load(shared_data / "tokenizers" / name)
    ours.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in web_texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf.eos_token_id == ours.eos_id
    # The same directory loads back into the wrapper with the same special tokens.
    assert TextTokenizer.load(tmp_path).tokens == ours.tokens


def test_fixture_special_tokens_are_found_by_name(shared_data):
    llama = TextTokenizer.load(shared_data / "tokenizers" / FIXTURES[0])
    neo = TextTokenizer.load(shared_data / "tokenizers" / FIXTURES[1])
    assert (llama.tokens["eos"], llama.tokens["bos"], llama.eos_id) == ("</s>", "<s>", 2)
    assert (neo.tokens["eos"], neo.tokens["pad"]) == ("<|endoftext|>", "<|padding|>")


def test_no_character_is_ever_unknown(trained):
    rng = random.Random(1)
    chars = [chr(c) for c in range(0x20, 0x2FFFF) if not 0xD800 <= c < 0xE000]
    texts = ["".join(rng.choice(chars) for _ in range(50)) for _ in range(300)]
    ids = [i for text in texts for i in trained.tokenizer.encode(text)]
    assert 0 not in ids  # <unk>
    assert roundtrip_failures(trained.tokenizer, texts) == []


def test_special_token_strings_in_text_stay_text(trained):
    tok = trained.tokenizer
    text = "end of document </s> and <s> and <pad>"
    ids = tok.encode(text)
    assert not {tok.eos_id, tok.bos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == text


def test_special_token_strings_stay_text_after_pickling_into_a_worker(trained):
    tok = pickle.loads(pickle.dumps(trained.tokenizer))
    assert tok.eos_id not in tok.encode("a </s> b")


def test_lossy_tokenizer_is_detected(shared_data):
    neo = TextTokenizer.load(shared_data / "tokenizers" / FIXTURES[1])
    # gpt-neo's tokenizer.json normalises to NFC: a decomposed é comes back composed.
    assert roundtrip_failures(neo, ["plain", "cafe\u0301"]) == [1]


def test_vocabulary_too_large_for_the_sample_is_a_clear_error(tmp_path, web_texts):
    with pytest.raises(TokenizerError, match=r"lower tokenizer.vocab_size") as info:
        train_tokenizer(TokenizerConfig(vocab_size=30000), web_texts[:2], tmp_path / "t")
    assert "support at most" in str(info.value)
    assert not (tmp_path / "t").exists()  # nothing half-written


def test_training_sample_is_bounded_and_reused_when_unchanged(tmp_path, web_texts):
    cfg = TokenizerConfig(vocab_size=600, sample_docs=8)
    first = train_tokenizer(cfg, iter(web_texts), tmp_path / "t")
    assert first.docs == 8 and not first.reused
    again = train_tokenizer(cfg, iter(web_texts), tmp_path / "t")
    assert again.reused and again.tokenizer.encode("hello") == first.tokenizer.encode("hello")
    changed = train_tokenizer(cfg.model_copy(update={"vocab_size": 700}), web_texts, tmp_path / "t")
    assert not changed.reused and changed.tokenizer.vocab_size == 700
    one_doc = TokenizerConfig(vocab_size=600, sample_bytes=1)
    by_bytes = train_tokenizer(one_doc, web_texts, tmp_path / "b")
    assert by_bytes.docs == 1


def write_word_level(path, vocab):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_existing_tokenizer_without_end_of_text_needs_eos_token(tmp_path):
    path = write_word_level(tmp_path / "tokenizer.json", ["[UNK]", "hello", "world", "[END]"])
    with pytest.raises(TokenizerError, match=r"set tokenizer\.eos_token"):
        TextTokenizer.load(path)
    tok = TextTokenizer.load(tmp_path, eos_token="[END]")
    assert tok.eos_id == 3 and tok.pad_id == 3
    with pytest.raises(TokenizerError, match=r"tokenizer.eos_token='<eot>' is not in"):
        TextTokenizer.load(path, eos_token="<eot>")


def test_missing_or_invalid_tokenizer_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json found"):
        TextTokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(TokenizerError, match=r"not a valid HF tokenizer\.json"):
        TextTokenizer.load(bad)
