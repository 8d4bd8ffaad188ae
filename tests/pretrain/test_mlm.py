"""The masked-LM objective in-process: masking shares (against transformers' own collator),
whole words, special tokens, the resume of masks, the bidirectional block mask, BERT's
init and size, and every config or tokenizer error before a run starts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from launcher.config import CONFIG_ROOT, ConfigError, load_config
from launcher.data.masking import Masker, MaskingConfig, word_starts
from launcher.data.packing import IGNORE
from launcher.data.tokenizer import TextTokenizer, TokenizerConfig, TokenizerError
from launcher.data.tokenizer_training import train_tokenizer
from launcher.forward import forward_logits
from pretrain.config import PretrainConfig
from pretrain.data.builtin import BuiltinCorpusConfig, write_builtin_corpus
from pretrain.model import ModelConfig, build_model, flops_per_token, param_count
from pretrain.prepare import load_or_train_tokenizer

TINY_MLM = str(CONFIG_ROOT / "pretrain" / "tiny-mlm.yaml")
TINY = str(CONFIG_ROOT / "pretrain" / "tiny.yaml")


@pytest.fixture(scope="module")
def corpus_texts(tmp_path_factory) -> list[str]:
    import gzip
    import json

    out = tmp_path_factory.mktemp("builtin")
    info = write_builtin_corpus(BuiltinCorpusConfig(docs=300, shards=2, dir=str(out)))
    texts = []
    for path in info.files:
        with gzip.open(path, "rt") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus_texts) -> TextTokenizer:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(TokenizerConfig(vocab_size=1024), corpus_texts, out, mask=True).tokenizer


@pytest.fixture(scope="module")
def rows(tokenizer, corpus_texts) -> np.ndarray:
    """Over 100k tokens of documents as the reader makes them (BOS text EOS), in rows of 128."""
    ids: list[int] = []
    for text in corpus_texts:
        ids += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
        if len(ids) > 110_000:
            break
    assert len(ids) > 100_000
    n = len(ids) // 128
    return np.asarray(ids[: n * 128], dtype=np.int64).reshape(n, 128)


def shares(original: np.ndarray, masked: np.ndarray, targets: np.ndarray, mask_id: int) -> dict:
    chosen = targets != IGNORE
    maskable = ~np.isin(original, [0, 1, 2, 3, 4])
    return {
        "chosen": chosen.sum() / maskable.sum(),
        "mask": (masked[chosen] == mask_id).mean(),
        "kept": (masked[chosen] == original[chosen]).mean(),
        "random": ((masked[chosen] != mask_id) & (masked[chosen] != original[chosen])).mean(),
        "specials": int((chosen & ~maskable).sum()),
    }


def test_the_trained_tokenizer_has_mask_as_its_fifth_control_token_and_saves_it(
    tokenizer, tmp_path
) -> None:
    assert tokenizer.mask_id == 4 and tokenizer.tokens["mask"] == "<mask>"
    assert tokenizer.special_ids() == {0, 1, 2, 3, 4}
    assert tokenizer.encode("a <mask> b").count(4) == 0  # text never injects the control id
    tokenizer.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert hf.mask_token == "<mask>" and hf.mask_token_id == 4
    # HF users get the documents' framing: BOS (the [CLS] position) ... EOS
    assert hf("a b").input_ids[0] == 1 and hf("a b").input_ids[-1] == 2
    assert TextTokenizer.load(tmp_path).mask_id == 4


def test_masking_shares_over_100k_tokens_match_bert_and_transformers_collator(
    tokenizer, rows, tmp_path
) -> None:
    masker = Masker(MaskingConfig(), tokenizer)
    masked, targets = masker(rows, np.random.default_rng(0))
    ours = shares(rows, masked, targets, tokenizer.mask_id)
    assert ours["specials"] == 0
    assert abs(ours["chosen"] - 0.15) <= 0.005
    assert abs(ours["mask"] - 0.80) <= 0.01
    assert abs(ours["random"] - 0.10) <= 0.01
    assert abs(ours["kept"] - 0.10) <= 0.01
    # the anchor: transformers' collator on the same ids
    tokenizer.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    collator = DataCollatorForLanguageModeling(hf, mlm_probability=0.15, seed=0)
    batch = collator.torch_call([{"input_ids": row.tolist()} for row in rows])
    theirs = shares(rows, batch["input_ids"].numpy(), batch["labels"].numpy(), hf.mask_token_id)
    assert theirs["specials"] == 0
    for key in ("chosen", "mask", "random", "kept"):
        bound = 0.005 if key == "chosen" else 0.01
        assert abs(ours[key] - theirs[key]) <= 2 * bound, (key, ours, theirs)
        assert abs(theirs[key] - {"chosen": 0.15, "mask": 0.8}.get(key, 0.1)) <= bound


def test_whole_word_masking_takes_every_word_whole(tokenizer, rows) -> None:
    masker = Masker(MaskingConfig(whole_word=True), tokenizer)
    masked, targets = masker(rows, np.random.default_rng(1))
    ours = shares(rows, masked, targets, tokenizer.mask_id)
    assert ours["specials"] == 0
    assert abs(ours["chosen"] - 0.15) <= 0.005
    assert abs(ours["mask"] - 0.80) <= 0.01
    starts = word_starts(tokenizer)
    assert starts[tokenizer.encode(" river")[0]] and not starts[tokenizer.encode("river")[-1]]
    words = 0
    for row, chosen in zip(rows, targets != IGNORE, strict=True):
        begins = starts[row] | np.isin(row, [0, 1, 2, 3, 4])
        begins[0] = True
        for word in np.split(np.arange(len(row)), np.flatnonzero(begins)[1:]):
            word = word[~np.isin(row[word], [0, 1, 2, 3, 4])]
            if len(word):
                words += 1
                assert chosen[word].all() or not chosen[word].any()
    assert words > 20_000
    several = [w for w in tokenizer.backend.get_vocab() if not w.startswith("▁")]
    assert len(several) > 100  # continuation tokens exist: the check above was not vacuous


def test_the_same_generator_state_gives_the_same_masks(tokenizer, rows) -> None:
    masker = Masker(MaskingConfig(), tokenizer)
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    first = masker(rows[:8], rng)
    rng.bit_generator.state = state  # what a resume restores
    again = masker(rows[:8], rng)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = masker(rows[:8], rng)  # and the stream moves on
    assert not np.array_equal(first[1], other[1])


def test_a_packed_row_gives_each_document_the_logits_it_gets_alone() -> None:
    cfg = load_config(ModelConfig, CONFIG_ROOT / "model" / "tiny-bert.yaml")
    model = build_model(cfg, seed=0, pad_token_id=3).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 2048, n) for n in (11, 7, 20)]
    row = np.concatenate([*docs, np.full(12, 3)])  # the padding after them: a segment of its own
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(12)])
    pos = np.concatenate([np.arange(len(d)) for d in docs] + [np.arange(12)])
    batch = {
        "input_ids": torch.tensor(row)[None],
        "segment_ids": torch.tensor(seg, dtype=torch.long)[None],
        "position_ids": torch.tensor(pos)[None],
    }
    with torch.no_grad():
        packed = forward_logits(model, batch, causal=False)[0]
        at = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor(doc)[None]).logits[0]
            assert (packed[at : at + len(doc)] - alone).abs().max().item() < 1e-5
            at += len(doc)
        # and the mask matters: without it the first document sees the others
        mixed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        assert (mixed[: len(docs[0])] - packed[: len(docs[0])]).abs().max().item() > 1e-3


def test_bert_init_sets_biases_to_zero_norms_to_one_and_is_sized_by_formula() -> None:
    cfg = load_config(ModelConfig, CONFIG_ROOT / "model" / "tiny-bert.yaml")
    model = build_model(cfg, seed=3, pad_token_id=3)
    again = build_model(cfg, seed=3, pad_token_id=3)
    assert type(model).__name__ == "BertForMaskedLM"
    assert model.config._attn_implementation == "sdpa" and model.config.type_vocab_size == 1
    params = dict(model.named_parameters())
    assert param_count(cfg) == sum(p.numel() for p in params.values())
    untied = cfg.model_copy(update={"tie_embeddings": False})
    assert param_count(untied) == sum(p.numel() for p in build_model(untied).parameters())
    for name, p in params.items():
        assert torch.equal(p, dict(again.named_parameters())[name])
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif p.ndim == 1:
            assert torch.all(p == 1), name
    word = params["bert.embeddings.word_embeddings.weight"]
    assert torch.count_nonzero(word[3]) == 0 and abs(word.std().item() - 0.02) < 0.002
    residual = params["bert.encoder.layer.0.output.dense.weight"].std().item()
    assert abs(residual - 0.02 / (2 * cfg.n_layers) ** 0.5) < 0.002
    assert flops_per_token(cfg, 128) is None


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["model=tiny"], "objective", "mlm trains an encoder"),
        (["objective=causal"], "model.arch", "needs objective: mlm"),
        (["data.add_bos=false"], "data.add_bos", "[CLS] position"),
        (["data.document_boundaries=false"], "data.document_boundaries", "bidirectional"),
        (["model.n_kv_heads=2"], "model.n_kv_heads", "does not apply to arch: bert"),
        (["model.rope_theta=500000"], "model.rope_theta", "no RoPE"),
        (["mlm.random=0.3"], "mlm.random", "more than 1"),
    ],
)
def test_config_errors_name_the_key(overrides, key, words) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(PretrainConfig, TINY_MLM, overrides)
    assert f"{key}: " in str(caught.value) and words in str(caught.value)


def test_a_causal_recipe_with_objective_mlm_exits_2_naming_the_yaml_lines(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "pretrain", TINY, "objective=mlm", "--nproc", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "objective: mlm trains an encoder" in done.stderr
    assert "tiny.yaml:8: data.add_bos: objective mlm needs true" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_brought_tokenizer_without_a_mask_token_is_refused_naming_its_file(
    tmp_path, corpus_texts
) -> None:
    plain = train_tokenizer(TokenizerConfig(vocab_size=600), corpus_texts[:100], tmp_path / "tok")
    assert plain.tokenizer.mask_id is None
    cfg = load_config(
        PretrainConfig,
        TINY_MLM,
        [f"tokenizer.path={tmp_path / 'tok'}", f"run.output_dir={tmp_path / 'runs'}"],
    )
    with pytest.raises(TokenizerError, match=r"tok/tokenizer.json: objective mlm needs a mask"):
        load_or_train_tokenizer(cfg)
    # a mask that is another role's token is refused too (pad's embedding never trains)
    named = cfg.tokenizer.model_copy(update={"mask_token": "<pad>"})
    with pytest.raises(TokenizerError, match="'<pad>' is also its pad token"):
        load_or_train_tokenizer(cfg.model_copy(update={"tokenizer": named}))
    with pytest.raises(TokenizerError, match="mask token"):
        Masker(MaskingConfig(), plain.tokenizer)


def wordpiece_dir(out) -> str:
    """A BERT-style WordPiece tokenizer: [PAD] [UNK] [CLS] [SEP] [MASK], "##" continuations."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    words = ["the", "river", "town", "run", "##s", "##ning", "a", "."]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.add_special_tokens([AddedToken(t, special=True) for t in list(vocab)[:5]])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    TextTokenizer(backend, eos_token="[SEP]", pad_token="[PAD]").save(out)
    return str(out)


