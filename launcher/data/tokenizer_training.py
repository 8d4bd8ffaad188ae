"""Training a tokenizer: a lossless sentencepiece BPE on a sample of the corpus, converted to
an HF ``tokenizer.json`` that gives the same ids (``tokenizer.py`` explains why by hand).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from launcher.data.tokenizer import (
    _MAX_LINE_BYTES,
    MASK,
    SPECIALS,
    USER_SYMBOLS,
    TextTokenizer,
    TokenizerConfig,
    TokenizerError,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sentencepiece


def sentencepiece_to_hf(model_proto: bytes) -> Tokenizer:
    """An HF ``Tokenizer`` giving the same ids as a lossless sentencepiece BPE model.

    BPE merges are every split (left, right) of a vocabulary piece into two vocabulary pieces,
    ranked by the piece's score: sentencepiece merges the adjacent pair whose concatenation
    scores highest, which is what HF's BPE does with merges in that order.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = {
        "model_type must be BPE": spec.model_type != spm_pb2.TrainerSpec.BPE,
        "normalization must be identity": norm.name != "identity",
        "add_dummy_prefix must be off": norm.add_dummy_prefix,
        "remove_extra_whitespaces must be off": norm.remove_extra_whitespaces,
        "byte_fallback must be on": not spec.byte_fallback,
    }
    reasons = [reason for reason, bad in unsupported.items() if bad]
    if reasons:
        raise TokenizerError("cannot convert this sentencepiece model: " + "; ".join(reasons))
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = spm_pb2.ModelProto.SentencePiece.NORMAL
    merges = []
    for i, p in enumerate(pieces):
        if p.type != normal:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in vocab and right in vocab:
                merges.append((-p.score, i, k, left, right))
    merges.sort()
    unk = next(p.piece for p in pieces if p.type == spm_pb2.ModelProto.SentencePiece.UNKNOWN)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in merges],
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    control = (spm_pb2.ModelProto.SentencePiece.CONTROL, spm_pb2.ModelProto.SentencePiece.UNKNOWN)
    user = spm_pb2.ModelProto.SentencePiece.USER_DEFINED
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in control]
    )
    tok.add_tokens(
        [AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == user]
    )
    return tok


