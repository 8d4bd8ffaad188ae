"""Tokenizers: a sentencepiece BPE trained on the corpus (``tokenizer_training.py``), or an
existing HF tokenizer.

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

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import Field
from tokenizers import Tokenizer

from launcher.config import Section
from launcher.errors import UserError

SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
"""Special tokens of trained tokenizers, at ids 0-3 (Llama's convention plus a pad)."""
MASK = "<mask>"
"""The fifth control token (id 4) of tokenizers trained for the masked-LM objective."""
USER_SYMBOLS = ["\n", "\t"]
"""Always single tokens: sentencepiece trains on lines, so it would never learn them."""
EOS_CANDIDATES = ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>"]
BOS_CANDIDATES = ["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"]
PAD_CANDIDATES = ["<pad>", "<|padding|>", "<|pad|>", "[PAD]"]
MASK_CANDIDATES = ["<mask>", "[MASK]", "<|mask|>"]
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
    mask_token: str | None = None
    """Existing tokenizers: the mask token of the masked-LM objective, if not found by name."""


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
        mask_token: str | None = None,
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
        self.tokens["mask"] = mask_token
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
    def mask_id(self) -> int | None:
        """The masked-LM objective's mask token (None: the tokenizer has none)."""
        return self._id("mask")

    def special_ids(self) -> set[int]:
        """Ids of the special tokens: the roles' and every added special token's."""
        ids = {self._id(role) for role in self.tokens} - {None}
        added = self.backend.get_added_tokens_decoder()
        return ids | {i for i, token in added.items() if token.special}

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
        mask_token: str | None = None,
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
            mask_token=pick("mask", mask_token, MASK_CANDIDATES),
            source=str(file),
            extra_config=extra,
        )


def roundtrip_failures(tokenizer: TextTokenizer, texts: Iterable[str]) -> list[int]:
    """Indices of the texts that do not decode back to themselves exactly."""
    return [i for i, text in enumerate(texts) if tokenizer.decode(tokenizer.encode(text)) != text]