def test_a_brought_wordpiece_tokenizer_masks_whole_words_and_never_its_specials(tmp_path) -> None:
    path = wordpiece_dir(tmp_path / "wp")
    cfg = load_config(
        PretrainConfig,
        TINY_MLM,
        [f"tokenizer.path={path}", f"run.output_dir={tmp_path / 'runs'}"],
    )
    with pytest.raises(TokenizerError, match=r'bos_token \(a BERT tokenizer: "\[CLS\]"'):
        load_or_train_tokenizer(cfg)  # add_bos, and no BOS found by name
    named = cfg.tokenizer.model_copy(update={"bos_token": "[CLS]", "eos_token": "[SEP]"})
    tok, _ = load_or_train_tokenizer(cfg.model_copy(update={"tokenizer": named}))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (2, 3, 0, 4)
    assert tok.special_ids() == {0, 1, 2, 3, 4}
    starts = word_starts(tok)
    assert starts[tok.backend.token_to_id("run")] and not starts[tok.backend.token_to_id("##s")]
    masker = Masker(MaskingConfig(rate=0.5, whole_word=True), tok)
    ids = [2, *tok.encode("the river runs a running town ."), 3]
    rows = np.array([ids] * 4000)
    masked, targets = masker(rows, np.random.default_rng(0))
    chosen = targets != IGNORE
    assert not chosen[:, [0, -1]].any()  # [CLS] and [SEP]
    assert np.all(masked[:, [0, -1]] == [2, 3])
    run_s = [ids.index(tok.backend.token_to_id("run")), ids.index(tok.backend.token_to_id("##s"))]
    assert np.array_equal(chosen[:, run_s[0]], chosen[:, run_s[1]])  # "run ##s": one word
    assert abs(chosen[:, 1].mean() - 0.5) < 0.03
    assert set(np.unique(masked[chosen & (masked != rows)])) <= set(range(4, 13))


