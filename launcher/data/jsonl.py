"""JSON lines as bytes: plain, gzip or zstd files decoded piece by piece, cut into lines.

``pieces`` decodes (never more than ``_OUT`` bytes of output at a time, however well the data
compresses) and says where each piece sits: the member (gzip) or frame (zstd) holding it, the
cheapest place to resume; ``lines`` cuts the pieces into the lines of one stripe without
holding more than ``max_bytes`` of any. ``records.scan_records`` parses what they yield.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

_CHUNK = 1 << 20
"""Bytes read from a file at a time."""
_OUT = 256 << 10
"""Most gzip output at a time (zstd gives at most one 128 KiB block at a time)."""


class Broken(Exception):
    """The byte stream cannot go on at ``line`` (1-based); the reader turns it into a
    ``CorpusError`` naming the file and line."""

    def __init__(self, kind: str, what: str, detail: str):
        super().__init__(what)
        self.kind, self.what, self.detail = kind, what, detail
        self.line = 0


def pieces(
    f: Any, fmt: str, member: int, skip: int, stats: dict[str, int]
) -> Iterator[tuple[bytes, int, int]]:
    """Decoded bytes as ``(data, member, offset)``: ``data`` is found ``offset`` decoded bytes
    into the gzip member (zstd frame) starting at compressed byte ``member``, with
    ``(b"", next member, 0)`` at the end of each; a plain file is one member at 0.

    Starts at byte ``skip`` of ``member``; the bytes before it are decoded but not yielded.
    """
    codec = {"jsonl": "plain", "jsonl.gz": "gzip", "jsonl.zst": "zstd"}[fmt]
    errors: tuple[type[Exception], ...] = (zlib.error,)
    try:
        if codec == "plain":
            if skip:
                f.seek(skip)
            offset = skip
            while data := f.read(_CHUNK):
                stats["decoded_bytes"] += len(data)
                yield data, 0, offset
                offset += len(data)
            return
        if member:
            f.seek(member)
        if codec == "gzip":
            decoded = _gunzip(f, member)
        else:
            import zstandard

            errors = (zstandard.ZstdError,)
            decoded = _unzstd(f, member, zstandard.ZstdDecompressor())
        offset = 0
        for out, m in decoded:
            if out is None:  # the member ended; ``m`` is where the next one starts
                yield b"", m, 0
                offset = 0
                continue
            stats["decoded_bytes"] += len(out)
            if skip:
                cut = min(skip, len(out))
                out, skip, offset = out[cut:], skip - cut, offset + cut
            if out:
                yield out, m, offset
                offset += len(out)
    except errors as exc:
        raise Broken("unreadable", f"corrupt {codec} data", f": {exc}") from None
    except OSError as exc:
        raise Broken("unreadable", "cannot read", f": {exc}") from None


def _gunzip(f: Any, here: int) -> Iterator[tuple[bytes | None, int]]:
    """``(output, member start)`` of concatenated gzip members, ``(None, next start)`` after
    each. At most ``_OUT`` bytes of output at a time, however well the data compresses.

    A decompression object rather than ``gzip.GzipFile``: the latter drops the bytes it decoded
    before finding the end missing (so the error could not say which line was cut).
    """
    stream, member, data, more = None, here, b"", False
    while True:
        if not data and not more:
            data = f.read(_CHUNK)
            if not data:
                break
        if stream is None:
            if not data.strip(b"\0"):  # zero padding after the last member
                here, data = here + len(data), b""
                continue
            stream, member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), here
        out = stream.decompress(data, _OUT)
        rest = stream.unused_data if stream.eof else stream.unconsumed_tail
        here, data = here + len(data) - len(rest), rest
        more = len(out) == _OUT and not stream.eof  # zlib may hold more output back
        if out:
            yield out, member
        if stream.eof:
            stream = None
            yield None, here
    if stream is not None:
        raise Broken("truncated", "gzip stream ends early", " (truncated file?)")


def _unzstd(f: Any, here: int, dctx: Any) -> Iterator[tuple[bytes | None, int]]:
    """Like ``_gunzip`` for zstd frames, fed one block (at most 128 KiB of output) at a time.

    The frame layout is read here because zstandard's decompression object has no output
    limit and its ``stream_reader`` returns a truncated frame as a clean end of file.
    """

    def take(n: int) -> bytes:
        data = f.read(n)
        if len(data) < n:
            raise Broken("truncated", "zstd stream ends early", " (truncated file?)")
        return data

    while head := f.read(4):
        member = here
        if len(head) == 4 and head[0] & 0xF0 == 0x50 and head[1:] == b"\x2a\x4d\x18":
            size = int.from_bytes(take(4), "little")  # a skippable frame
            here += 8 + size
            while size:
                size -= len(take(min(size, _CHUNK)))
            continue
        if head != b"\x28\xb5\x2f\xfd":
            if not head.strip(b"\0") and not any(
                c.strip(b"\0") for c in iter(lambda: f.read(_CHUNK), b"")
            ):
                return  # zero padding after the last frame
            raise Broken("unreadable", "corrupt zstd data", ": not a zstd frame")
        descriptor = take(1)
        flags = descriptor[0]
        single = flags >> 5 & 1
        size = (not single) + (0, 1, 2, 4)[flags & 3] + (single, 2, 4, 8)[flags >> 6]
        unit, last, stream = head + descriptor + take(size), False, dctx.decompressobj()
        while True:
            out = stream.decompress(unit)
            here += len(unit)
            if out:
                yield out, member
            if last:
                break
            block = take(3)
            header = int.from_bytes(block, "little")
            last = bool(header & 1)
            unit = block + take(1 if header >> 1 & 3 == 1 else header >> 3)
            if last and flags & 4:
                unit += take(4)  # content checksum
        yield None, here


def lines(
    pieces: Iterator[tuple[bytes, int, int]],
    index: int,
    stripe: int,
    stripes: int,
    max_bytes: int | None,
) -> Iterator[tuple[int, bytes | None, int, tuple[int, int]]]:
    """``(line index, raw line or None when too long, its size, (member, offset) after it)``
    for the stripe's lines, starting with line ``index``; other lines are only counted.

    A line that ends a piece waits for the next piece, whose start (maybe a new member) is
    the cheapest place to resume. At most ``max_bytes`` of a line are held.
    """
    limit = 1 << 62 if max_bytes is None else max_bytes
    mine = index % stripes == stripe
    parts: list[bytes] = []  # the current line, while it is mine and within the limit
    size = 0
    held: tuple[int, bytes | None, int] | None = None
    end = (0, 0)
    try:
        for data, m, o in pieces:
            if held is not None:
                yield *held, (m, o)
                held = None
            end = (m, o + len(data))
            begin = 0
            while (nl := data.find(b"\n", begin)) >= 0:
                if mine:
                    size += nl - begin
                    raw = b"".join([*parts, data[begin:nl]]) if size <= limit else None
                    if nl + 1 < len(data):
                        yield index, raw, size, (m, o + nl + 1)
                    else:
                        held = (index, raw, size)
                parts, size, begin = [], 0, nl + 1
                index += 1
                mine = index % stripes == stripe
            if begin < len(data):
                size += len(data) - begin
                if mine and size <= limit:
                    parts.append(data[begin:])
                else:
                    parts = []
    except Broken as exc:
        if held is not None:
            yield *held, end
        exc.line = index + 1
        raise
    if held is not None:
        yield *held, end
    if size and mine:  # a last line without a newline
        yield index, b"".join(parts) if size <= limit else None, size, end
