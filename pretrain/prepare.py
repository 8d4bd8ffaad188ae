"""The `prepare` stage: everything a pretraining run needs before its first step.

It writes the resolved config into the run directory, generates the built-in corpus when
asked, trains (or loads) the tokenizer on a sample of the corpus, and builds the model,
saving the initial weights with the tokenizer as a plain HF directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from launcher.config import save_config
from launcher.data.sources import check_corpus, resolve_corpus, sample_texts
from launcher.data.tokenizer import (
    MASK_CANDIDATES,
    TextTokenizer,
    TokenizerError,
    roundtrip_failures,
)
from launcher.data.tokenizer_training import train_tokenizer
from launcher.data.validation import build_validation
from launcher.stages import Stage
from pretrain.config import PretrainConfig
from pretrain.data.builtin import CorpusInfo, write_builtin_corpus
from pretrain.model import build_model, describe, param_count


@dataclass
class Prepared:
    run_dir: Path
    config_path: Path
    corpus: CorpusInfo | None
    tokenizer: TextTokenizer
    tokenizer_dir: Path
    model_dir: Path
    params: int


def load_or_train_tokenizer(cfg: PretrainConfig) -> tuple[TextTokenizer, str]:
    """The run's tokenizer, saved under ``<run_dir>/tokenizer``, and a line describing it."""
    out = cfg.run_dir / "tokenizer"
    tcfg = cfg.tokenizer
    if tcfg.path is not None:
        tok = TextTokenizer.load(
            tcfg.path,
            eos_token=tcfg.eos_token,
            bos_token=tcfg.bos_token,
            pad_token=tcfg.pad_token,
            mask_token=tcfg.mask_token,
        )
        if cfg.objective == "mlm":
            check_mlm_tokenizer(tok)
        if cfg.data.add_bos and tok.bos_id is None:
            raise TokenizerError(
                f"{tok.source}: data.add_bos is set and the tokenizer has no begin-of-text token "
                "(tried <s>, <|begin_of_text|>, <bos>, <|startoftext|>); set tokenizer.bos_token "
                '(a BERT tokenizer: "[CLS]", with tokenizer.eos_token "[SEP]")'
            )
        tok.save(out, model_max_length=cfg.model.max_seq_len)
        return tok, f"loaded {tcfg.path} ({tok.vocab_size} tokens)"
    texts = sample_texts(
        cfg.data.all_sources(),
        tcfg.sample_docs,
        tcfg.sample_bytes,
        cfg.run.seed,
        holdout=cfg.data.validation.fraction,  # the tokenizer never sees validation text
        on_error=cfg.data.on_error,
    )
    trained = train_tokenizer(tcfg, texts, out, mask=cfg.objective == "mlm")
    how = "reused" if trained.reused else f"trained in {trained.seconds:.1f}s"
    return trained.tokenizer, (
        f"sentencepiece BPE, {trained.tokenizer.vocab_size} tokens, {how} on "
        f"{trained.docs} documents ({trained.text_bytes / 1e6:.1f} MB)"
    )


def check_mlm_tokenizer(tok: TextTokenizer) -> None:
    """A brought tokenizer for the masked-LM objective: it has a mask token of its own (the
    pad id's embedding never trains; an EOS or BOS as mask would read as a document edge)."""
    if tok.mask_id is None:
        raise TokenizerError(
            f"{tok.source}: objective mlm needs a mask token and found none (tried "
            f"{', '.join(MASK_CANDIDATES)}); set tokenizer.mask_token to one of its tokens"
        )
    for role in ("bos", "eos", "pad", "unk"):
        if tok.tokens[role] is not None and tok.tokens[role] == tok.tokens["mask"]:
            raise TokenizerError(
                f"{tok.source}: the mask token {tok.tokens['mask']!r} is also its {role} token; "
                "set tokenizer.mask_token to a token of its own"
            )


