"""Read records from one corpus file: JSON lines (plain, gzip, zstd) or parquet.

``scan_records`` is the one reader of the project: it opens local paths and fsspec URLs,
decodes UTF-8 strictly and yields each record with the position after it, a dict of ints that,
passed back as ``start``, resumes in O(1): plain JSON lines seek to the line, gzip/zstd restart
at the member (frame) holding it, parquet at its row group. With ``stripes``, record ``i``
(0-based line or row) goes to stripe ``i % stripes``; the lines of other stripes are split off
but never decoded. Problems with one record (``RECORD_ERRORS``, or a stage's own kinds) are
yielded as ``CorpusError`` values, so a caller can count and skip them; problems with the whole
file (missing, truncated, unreadable, a missing column) raise after everything good before them.
Messages name the file and, where known, the line (row): see ``.file``/``.line``/``.kind``.

What a record becomes is the ``View``'s business: ``RecordView`` keeps the whole JSON object or
parquet row (a ``Record``: chats, preference pairs, labelled texts), ``documents.TextView`` one
text field (pretraining's ``Document``). Whatever one record holds, it becomes the view's value
or a record-level ``CorpusError``: every conversion goes through ``guarded`` (no exception but
``MemoryError`` leaves it), and every string in it is valid Unicode (encodable as UTF-8: no lone
surrogates, which JSON's ``\\ud800`` escapes can produce), so no later step (tokenizer,
hashing, logging) meets a string it cannot encode.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

import fsspec

from launcher.data.jsonl import Broken, lines, pieces
from launcher.errors import UserError

__all__ = [
    "FORMATS",
    "RECORD_ERRORS",
    "CorpusError",
    "Record",
    "RecordView",
    "View",
    "detect_format",
    "guarded",
    "read_records",
    "scan_records",
]

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")

RECORD_ERRORS = frozenset(
    {
        "invalid_json",  # not JSON (also nested too deeply, integers over 4300 digits), no object
        "invalid_utf8",  # the line's bytes (or a parquet string) are not UTF-8
        "invalid_unicode",  # the text or id holds a lone surrogate (valid JSON, not Unicode)
        "missing_text",  # no text field, or one that is not a string (null, number, list, ...)
        "empty_text",
        "too_long",
        "invalid_record",  # anything else that failed while converting the record
        "encode_error",  # the tokenizer failed on the document (the stream's kind)
    }
)
"""Kinds of ``CorpusError`` that concern one record; the rest of the file is still readable.
A stage's encoder adds its own (``unknown_role``, ``no_label``, ...)."""

POSITION_KEYS = {
    "jsonl": ("line", "offset"),
    "jsonl.gz": ("line", "member", "skip"),
    "jsonl.zst": ("line", "member", "skip"),
    "parquet": ("row",),
}
"""The keys of a position per format: ``line``/``row`` is the 0-based index of the next record,
``offset`` its byte offset, ``member`` the compressed offset where the gzip member or zstd frame
holding it starts and ``skip`` the decompressed bytes of that member before it."""

STATS = ("read_bytes", "decoded_bytes", "parsed_records")


class CorpusError(UserError):
    """Unusable corpus data; the message names the file and line where they are known.

    ``kind`` is one of ``missing_file``, ``unknown_format``, ``unreadable``, ``truncated``,
    ``missing_column`` (whole-file problems) or one of ``RECORD_ERRORS``.
    """

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, kind: str = ""
    ):
        # A message may quote the record (a key, a lone surrogate): keep it encodable for logs.
        message = printable(message)
        self.file = file
        self.line = line
        self.kind = kind
        self.reason = message
        where = f"{file}:{line}" if file is not None and line is not None else file
        where = printable(where) if where else where  # a file name may not be UTF-8 either
        super().__init__(f"{where}: {message}" if where else message)


