"""Preference pairs -> Examples: ``{prompt | messages, chosen, rejected, margin?}``.

``prompt`` is a string (then ``chosen``/``rejected`` are response strings, encoded as SFT's
prompt/completion: prompt, response, EOS by id) or ``messages`` a conversation (then the
responses are strings or lists of assistant messages, rendered with SFT's chat encoding, each
turn ending with EOS). The chosen sequence is the example, the rejected one its
``extras["rejected"]``, the margin ``extras["margin"]`` (0 when the record has none).

Truncation keeps the end: a sequence over ``max_seq_len`` loses prompt tokens from the left, so
the response and its EOS (where the score is read) survive. What cannot be trained on is a
counted skip of its own kind (``data/skipped_<kind>``) beside the reader's (invalid_json...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from finetune.chat import encode_chat, encode_prompt_completion
from finetune.config import HoldOut
from finetune.data import check_messages
from launcher.data.examples import Example, ExampleSet, read_examples
from launcher.data.records import CorpusError, Record
from launcher.data.tokenizer import TextTokenizer

SKIP_KINDS = {
    "missing_prompt": "neither a string prompt nor a messages list",
    "missing_response": "chosen or rejected missing",
    "non_string_content": "a response that is not a string or a list of assistant messages",
    "invalid_message": "a malformed message",
    "identical_pair": "chosen and rejected are the same tokens: no signal",
    "bad_margin": "a margin that is not a finite number",
    "too_long": "a response longer than data.max_seq_len alone",
}
"""The skip kinds of preference records (beside the reader's: invalid_json, invalid_utf8...)."""


def _bad(kind: str, detail: str) -> CorpusError:
    return CorpusError(f"{SKIP_KINDS[kind]}: {detail}", kind=kind)


def response_messages(value: object, name: str) -> list[dict] | CorpusError:
    """A response as assistant messages: a string, or a non-empty list of them."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        return _bad("non_string_content", f"{name} is a {type(value).__name__}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            return _bad("non_string_content", f"{name}[{i}] is not an assistant message")
        if not isinstance(message.get("content"), str):
            return _bad("non_string_content", f"{name}[{i}].content is not a string")
    return value


def keep_end(example: Example, prompt_len: int, max_len: int) -> Example | None:
    """``example`` cut to ``max_len`` tokens by dropping prompt tokens from the left; None
    when even the response alone is longer."""
    drop = len(example) - max_len
    if drop <= 0:
        return example
    if drop > prompt_len:
        return None
    return Example(example.tokens[drop:], example.loss_mask[drop:], example.extras, example.where)


@dataclass
class PairEncoder:
    """The encode hook of ``read_examples`` for preference records."""

    tokenizer: TextTokenizer
    max_seq_len: int
    margin_field: str = "margin"
    template: str | None = None
    """A Jinja chat template (``chat.template: tokenizer``); None: SFT's default segments."""

    def __call__(self, record: Record) -> Example | CorpusError:
        data = record.data
        for name in ("chosen", "rejected"):
            if name not in data:
                return _bad("missing_response", f"no {name!r} field")
        margin = data.get(self.margin_field, 0.0)
        if isinstance(margin, bool) or not isinstance(margin, int | float):
            return _bad("bad_margin", f"{self.margin_field} = {str(margin)[:40]!r}")
        if not math.isfinite(margin):
            return _bad("bad_margin", f"{self.margin_field} = {margin}")
        pair = self.encode_pair(data, record.where)
        if isinstance(pair, CorpusError):
            return pair
        (chosen, n_chosen), (rejected, n_rejected) = pair
        if np.array_equal(chosen.tokens, rejected.tokens):
            return _bad("identical_pair", f"{len(chosen)} tokens")
        kept_chosen = keep_end(chosen, n_chosen, self.max_seq_len)
        kept_rejected = keep_end(rejected, n_rejected, self.max_seq_len)
        if kept_chosen is None or kept_rejected is None:
            longest = max(len(chosen) - n_chosen, len(rejected) - n_rejected)
            return _bad("too_long", f"{longest} response tokens > {self.max_seq_len}")
        kept_chosen.extras = {"rejected": kept_rejected, "margin": float(margin)}
        return kept_chosen

    def encode_pair(self, data: dict, where: str):
        """((chosen, its prompt length), (rejected, its prompt length)) or why not."""
        if "messages" in data:
            prompt = data["messages"]
            if not isinstance(prompt, list):
                return _bad("missing_prompt", f"messages is a {type(prompt).__name__}")
            out = []
            for name in ("chosen", "rejected"):
                response = response_messages(data[name], name)
                if isinstance(response, CorpusError):
                    return response
                problem = check_messages(prompt + response)
                if problem is not None:
                    return _bad("invalid_message", str(problem))
                out.append(self._chat(prompt, response, where))
            return tuple(out)
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            return _bad("missing_prompt", f"prompt is a {type(prompt).__name__}")
        out = []
        for name in ("chosen", "rejected"):
            response = data[name]
            if not isinstance(response, str):
                return _bad("non_string_content", f"{name} is a {type(response).__name__}")
            example = encode_prompt_completion(self.tokenizer, prompt, response, where)
            out.append((example, int(np.argmax(example.loss_mask))))
        return tuple(out)

    def _chat(self, prompt: list[dict], response: list[dict], where: str) -> tuple[Example, int]:
        full = encode_chat(self.tokenizer, prompt + response, where, self.template)
        if full.tokens[-1] != self.tokenizer.eos_id:  # a template without end of turn
            full = Example(
                np.append(full.tokens, self.tokenizer.eos_id),
                np.append(full.loss_mask, True),
                where=where,
            )
        if not prompt:
            return full, 0
        head = encode_chat(self.tokenizer, prompt, where, self.template).tokens
        n = min(len(head), len(full))  # the prompt's tokens: the common prefix
        same = np.flatnonzero(head[:n] != full.tokens[:n])
        return full, int(same[0]) if len(same) else n


def read_pair_sets(data, encoder: PairEncoder, seed: int) -> tuple[ExampleSet, ExampleSet | None]:
    """The training pairs and the validation pairs (their files, a seeded held-out fraction
    of the training pairs, or None). Raises ``CorpusError`` (``on_error: raise`` at the first
    bad record; no usable pair at all)."""
    train = read_examples(data.train, encoder, key="data.train", on_error=data.on_error)
    if isinstance(data.validation, list):
        validation = read_examples(
            data.validation, encoder, key="data.validation", on_error=data.on_error
        )
        return train, validation
    if not isinstance(data.validation, HoldOut):
        return train, None
    n = len(train.examples)
    held = max(1, round(data.validation.fraction * n))
    if held >= n:
        raise CorpusError(f"data.validation.fraction: {n} training pairs leave none for training")
    chosen = set(np.random.default_rng([seed, 7]).permutation(n)[:held].tolist())
    kept = [e for i, e in enumerate(train.examples) if i not in chosen]
    out = [e for i, e in enumerate(train.examples) if i in chosen]
    return ExampleSet(kept, train.counters, train.files), ExampleSet(
        out, train.counters.copy(), train.files
    )
