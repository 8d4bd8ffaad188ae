"""Tokenizers: train a sentencepiece BPE on the corpus, or bring an existing HF tokenizer.

Either way the result is a ``TextTokenizer``: a fast (Rust) ``tokenizers.Tokenizer`` plus the
ids of BOS/EOS/PAD, saved as HF files that ``AutoTokenizer.from_pretrained(dir)`` loads offline
and that give the same ids.

Trained tokenizers are lossless: sentencepiece's defaults (NFKC normalisation, collapsing runs
of whitespace, a dummy prefix space) made 19 of 21 real web documents decode to something else,
so we train with identity normalisation, no whitespace edits, byte fallback (no input is ever
<unk>) and newline/tab as single tokens. The sentencepiece ``.model`` is converted to an HF
``tokenizer.json`` by hand rather than through transformers' converter, whose Metaspace
pre-tokenizer adds a leading "▁" the model never saw (different ids on every document).
The one text that cannot round-trip is a literal "▁" (U+2581), which sentencepiece itself
decodes as a space.
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

from pydantic import Field
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from launcher.config import Section
from launcher.errors import UserError

SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
"""Special tokens of trained tokenizers, at ids 0-3 (Llama's convention plus a pad)."""
USER_SYMBOLS = ["\n", "\t"]
"""Always single tokens: sentencepiece trains on lines, so it would never learn them."""
EOS_CANDIDATES = ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>"]
BOS_CANDIDATES = ["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"]
PAD_CANDIDATES = ["<pad>", "<|padding|>", "<|pad|>", "[PAD]"]
log = logging.getLogger(__name__)
_MAX_LINE_BYTES = 8192  # sentencepiece skips longer "sentences" (we allow 16384) — split them


class TokenizerError(UserError):
    """A tokenizer that cannot be trained, loaded or used as configured."""


class TokenizerConfig(Section):
    path: str | None = None
    """An existing HF tokenizer (a directory with tokenizer.json, or a tokenizer.json file).
    When set, nothing is trained."""
    vocab_size: int = Field(8192, ge=300)
    """Size of the trained vocabulary, including 4 specials, 256 byte tokens, newline and tab."""
    sample_docs: int = Field(50_000, gt=0)
    """At most this many documents of the training corpus are used to train the tokenizer."""
    sample_bytes: int = Field(20_000_000, gt=0)
    """...and at most this many bytes of text."""
    split_digits: bool = True
    """Every digit its own token (as Llama), which helps arithmetic."""
    character_coverage: float = Field(0.9995, gt=0, le=1)
    """Share of characters that get their own token; the rarest fall back to bytes."""
    bos_token: str | None = None
    """Existing tokenizers: the begin-of-text token, if not found by name."""
    eos_token: str | None = None
    """Existing tokenizers: the end-of-text token, if not found by name."""
    pad_token: str | None = None
    """Existing tokenizers: the padding token (defaults to the end-of-text token)."""


class TextTokenizer:
    """A fast HF tokenizer plus its special ids; corpus text is always encoded as plain text."""

    def __init__(
        self,
        backend: Tokenizer,
        *,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        source: str = "",
        extra_config: dict | None = None,
    ):
        self.backend = backend
        # A web page that contains "</s>" must not inject an end-of-text id into the stream
        # (sentencepiece itself never matches control tokens in text).
        self.backend.encode_special_tokens = True
        self.source = source
        self.tokens = {"eos": eos_token, "bos": bos_token, "pad": pad_token or eos_token}
        self.tokens["unk"] = unk_token
        for role, token in self.tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"{source}: {role} token {token!r} is not in the vocabulary")
        self._extra_config = extra_config or {}

    def __setstate__(self, state: dict) -> None:
        # Pickling (e.g. into DataLoader workers) drops the Rust-side flag; set it again.
        self.__dict__.update(state)
        self.backend.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _id(self, role: str) -> int | None:
        token = self.tokens[role]
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int:
        return self._id("eos")

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def pad_id(self) -> int:
        return self._id("pad")

    @property
    def pad_is_eos(self) -> bool:
        """Padding uses the EOS id (brought tokenizers without a pad token): labels must then
        never be derived from pad ids, or end-of-turn is never learned."""
        return self.pad_id == self.eos_id

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template of the loaded tokenizer_config.json, if any."""
        template = self._extra_config.get("chat_template")
        return template if isinstance(template, str) else None

    def encode_segments(self, segments: Iterable[str | int]) -> list[int]:
        """Ids of text segments (encoded as text) and ids (kept as they are), in order: chat
        headers and content as text, an end-of-turn token by its id."""
        ids: list[int] = []
        for segment in segments:
            ids += [segment] if isinstance(segment, int) else self.encode(segment)
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings inside it are encoded as text."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts at once, in parallel threads."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(
        self,
        out_dir: str | Path,
        model_max_length: int | None = None,
        chat_template: str | None = None,
    ) -> Path:
        """Write tokenizer.json, tokenizer_config.json (with ``chat_template`` when given,
        for ``apply_chat_template``) and special_tokens_map.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # The saved file is for HF users, who expect special tokens in text to be parsed.
        self.backend.encode_special_tokens = False
        try:
            self.backend.save(str(out / "tokenizer.json"))
        finally:
            self.backend.encode_special_tokens = True
        specials = {f"{role}_token": tok for role, tok in self.tokens.items() if tok is not None}
        config = {k: v for k, v in self._extra_config.items() if k != "added_tokens_decoder"}
        config.update(specials)
        config.update(
            tokenizer_class="PreTrainedTokenizerFast",
            clean_up_tokenization_spaces=False,  # it would rewrite " ." to "." when decoding
        )
        if model_max_length:
            config["model_max_length"] = model_max_length
        if chat_template is not None:
            config["chat_template"] = chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
        return out

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> TextTokenizer:
        """Load an HF tokenizer directory or ``tokenizer.json``; find its special tokens.

        Raises ``TokenizerError`` if it is missing, not a fast tokenizer, or has no EOS.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        config_file = file.parent / "tokenizer_config.json"
        if not file.is_file():
            hint = " (a slow-only tokenizer? save it with a fast one)" if path.is_dir() else ""
            raise TokenizerError(f"{path}: no tokenizer.json found{hint}")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"{file}: not a valid HF tokenizer.json ({exc})") from None
        extra = json.loads(config_file.read_text()) if config_file.is_file() else {}
        vocab = backend.get_vocab(with_added_tokens=True)

        def pick(role: str, given: str | None, candidates: list[str]) -> str | None:
            if given is not None:
                if given not in vocab:
                    raise TokenizerError(
                        f"{file}: tokenizer.{role}_token={given!r} is not in its vocabulary"
                    )
                return given
            named = extra.get(f"{role}_token")
            named = named.get("content") if isinstance(named, dict) else named
            if named in vocab:
                return named
            return next((c for c in candidates if c in vocab), None)

        eos = pick("eos", eos_token, EOS_CANDIDATES)
        if eos is None:
            raise TokenizerError(
                f"{file}: found no end-of-text token (tried {', '.join(EOS_CANDIDATES)}); "
                "set tokenizer.eos_token to the token that separates documents"
            )
        return cls(
            backend,
            eos_token=eos,
            bos_token=pick("bos", bos_token, BOS_CANDIDATES),
            pad_token=pick("pad", pad_token, PAD_CANDIDATES),
            unk_token=pick("unk", None, ["<unk>", "[UNK]"]),
            source=str(file),
            extra_config=extra,
        )


def roundtrip_failures(tokenizer: TextTokenizer, texts: Iterable[str]) -> list[int]:
    """Indices of the texts that do not decode back to themselves exactly."""
    return [i for i, text in enumerate(texts) if tokenizer.decode(tokenizer.encode(text)) != text]


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


def _rare_characters(texts: Sequence[str], vocab_size: int) -> dict[int, str]:
    """A ``str.translate`` table turning into newlines every character beyond the ones a
    ``vocab_size`` vocabulary can hold besides its specials and bytes, counted the way
    sentencepiece does (a space is its "▁"); byte fallback encodes them. Logs what it drops."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(text)
    counts["▁"] += counts.pop(" ", 0)
    room = vocab_size - len(SPECIALS) - 256 - len(USER_SYMBOLS) - 8  # 8: a margin for ties
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
    cfg: TokenizerConfig, texts: Iterable[str], out_dir: str | Path
) -> TrainedTokenizer:
    """Train a lossless sentencepiece BPE on (a bounded sample of) ``texts``; save both forms.

    ``out_dir`` receives ``tokenizer.model`` and the HF files. If it already holds a tokenizer
    trained with the same settings on the same sample, that one is reused.
    Raises ``TokenizerError`` when the sample cannot support ``cfg.vocab_size``.
    """
    import sentencepiece as spm

    start = time.perf_counter()
    out = Path(out_dir)
    sample: list[str] = []
    n_bytes = skipped = 0
    digest = hashlib.sha256(cfg.model_dump_json().encode())
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
            model_proto = train(_training_lines(sample, _rare_characters(sample, cfg.vocab_size)))
    except RuntimeError as exc:
        limit = re.search(r"value <= (\d+)", str(exc))
        if limit:
            raise TokenizerError(
                f"{len(sample)} documents ({n_bytes:,} bytes) support at most {limit.group(1)} "
                f"tokens, not tokenizer.vocab_size={cfg.vocab_size}: lower tokenizer.vocab_size "
                "or give more text (tokenizer.sample_docs, tokenizer.sample_bytes)"
            ) from None
        raise TokenizerError(f"sentencepiece training failed: {exc}") from None
    tokenizer = TextTokenizer(
        sentencepiece_to_hf(model_proto),
        eos_token=SPECIALS["eos"],
        bos_token=SPECIALS["bos"],
        pad_token=SPECIALS["pad"],
        unk_token=SPECIALS["unk"],
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