def printable(text: str) -> str:
    """``text`` with whatever UTF-8 cannot encode (lone surrogates) as ``\\udXXX`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode, i.e. encodable as UTF-8 (no lone surrogates)."""
    if text.isascii():  # O(1) for Python's compact strings: the common case costs nothing
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_unicode(what: str, text: str) -> str:
    """Why ``text`` (the value of ``what``) is not valid Unicode: where its lone surrogate is."""
    at = next(i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff")
    surrogate = f"U+{ord(text[at]):04X}"
    return f"{what!r} is not valid Unicode: a lone surrogate {surrogate} at character {at}"


def detect_format(path: str) -> str:
    """``jsonl``, ``jsonl.gz``, ``jsonl.zst`` or ``parquet`` from the file name's suffix."""
    name = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    if name.endswith(".parquet"):
        return "parquet"
    for base in (".jsonl", ".json", ".ndjson"):
        if name.endswith(base):
            return "jsonl"
        if name.endswith(base + ".gz"):
            return "jsonl.gz"
        if name.endswith((base + ".zst", base + ".zstd")):
            return "jsonl.zst"
    raise CorpusError(
        "cannot tell the format from the file name; expected .jsonl/.json/.ndjson "
        "(optionally .gz or .zst) or .parquet, or set the source's format",
        file=path,
        kind="unknown_format",
    )


class View(Protocol):
    """What a scan makes of each record."""

    def columns(self, schema: Any, path: str) -> list[str] | None:
        """The parquet columns to read (None: all) of a file with this Arrow ``schema``;
        raises ``CorpusError`` (``missing_column``) when the file cannot serve the view."""
        ...

    def convert(self, record: dict, path: str, line: int, max_bytes: int | None) -> Any:
        """The value of one record (a JSON object or a parquet row as a dict), a record-level
        ``CorpusError``, or None to pass over it silently."""
        ...


@dataclass(frozen=True)
class Record:
    """One whole record: a JSON object, or a parquet row (its columns as keys)."""

    data: dict[str, Any]
    id: str
    """The record's id field, or ``<file>:<line>`` when it has none."""
    file: str
    line: int
    """1-based line number (JSON lines) or row number (parquet)."""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class RecordView:
    """Records kept whole (``Record``); only their strings are checked (valid Unicode)."""

    id_field: str = "id"

    def columns(self, schema: Any, path: str) -> list[str] | None:
        return None

    def convert(self, record: dict, path: str, line: int, max_bytes: int | None) -> Any:
        if (problem := _first_lone_surrogate(record, "")) is not None:
            return bad(path, line, "invalid_unicode", problem)
        doc_id = record.get(self.id_field)
        doc_id = f"{path}:{line}" if doc_id is None else str(doc_id)
        return Record(data=record, id=doc_id, file=path, line=line)


def _first_lone_surrogate(value: Any, where: str) -> str | None:
    """Where the first string of ``value`` (keys included) that is not valid Unicode is."""
    if isinstance(value, str):
        return None if is_unicode(value) else not_unicode(where or "record", value)
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        name = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and not is_unicode(key):
            return not_unicode(f"{where or 'record'} key", key)
        if (problem := _first_lone_surrogate(item, name)) is not None:
            return problem
    return None


def read_records(
    path: str, format: str = "auto", view: View | None = None
) -> Iterator[Record | CorpusError]:
    """Every record of one file (``RecordView`` by default) and every record-level problem,
    in order; whole-file problems raise."""
    for item, _ in scan_records(path, view or RecordView(), format=format):
        yield item


def scan_records(
    path: str,
    view: View,
    *,
    format: str = "auto",
    start: dict | None = None,
    stripe: int = 0,
    stripes: int = 1,
    max_bytes: int | None = None,
    stats: dict[str, int] | None = None,
) -> Iterator[tuple[Any, dict]]:
    """``(the view's value or a record-level error, position right after it)`` for each
    record of a stripe.

    ``start`` is a position yielded by an earlier scan of the same file with the same format and
    striping (``None``: the beginning); the scan goes on with the next record of the stripe. A
    position after the last record resumes to nothing. Records longer than ``max_bytes`` bytes
    are ``too_long`` errors and never held whole in memory. ``stats`` (``STATS`` keys) is
    incremented in place: compressed bytes read, bytes decoded, records parsed.
    """
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise CorpusError(
            f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}",
            file=path,
            kind="unknown_format",
        )
    if not 0 <= stripe < stripes:
        raise ValueError(f"stripe {stripe} of {stripes}: need 0 <= stripe < stripes")
    keys = POSITION_KEYS[fmt]
    if start is not None and (
        set(start) != set(keys) or not all(type(start[k]) is int and start[k] >= 0 for k in keys)
    ):
        raise ValueError(f"{path}: {start!r} is not a {fmt} position (keys: {', '.join(keys)})")
    at = [0] * len(keys) if start is None else [start[k] for k in keys]
    stats = {} if stats is None else stats
    for key in STATS:  # setdefault, not update: a Counter's update() adds
        stats.setdefault(key, 0)
    try:
        opened = fsspec.open(path, "rb")  # kept referenced while ``f`` is in use
        f = opened.open()
    except FileNotFoundError:
        raise CorpusError("no such file", file=path, kind="missing_file") from None
    except OSError as exc:
        raise CorpusError(f"cannot open: {exc}", file=path, kind="unreadable") from None
    try:
        counted = _Counted(f, stats)
        if fmt == "parquet":
            from launcher.data.parquet import scan_parquet

            yield from scan_parquet(counted, path, view, at[0], stripe, stripes, max_bytes, stats)
        else:
            plain = fmt == "jsonl"
            line, member, skip = (at[0], 0, at[1]) if plain else at
            decoded = pieces(counted, fmt, member, skip, stats)
            parsed = _parsed(decoded, path, view, plain, line, stripe, stripes, max_bytes, stats)
            try:
                yield from parsed
            except Broken as exc:  # what was good before it has been yielded
                message = f"{exc.what} at line {exc.line}{exc.detail}"
                raise CorpusError(message, file=path, line=exc.line, kind=exc.kind) from None
    finally:
        f.close()