def prepare_inputs(cfg: PretrainConfig) -> tuple[CorpusInfo | None, TextTokenizer]:
    """Config, corpus and tokenizer in place (what every pretraining run needs first).

    Raises ``CorpusError``/``TokenizerError`` on unusable data or tokenizer."""
    run_dir = cfg.run_dir
    config_path = save_config(cfg, run_dir)
    print(f"[kiln] run directory   {run_dir}/")
    print(f"[kiln] resolved config {config_path}")

    corpus_info = None
    if cfg.data.builtin is not None:
        corpus_info = write_builtin_corpus(cfg.data.builtin)
        how = "reused" if corpus_info.reused else f"generated in {corpus_info.seconds:.1f}s"
        print(
            f"[kiln] corpus          {corpus_info.dir}/ ({len(corpus_info.files)} jsonl.gz "
            f"shards, {corpus_info.docs} documents, {corpus_info.text_bytes / 1e6:.1f} MB of "
            f"text, {how})"
        )

    corpus = resolve_corpus(cfg.data)
    check_corpus(corpus, cfg.data.on_error, cfg.data.max_document_bytes)
    for source in corpus.sources:
        print(
            f"[kiln] source          {source.label}: {len(source.files)} files, "
            f"{source.weight:.0%} of the training tokens"
        )

    tokenizer, how = load_or_train_tokenizer(cfg)
    sample = list(sample_texts(cfg.data.all_sources(), 200, 2_000_000, cfg.run.seed + 1))
    bad = roundtrip_failures(tokenizer, sample)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    n_bytes = sum(len(t.encode("utf-8")) for t in sample)
    print(f"[kiln] tokenizer       {run_dir / 'tokenizer'}/ ({how})")
    print(
        f"[kiln]                 {n_bytes / max(n_tokens, 1):.2f} bytes/token; lossless on "
        f"{len(sample) - len(bad)}/{len(sample)} sampled documents"
    )
    if bad:
        print(f"[kiln] WARNING: {tokenizer.source} is lossy on {len(bad)} sampled documents")
    val = build_validation(cfg.data, corpus, tokenizer)
    measure = (
        f"{val.target_tokens} target tokens (for bits per byte)"
        if cfg.objective == "causal"
        else f"{val.target_tokens + 1} tokens, masked once with a fixed seed"
    )
    print(
        f"[kiln] validation      {val.documents} documents, {val.text_bytes / 1e3:.0f} kB, "
        + measure
    )
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}: raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
    return corpus_info, tokenizer


def save_initial_model(cfg: PretrainConfig, tokenizer: TextTokenizer, out: Path) -> Path:
    """The run's model at its seeded init, with the tokenizer, as a plain HF directory."""
    model = build_model(
        cfg.model,
        seed=cfg.run.seed,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    model.save_pretrained(out)
    tokenizer.save(out, model_max_length=cfg.model.max_seq_len)
    return out


def prepare(cfg: PretrainConfig) -> Prepared:
    """Run the stage; print what was made and where. Raises on unusable data or tokenizer."""
    start = time.perf_counter()
    run_dir = cfg.run_dir
    corpus, tokenizer = prepare_inputs(cfg)

    model_dir = save_initial_model(cfg, tokenizer, run_dir / "model-init")
    print(f"[kiln] model           {model_dir}/ (initial weights + tokenizer, HF format)")
    print(f"[kiln]                 {describe(cfg.model, cfg.data.seq_len)}")
    print(f"[kiln] prepared in {time.perf_counter() - start:.1f}s")
    return Prepared(
        run_dir=run_dir,
        config_path=run_dir / "config.yaml",
        corpus=corpus,
        tokenizer=tokenizer,
        tokenizer_dir=run_dir / "tokenizer",
        model_dir=model_dir,
        params=param_count(cfg.model),
    )


STAGE = Stage(
    name="prepare",
    config_class=PretrainConfig,
    run=prepare,
    help="generate/sample the corpus, train the tokenizer, build the model",
)