def test_hand_written_rows_give_the_words_the_masker_keeps_together(tokenizer) -> None:
    """Words by hand: a continuation at a row's start begins a word; a special token and a
    new packed segment end one."""
    t = tokenizer.backend.token_to_id
    river = tokenizer.encode(" riverbank")
    assert len(river) >= 2 and river[0] != t("▁")
    cont = river[1:]  # continuation tokens (no "▁")
    row = [*cont, *tokenizer.encode(" the"), *river, tokenizer.eos_id, *cont, *river]
    segments = [1] * (len(cont) + 1 + len(river) + 1) + [2] * len(cont) + [2] * len(river)
    rows, segs = np.array([row] * 3000), np.array([segments] * 3000)
    masker = Masker(MaskingConfig(rate=0.5, whole_word=True), tokenizer)
    chosen = masker(rows, np.random.default_rng(3), segs)[1] != IGNORE
    groups, at = [], 0
    for n in (len(cont), 1, len(river), 1, len(cont), len(river)):
        groups.append(list(range(at, at + n)))
        at += n
    for word in (groups[0], groups[2], groups[4], groups[5]):
        assert all(np.array_equal(chosen[:, word[0]], chosen[:, k]) for k in word)
    assert not chosen[:, groups[3]].any()  # EOS
    # the continuation after EOS in a new segment is a word of its own, not river's tail
    assert not np.array_equal(chosen[:, groups[4][0]], chosen[:, groups[2][0]])
    assert not np.array_equal(chosen[:, groups[4][0]], chosen[:, groups[5][0]])


