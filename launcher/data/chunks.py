"""Long documents encoded chunk by chunk, with exactly the ids of the whole document.

A chunk ends before a space or newline that follows a non-space character. The pre-tokenizers
of BPE (byte-level regex), sentencepiece (words start at a space) and WordPiece split there,
and no vocabulary piece of a sentencepiece-style model holds a non-space followed by "▁", so
no token spans such a cut: the ids of the chunks, concatenated, are the ids of the document.
Tokenizers that mark the start of a text (Llama's ``Prepend("▁")``, a prefix space) would
treat every chunk as a start, so a chunk that continues a document is encoded behind a one-
character anchor whose ids are then removed. ``splices_cleanly`` checks a tokenizer once; the
tests check the real Llama, GPT-Neo and trained sentencepiece tokenizers on real web text.

Chunks of ``CHUNK_CHARS`` (about 2k tokens) encode as fast as ordinary documents: one call
on a whole 1 MB text was 2-4x slower with the trained sentencepiece, Llama and GPT-Neo
tokenizers (BPE merges in one long "word" without a pre-tokenizer), 64k chunks 1.1-1.4x.
Text without a cut (a run with no space or newline) stays one chunk.
"""

from __future__ import annotations

import re

from launcher.data.tokenizer import TextTokenizer

CHUNK_CHARS = 1 << 13
"""Characters per chunk (at least; a chunk ends at the next cut)."""
LONG_CHARS = 1 << 16
"""Documents longer than this (in characters) stream past the shuffle window."""
_CUT = re.compile(r"(?<=\S)[ \n]")
_ANCHOR = "a"
_PROBE = (
    "Plain words, then  two spaces,\ttabs\t\tand\nnew lines\n\n  indented  code()\r\n"
    "windows line; naïve café 中文字符 日本語 🤖 |||EMAIL_ADDRESS||| </s> end."
)


def chunk_end(text: str, start: int, size: int = CHUNK_CHARS) -> int:
    """The end of the chunk of ``text`` that begins at ``start``: the first cut at least
    ``size`` characters on, or the end of the text."""
    if len(text) - start <= size:
        return len(text)
    found = _CUT.search(text, start + size)
    return found.start() if found else len(text)


def encode_chunk(tokenizer: TextTokenizer, chunk: str, continues: bool) -> tuple[list[int], bool]:
    """Ids of ``chunk`` (cut by ``chunk_end``) as part of its document, and whether the anchor
    came off cleanly (``False``: the ids are the chunk's own, maybe not the document's)."""
    if not continues:
        return tokenizer.encode(chunk), True
    anchor = tokenizer.encode(_ANCHOR)
    ids = tokenizer.encode(_ANCHOR + chunk)
    if ids[: len(anchor)] == anchor:
        return ids[len(anchor) :], True
    return tokenizer.encode(chunk), False


def encode_chunked(tokenizer: TextTokenizer, text: str, size: int = CHUNK_CHARS) -> list[int]:
    """``text`` encoded chunk by chunk: the ids of ``tokenizer.encode(text)`` when
    ``splices_cleanly(tokenizer)``, faster for long texts."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = chunk_end(text, start, size)
        ids += encode_chunk(tokenizer, text[start:end], start > 0)[0]
        start = end
    return ids


def splices_cleanly(tokenizer: TextTokenizer) -> bool:
    """Whether ``tokenizer`` gives a probe text's ids when it is cut at every possible place."""
    return encode_chunked(tokenizer, _PROBE, size=1) == tokenizer.encode(_PROBE)
