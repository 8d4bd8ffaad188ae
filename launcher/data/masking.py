"""Masked-language-model corruption of packed sequences (BERT's recipe).

Each maskable token is chosen with probability ``rate`` (``whole_word``: each *word*, and then
all of its tokens); a chosen token becomes ``<mask>`` with probability ``replace``, a random
token of the vocabulary with probability ``random``, and stays itself otherwise (BERT: 0.15,
0.8 / 0.1 / 0.1). The model is trained to predict the original token at every chosen position
(``mlm_targets``; ``IGNORE`` elsewhere). Special tokens (BOS, EOS, PAD, UNK, the mask itself)
are never chosen, and random replacements are never special: BOS keeps its role as the [CLS]
position that classification pools.

A *word* is a token that starts with the tokenizer's word marker (sentencepiece's "▁",
byte-level BPE's "Ġ"; for WordPiece, a token without the "##" continuation prefix) followed
by its continuation tokens; a special token ends a word, and so does a row's start.

The draws come from the caller's generator: the data reader passes its own, which is part of
its saved state, so an exact resume draws the same masks and an elastic one stays valid.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
from pydantic import Field

from launcher.config import Section
from launcher.data.packing import IGNORE
from launcher.data.tokenizer import TextTokenizer, TokenizerError


class MaskingConfig(Section):
    """The ``mlm:`` section: how tokens are chosen and corrupted."""

    rate: float = Field(0.15, gt=0, lt=1)
    """Share of the maskable tokens (or words) the loss is computed on."""
    replace: float = Field(0.8, ge=0, le=1)
    """Of the chosen tokens, the share replaced by the mask token."""
    random: float = Field(0.1, ge=0, le=1)
    """Of the chosen tokens, the share replaced by a random token (the rest stay as they are)."""
    whole_word: bool = False
    """Choose whole words (all their tokens or none), not single tokens."""

    def problems(self) -> Iterable[tuple[str, str]]:
        if self.replace + self.random > 1:
            yield (
                "random",
                f"replace ({self.replace}) + random ({self.random}) is more than 1: they are "
                "shares of the same chosen tokens (the rest is kept)",
            )


def id_space(tokenizer: TextTokenizer) -> int:
    """One more than the largest id (a vocabulary may have gaps: ``vocab_size`` counts)."""
    return max(tokenizer.backend.get_vocab(with_added_tokens=True).values()) + 1


def word_starts(tokenizer: TextTokenizer) -> np.ndarray:
    """``[ids]`` bools: the token begins a word (see the module's doc). Every token is its
    own word when the tokenizer has no recognisable marker."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    table = np.ones(id_space(tokenizer), dtype=bool)
    model = json.loads(tokenizer.backend.to_str()).get("model", {})
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        for token, i in vocab.items():
            table[i] = not token.startswith(prefix)
        return table
    for marker in ("▁", "Ġ"):
        if any(token.startswith(marker) for token in vocab):
            for token, i in vocab.items():
                table[i] = token.startswith(marker)
            break
    return table


class Masker:
    """Corrupts ``[batch, seq]`` token ids for the masked-LM loss."""

    def __init__(self, cfg: MaskingConfig, tokenizer: TextTokenizer):
        mask_id = tokenizer.mask_id
        if mask_id is None:
            raise TokenizerError(
                f"{tokenizer.source or 'the tokenizer'}: objective mlm needs a mask token and it "
                "has none; set tokenizer.mask_token to one of its tokens"
            )
        self.cfg, self.mask_id = cfg, mask_id
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        special = np.ones(id_space(tokenizer), dtype=bool)  # ids in no token's name: never
        special[list(vocab.values())] = False
        special[list(tokenizer.special_ids())] = True
        self.never = special
        self.random_ids = np.flatnonzero(~special)
        self.starts = word_starts(tokenizer) | special  # a special token ends the word before

    def _maskable(self, ids: np.ndarray) -> np.ndarray:
        inside = ids < len(self.never)  # an id past the tokenizer (model rows) is not a token
        return inside & ~self.never[np.minimum(ids, len(self.never) - 1)]

    def __call__(
        self, ids: np.ndarray, rng: np.random.Generator, segment_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(corrupted ids, targets): targets are the original ids where chosen, else IGNORE.
        ``segment_ids`` (packed rows): a new segment also starts a word."""
        ids = np.asarray(ids, dtype=np.int64)
        maskable = self._maskable(ids)
        if self.cfg.whole_word:
            starts = self.starts[np.minimum(ids, len(self.starts) - 1)] | ~maskable
            if segment_ids is not None:
                starts[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
            starts[:, 0] = True  # a row starts a word
            word = np.cumsum(starts.reshape(-1)).reshape(ids.shape) - 1
            chosen = (rng.random(int(word.max()) + 1) < self.cfg.rate)[word] & maskable
        else:
            chosen = (rng.random(ids.shape) < self.cfg.rate) & maskable
        action = rng.random(ids.shape)
        to_mask = chosen & (action < self.cfg.replace)
        to_random = chosen & ~to_mask & (action < self.cfg.replace + self.cfg.random)
        out = ids.copy()
        out[to_mask] = self.mask_id
        out[to_random] = rng.choice(self.random_ids, size=int(to_random.sum()))
        targets = np.where(chosen, ids, IGNORE)
        return out, targets