def test_ids_past_the_tokenizer_rows_of_a_bigger_model_are_never_chosen_nor_drawn(
    tokenizer,
) -> None:
    masker = Masker(MaskingConfig(rate=0.9), tokenizer)
    rows = np.full((200, 64), tokenizer.vocab_size + 5)  # a row the model has, no token
    rows[:, ::2] = 100
    masked, targets = masker(rows, np.random.default_rng(0))
    assert not (targets[:, 1::2] != IGNORE).any()
    assert (targets[:, ::2] != IGNORE).mean() > 0.85
    assert (
        masked.max() <= tokenizer.vocab_size + 5 and masker.random_ids.max() < tokenizer.vocab_size
    )


def test_the_reader_gives_masked_batches_and_a_rewind_gives_the_same_masks(
    tmp_path, tokenizer
) -> None:
    from launcher.data.loader import StreamLoader
    from launcher.data.sources import resolve_corpus

    cfg = load_config(
        PretrainConfig,
        TINY_MLM,
        [f"data.builtin.dir={tmp_path / 'corpus'}", "data.num_workers=0"],
    )
    write_builtin_corpus(cfg.data.builtin)
    corpus = resolve_corpus(cfg.data)
    masker = Masker(cfg.mlm, tokenizer)
    loader = StreamLoader(cfg.data, tokenizer, corpus, batch_size=4, seed=0, masker=masker)
    stream = iter(loader)
    first = next(stream)
    assert set(first) == {"input_ids", "mlm_targets", "segment_ids", "position_ids"}
    mark = loader.position()
    later = [next(stream) for _ in range(3)]
    chosen = torch.cat([b["mlm_targets"] for b in later]) != IGNORE
    originals = torch.where(chosen, torch.cat([b["mlm_targets"] for b in later]), 0)
    assert 0.10 < chosen.float().mean() < 0.20  # 1536 tokens, specials included
    assert not torch.isin(originals[chosen], torch.tensor([0, 1, 2, 3, 4])).any()
    loader.rewind(mark)
    again = [next(iter(loader)) for _ in range(1)]
    assert torch.equal(again[0]["input_ids"], later[0]["input_ids"])
    assert torch.equal(again[0]["mlm_targets"], later[0]["mlm_targets"])


def test_the_memory_planner_refuses_a_bert_preset(capsys) -> None:
    from pretrain.memory import main as plan_main

    assert plan_main(["tiny-bert"]) == 2
    assert "is a bert model; the planner models Llama blocks only" in capsys.readouterr().err


def test_the_resolved_config_a_run_saves_loads_again(tmp_path) -> None:
    """`kiln export` and a resume read the run's config.yaml, which lists every field."""
    from launcher.config import save_config

    cfg = load_config(PretrainConfig, TINY_MLM, [f"run.output_dir={tmp_path}"])
    again = load_config(PretrainConfig, save_config(cfg, tmp_path))
    assert again == cfg and again.model.arch == "bert" and again.objective == "mlm"


def test_classification_refuses_a_max_length_past_an_encoders_positions(tmp_path) -> None:
    from finetune.classify_config import ClassifyConfig

    cfg = load_config(ModelConfig, CONFIG_ROOT / "model" / "tiny-bert.yaml")
    build_model(cfg.model_copy(update={"max_seq_len": 64}), seed=0).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"data.max_length: 128 is over the model's max_pos"):
        load_config(
            ClassifyConfig,
            CONFIG_ROOT / "finetune" / "classify-tiny.yaml",
            [f"init.path={tmp_path}", "data.max_length=128"],
        )
