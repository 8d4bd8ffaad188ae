"""Chat templates, encoded segment by segment so that role markers and end-of-turn are ids.

``TextTokenizer`` encodes special-token strings as text (a web page's "</s>" must not end a
document), so a conversation rendered to one string and then encoded would turn the
end-of-turn marker into plain characters. The default template is therefore encoded per
segment: a plain-text header ("User:\\n", never trained), the content (trained for the
assistant) and the tokenizer's EOS *by id* as end of turn (trained for the assistant). It
adds no token and no BOS. Its Jinja form (``DEFAULT_TEMPLATE``) is saved in
``tokenizer_config.json``; rendered and encoded by an HF tokenizer it gives the same ids,
because every segment boundary is a newline (an added token of kiln's tokenizers, a
pre-tokenizer split of byte-level BPEs) or the EOS special token.

``chat.template: tokenizer`` uses the parent tokenizer's own Jinja template instead: the
conversation is rendered whole, encoded with special tokens parsed, and the trained tokens
are those whose characters fall in an assistant turn (found by rendering the prefixes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2

from launcher.data.examples import Example
from launcher.data.tokenizer import TextTokenizer
from launcher.errors import UserError

ROLES = ("system", "user", "assistant")
HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}
DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}:\n{{ message['content'] }}{{ eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif -%}"
)
"""The default template in Jinja (HF's ``apply_chat_template``); ``encode_chat`` is its twin."""


def encode_chat(
    tokenizer: TextTokenizer, messages: Sequence[dict], where: str = "", template: str | None = None
) -> Example:
    """Tokens and loss mask of a valid conversation: assistant content and its end of turn
    are trained, nothing else. ``template`` (a Jinja string): render with it instead of the
    default segments (``chat.template: tokenizer``)."""
    if template is not None:
        return _encode_rendered(tokenizer, messages, template, where)
    eos = tokenizer.eos_id
    segments: list[tuple[list[int], bool]] = []
    for message in messages:
        trained = message["role"] == "assistant"
        segments.append((tokenizer.encode(HEADERS[message["role"]]), False))
        segments.append((tokenizer.encode(message["content"]), trained))
        segments.append(([eos], trained))
    return Example.from_segments(segments, where)


def encode_prompt_completion(
    tokenizer: TextTokenizer, prompt: str, completion: str, where: str = ""
) -> Example:
    """``prompt`` (not trained), ``completion`` and EOS (trained); no template, no BOS (as
    TRL does for prompt/completion records)."""
    segments = [
        (tokenizer.encode(prompt), False),
        (tokenizer.encode(completion), True),
        ([tokenizer.eos_id], True),
    ]
    return Example.from_segments(segments, where)


def generation_prompt(
    tokenizer: TextTokenizer, messages: Sequence[dict], template: str | None = None
) -> list[int]:
    """The ids that ask the model for the next assistant turn after ``messages``."""
    if template is not None:
        text = render(template, messages, tokenizer, add_generation_prompt=True)
        return _encode_parsing_specials(tokenizer, text).ids
    ids: list[int] = []
    for message in messages:
        ids += tokenizer.encode(HEADERS[message["role"]]) + tokenizer.encode(message["content"])
        ids.append(tokenizer.eos_id)
    return ids + tokenizer.encode(HEADERS["assistant"])


def render(
    template: str,
    messages: Sequence[dict],
    tokenizer: TextTokenizer,
    add_generation_prompt: bool = False,
) -> str:
    """``template`` rendered as HF's ``apply_chat_template`` does (same variables)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    specials = {f"{k}_token": v or "" for k, v in tokenizer.tokens.items()}
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **specials
    )


def _encode_parsing_specials(tokenizer: TextTokenizer, text: str):
    backend = tokenizer.backend
    backend.encode_special_tokens = False  # a rendered template's markers are meant
    try:
        return backend.encode(text, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = True


def _encode_rendered(
    tokenizer: TextTokenizer, messages: Sequence[dict], template: str, where: str
) -> Example:
    text = render(template, messages, tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(render(template, messages[:i], tokenizer, add_generation_prompt=True))
            end = len(render(template, messages[: i + 1], tokenizer))
            spans.append((start, end))
    encoding = _encode_parsing_specials(tokenizer, text)
    mask = [any(s <= a < e for s, e in spans) for a, _ in encoding.offsets]
    return Example(encoding.ids, mask, where=where)


def chosen_template(setting: str, tokenizer: TextTokenizer, parent) -> str | None:
    """The Jinja template ``chat.template`` asks for: None for ``default`` (the segment
    encoding above), the parent tokenizer's own for ``tokenizer``. Raises ``UserError`` when
    the parent's tokenizer_config.json has none."""
    if setting != "tokenizer":
        return None
    if tokenizer.chat_template is None:
        raise UserError(
            f"chat.template=tokenizer: {parent}/tokenizer_config.json has no "
            "chat_template; use chat.template: default"
        )
    return tokenizer.chat_template