def _training_lines(texts: Iterable[str], drop: dict[int, str] | None = None) -> Iterable[str]:
    """Documents as sentencepiece "sentences": their lines, long ones cut at spaces; with
    ``drop`` (a ``str.translate`` table to newlines), also cut at those characters."""
    for text in texts:
        if drop:
            text = text.translate(drop)
        for line in text.split("\n"):
            while len(line.encode("utf-8")) > _MAX_LINE_BYTES:
                cut = line.rfind(" ", 0, _MAX_LINE_BYTES // 4) + 1 or _MAX_LINE_BYTES // 4
                yield line[:cut]
                line = line[cut:]
            if line:
                yield line


def _rare_characters(texts: Sequence[str], vocab_size: int, mask: bool = False) -> dict[int, str]:
    """A ``str.translate`` table turning into newlines every character beyond the ones a
    ``vocab_size`` vocabulary can hold besides its specials and bytes, counted the way
    sentencepiece does (a space is its "▁"); byte fallback encodes them. Logs what it drops."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(text)
    counts["▁"] += counts.pop(" ", 0)
    room = vocab_size - len(SPECIALS) - mask - 256 - len(USER_SYMBOLS) - 8  # 8: a margin for ties
    common = {c for c, _ in counts.most_common(room)} | {" ", *USER_SYMBOLS}
    rare = [c for c in counts if c not in common]
    log.warning(
        "tokenizer sample: %d distinct characters, more than tokenizer.vocab_size=%d holds; "
        "the %d rarest (%.2f%% of the text) are left to byte fallback",
        len(counts),
        vocab_size,
        len(rare),
        100 * sum(counts[c] for c in rare) / max(1, counts.total()),
    )
    return {ord(c): "\n" for c in rare}


@dataclass
class TrainedTokenizer:
    tokenizer: TextTokenizer
    out_dir: Path
    docs: int
    text_bytes: int
    seconds: float
    reused: bool


def train_tokenizer(
    cfg: TokenizerConfig, texts: Iterable[str], out_dir: str | Path, mask: bool = False
) -> TrainedTokenizer:
    """Train a lossless sentencepiece BPE on (a bounded sample of) ``texts``; save both forms.

    ``out_dir`` receives ``tokenizer.model`` and the HF files. If it already holds a tokenizer
    trained with the same settings on the same sample, that one is reused.
    ``mask`` (the masked-LM objective): ``<mask>`` is a fifth control token (id 4), and the
    saved tokenizer adds BOS ... EOS around a text for HF users (``add_special_tokens``), as
    every training document has them: ``pipeline("fill-mask")`` and a classifier pooling the
    first token ([CLS]) see what the encoder was trained on.
    Raises ``TokenizerError`` when the sample cannot support ``cfg.vocab_size``.
    """
    import sentencepiece as spm

    start = time.perf_counter()
    out = Path(out_dir)
    sample: list[str] = []
    n_bytes = skipped = 0
    digest = hashlib.sha256(cfg.model_dump_json().encode() + (b"\0mask" if mask else b""))
    for text in texts:
        if len(sample) >= cfg.sample_docs or n_bytes >= cfg.sample_bytes:
            break
        try:
            encoded = text.encode("utf-8")
        except (AttributeError, UnicodeEncodeError):  # not a str, or lone surrogates
            skipped += 1
            continue
        sample.append(text)
        n_bytes += len(encoded)
        digest.update(hashlib.sha256(encoded).digest())
    if skipped:
        log.warning("tokenizer sample: skipped %d texts that are not valid Unicode", skipped)
    if not sample:
        raise TokenizerError("no documents to train the tokenizer on")
    stamp = out / "kiln_tokenizer.json"
    fingerprint = digest.hexdigest()
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        loaded = TextTokenizer.load(out)
        return TrainedTokenizer(loaded, out, len(sample), n_bytes, 0.0, reused=True)

    ids = {f"{role}_id": i for i, role in enumerate(SPECIALS)}
    pieces = {f"{role}_piece": piece for role, piece in SPECIALS.items()}

    def train(lines: Iterable[str]) -> bytes:
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=proto,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=cfg.split_digits,
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) as tokens
            user_defined_symbols=USER_SYMBOLS,
            control_symbols=[MASK] if mask else [],
            max_sentence_length=2 * _MAX_LINE_BYTES,
            num_threads=2,
            minloglevel=2,
            **ids,
            **pieces,
        )
        return proto.getvalue()

    try:
        try:
            model_proto = train(_training_lines(sample))
        except RuntimeError as exc:
            if "required_chars" not in str(exc):
                raise
            # More distinct characters than the vocabulary holds at this coverage (a few
            # documents of random symbols do that; sentencepiece refuses a coverage < 0.98):
            # train without the rarest, which byte fallback encodes anyway.
            model_proto = train(
                _training_lines(sample, _rare_characters(sample, cfg.vocab_size, mask))
            )
    except RuntimeError as exc:
        limit = re.search(r"value <= (\d+)", str(exc))
        if limit:
            raise TokenizerError(
                f"{len(sample)} documents ({n_bytes:,} bytes) support at most {limit.group(1)} "
                f"tokens, not tokenizer.vocab_size={cfg.vocab_size}: lower tokenizer.vocab_size "
                "or give more text (tokenizer.sample_docs, tokenizer.sample_bytes)"
            ) from None
        raise TokenizerError(f"sentencepiece training failed: {exc}") from None
    backend = sentencepiece_to_hf(model_proto)
    if mask:
        bos, eos = SPECIALS["bos"], SPECIALS["eos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} $B {eos}",  # one token type: type_vocab_size is 1
            special_tokens=[(bos, backend.token_to_id(bos)), (eos, backend.token_to_id(eos))],
        )
    tokenizer = TextTokenizer(
        backend,
        eos_token=SPECIALS["eos"],
        bos_token=SPECIALS["bos"],
        pad_token=SPECIALS["pad"],
        unk_token=SPECIALS["unk"],
        mask_token=MASK if mask else None,
        source=str(out / "tokenizer.model"),
    )
    _check_twin(spm.SentencePieceProcessor(model_proto=model_proto), tokenizer, sample[:100])

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.model").write_bytes(model_proto)
    tokenizer.save(tmp)
    stamp_data = {"fingerprint": fingerprint, "docs": len(sample), "text_bytes": n_bytes}
    (tmp / stamp.name).write_text(json.dumps({**stamp_data, "config": cfg.model_dump()}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    seconds = time.perf_counter() - start
    return TrainedTokenizer(tokenizer, out, len(sample), n_bytes, seconds, reused=False)


def _check_twin(sp, tokenizer: TextTokenizer, texts: Sequence[str]) -> None:
    """The HF twin must give sentencepiece's ids; a difference is a bug, never ignored."""
    for i, text in enumerate(texts):
        if sp.encode(text) != tokenizer.encode(text):
            raise TokenizerError(
                f"internal error: HF tokenizer differs from sentencepiece on sample document {i}"
            )