def _parsed(
    decoded: Iterator[tuple[bytes, int, int]],
    path: str,
    view: View,
    plain: bool,
    line: int,
    stripe: int,
    stripes: int,
    max_bytes: int | None,
    stats: dict[str, int],
) -> Iterator[tuple[Any, dict]]:
    """The view's value (or error) of each line of a stripe, and the position after it."""
    for index, raw, size, (m, o) in lines(decoded, line, stripe, stripes, max_bytes):
        after = {"line": index + 1, **({"offset": o} if plain else {"member": m, "skip": o})}
        if raw is None:
            message = f"the record is {size} bytes, over the limit of {max_bytes}"
            yield bad(path, index + 1, "too_long", message), after
        elif (
            item := guarded(path, index + 1, _json_record, raw, index, path, view, stats)
        ) is not None:
            yield item, after


class _Counted:
    """A file whose reads are added to ``stats["read_bytes"]``."""

    def __init__(self, f: IO[bytes], stats: dict[str, int]):
        self._f, self._stats = f, stats

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._stats["read_bytes"] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def bad(path: str, line: int, kind: str, message: str) -> CorpusError:
    return CorpusError(message, file=path, line=line, kind=kind)


def guarded(path: str, line: int, convert: Callable[..., Any], *args: Any) -> Any:
    """``convert(*args)``, the one way a record becomes a view's value: any exception it raises
    (but ``MemoryError``) is the record's ``invalid_record`` error, never the file's or the run's.
    """
    try:
        return convert(*args)
    except MemoryError:
        raise
    except Exception as exc:
        message = f"cannot read the record: {type(exc).__name__}: {exc}"
        return bad(path, line, "invalid_record", message)


def _json_record(raw: bytes, index: int, path: str, view: View, stats: dict[str, int]) -> Any:
    """The view's value of the record on one line, why there is none, or ``None`` for an
    empty line."""
    line = index + 1
    if index == 0 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark
    if not raw.strip():
        return None
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(path, line, "invalid_utf8", f"invalid UTF-8 at byte {exc.start} of the line")
    stats["parsed_records"] += 1
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return bad(path, line, "invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return bad(path, line, "invalid_json", "invalid JSON: nested too deeply to parse")
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        return bad(path, line, "invalid_json", f"invalid JSON: {exc}")
    if not isinstance(record, dict):
        message = f"expected a JSON object, got {type(record).__name__}"
        return bad(path, line, "invalid_json", message)
    return view.convert(record, path, line, None)  # the line's length was checked already
