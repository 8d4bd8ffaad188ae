"""SFT records -> Examples: chats or prompt/completion pairs, checked, encoded, truncated.

A record is ``{"messages": [{"role", "content"}, ...]}`` (system/user/assistant, any number
of turns) or ``{"prompt": str, "completion": str}``. What cannot be trained on is a counted
skip of its own kind (``data/skipped_<kind>``), never a crash and never a silent loss:
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.chat import ROLES, encode_chat, encode_prompt_completion
from finetune.config import HoldOut, SFTDataSection
from launcher.data.examples import Example, ExampleSet, read_examples
from launcher.data.records import CorpusError, Record
from launcher.data.tokenizer import TextTokenizer

SKIP_KINDS = {
    "not_a_chat": "neither messages nor prompt/completion",
    "empty_messages": "messages is empty",
    "invalid_message": "a message is not an object with role and content",
    "unknown_role": "a role other than system, user, assistant",
    "non_string_content": "a content that is not a string",
    "no_assistant_turn": "no assistant message to train on",
    "missing_prompt_completion": "prompt or completion missing or not a string",
    "no_target": "no trained token left after truncation to data.max_seq_len",
}
"""The skip kinds of SFT records (beside the reader's: invalid_json, invalid_utf8, ...)."""


def _bad(kind: str, detail: str) -> CorpusError:
    return CorpusError(f"{SKIP_KINDS[kind]}: {detail}", kind=kind)


def check_messages(messages: object) -> CorpusError | None:
    """Why ``messages`` is not a trainable conversation, or None."""
    if not isinstance(messages, list):
        return _bad("invalid_message", f"messages is a {type(messages).__name__}")
    if not messages:
        return _bad("empty_messages", "[]")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return _bad("invalid_message", f"messages[{i}] = {str(message)[:80]}")
        if message["role"] not in ROLES:
            return _bad("unknown_role", f"messages[{i}].role = {str(message['role'])[:40]!r}")
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            return _bad("non_string_content", f"messages[{i}].content is a {kind}")
    if not any(m["role"] == "assistant" for m in messages):
        return _bad("no_assistant_turn", f"roles {[m['role'] for m in messages]}")
    return None


@dataclass
class SFTEncoder:
    """The encode hook of ``read_examples`` for SFT records."""

    tokenizer: TextTokenizer
    max_seq_len: int
    template: str | None = None
    """A Jinja chat template (``chat.template: tokenizer``); None: the default segments."""

    def __call__(self, record: Record) -> Example | CorpusError:
        data = record.data
        if "messages" in data:
            problem = check_messages(data["messages"])
            if problem is not None:
                return problem
            example = encode_chat(self.tokenizer, data["messages"], record.where, self.template)
        elif "prompt" in data or "completion" in data:
            prompt, completion = data.get("prompt"), data.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                got = f"prompt {type(prompt).__name__}, completion {type(completion).__name__}"
                return _bad("missing_prompt_completion", got)
            example = encode_prompt_completion(self.tokenizer, prompt, completion, record.where)
        else:
            return _bad("not_a_chat", f"keys {sorted(data)[:8]}")
        if len(example) > self.max_seq_len:
            example = example.truncated(self.max_seq_len)
        if example.targets == 0:
            return _bad("no_target", f"{len(example)} tokens kept")
        return example


def read_sft_sets(
    cfg: SFTDataSection, encoder: SFTEncoder, seed: int
) -> tuple[ExampleSet, ExampleSet | None]:
    """The training set and the validation set (its sources, a seeded held-out fraction of
    the training examples, or None). Raises ``CorpusError`` (``on_error: raise`` at the first
    bad record; no usable example at all)."""
    train = read_examples(cfg.train, encoder, key="data.train", on_error=cfg.on_error)
    validation = None
    if isinstance(cfg.validation, list):
        validation = read_examples(
            cfg.validation, encoder, key="data.validation", on_error=cfg.on_error
        )
    elif isinstance(cfg.validation, HoldOut):
        n = len(train.examples)
        held = max(1, round(cfg.validation.fraction * n))
        if held >= n:
            raise CorpusError(
                f"data.validation.fraction: {n} training examples leave none after holding "
                f"out {held}"
            )
        chosen = set(np.random.default_rng([seed, 7]).permutation(n)[:held].tolist())
        kept = [e for i, e in enumerate(train.examples) if i not in chosen]
        out = [e for i, e in enumerate(train.examples) if i in chosen]
        validation = ExampleSet(out, train.counters.copy(), train.files)
        train = ExampleSet(kept, train.counters, train.files)
    return train, validation
