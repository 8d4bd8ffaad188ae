"""Read documents from one corpus file: JSON lines (plain, gzip, zstd) or parquet.

``read_documents`` opens local paths and fsspec URLs alike and yields ``Document``s, decoding
UTF-8 strictly. Every problem raises ``CorpusError`` whose message names the file and, where it
applies, the line (or parquet row); the error also carries ``.file``, ``.line`` and ``.kind``.

Problems with one record (``RECORD_ERRORS``: bad JSON, bad UTF-8, a missing or non-string
text field) are separated from problems with the whole file (missing, truncated, unreadable,
no text column): ``iter_records`` yields the former as ``CorpusError`` values instead of raising
them, so a caller can skip and count bad records while still stopping on a broken file.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec

from launcher.errors import UserError

__all__ = [
    "FORMATS",
    "RECORD_ERRORS",
    "CorpusError",
    "Document",
    "detect_format",
    "iter_records",
    "read_documents",
]

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")

RECORD_ERRORS = frozenset({"invalid_json", "invalid_utf8", "missing_text"})
"""Kinds of ``CorpusError`` that concern one record; the rest of the file is still readable."""

_CHUNK = 1 << 20
_PARQUET_BATCH = 1024


class CorpusError(UserError):
    """Unusable corpus data; the message names the file and line where they are known.

    ``kind`` is one of ``missing_file``, ``unknown_format``, ``unreadable``, ``truncated``,
    ``missing_column`` (whole-file problems) or one of ``RECORD_ERRORS``.
    """

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, kind: str = ""
    ):
        self.file = file
        self.line = line
        self.kind = kind
        self.reason = message
        where = f"{file}:{line}" if file is not None and line is not None else file
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Document:
    text: str
    id: str
    """The record's id field, or ``<file>:<line>`` when it has none."""
    file: str
    line: int
    """1-based line number (JSON lines) or row number (parquet)."""


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


def read_documents(
    path: str, text_field: str = "text", format: str = "auto", id_field: str = "id"
) -> Iterator[Document]:
    """The documents of one file, in order; raises ``CorpusError`` on the first problem.

    ``path`` is a local path or an fsspec URL; ``format`` is ``auto`` (from the suffix) or one
    of ``FORMATS``. Empty lines are skipped.
    """
    for record in iter_records(path, text_field=text_field, format=format, id_field=id_field):
        if isinstance(record, CorpusError):
            raise record
        yield record


def iter_records(
    path: str, text_field: str = "text", format: str = "auto", id_field: str = "id"
) -> Iterator[Document | CorpusError]:
    """Like ``read_documents``, but yields record-level problems instead of raising them.

    Whole-file problems (missing, truncated or unreadable file, no text column) still raise.
    """
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise CorpusError(
            f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}",
            file=path,
            kind="unknown_format",
        )
    try:
        opened = fsspec.open(path, "rb")
        f = opened.open()
    except FileNotFoundError:
        raise CorpusError("no such file", file=path, kind="missing_file") from None
    except OSError as exc:
        raise CorpusError(f"cannot open: {exc}", file=path, kind="unreadable") from None
    try:
        if fmt == "parquet":
            yield from _parquet_records(f, path, text_field, id_field)
        else:
            yield from _json_records(_lines(f, fmt, path), path, text_field, id_field)
    finally:
        f.close()


# ---------------------------------------------------------------------------------- JSON lines


def _chunks(f: IO[bytes], fmt: str, path: str, where: list[int]) -> Iterator[bytes]:
    """Decompressed bytes of the file; ``where[0]`` is the line being read (for errors)."""
    if fmt == "jsonl":
        while chunk := f.read(_CHUNK):
            yield chunk
    elif fmt == "jsonl.gz":
        yield from _decompressed(
            f,
            path,
            where,
            "gzip",
            lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS),
            zlib.error,
        )
    else:
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        yield from _decompressed(f, path, where, "zstd", dctx.decompressobj, zstandard.ZstdError)


def _decompressed(
    f: IO[bytes],
    path: str,
    where: list[int],
    codec: str,
    new_stream: Callable[[], Any],
    codec_error: type[Exception],
) -> Iterator[bytes]:
    """Decompress concatenated gzip members or zstd frames, noticing a truncated last one.

    Decompression objects rather than ``gzip.GzipFile`` or zstandard's ``stream_reader``: the
    former drops the bytes it decoded before finding the end missing (so the error cannot say
    which line was cut), the latter returns a truncated frame as a clean end of file.
    """
    stream = None
    try:
        while data := f.read(_CHUNK):
            while data:
                if stream is None:
                    if not data.strip(b"\0"):  # zero padding after the last member
                        break
                    stream = new_stream()
                out = stream.decompress(data)
                if out:
                    yield out
                data = b""
                if stream.eof:  # member done; the rest of the input starts the next one
                    data, stream = stream.unused_data, None
    except codec_error as exc:
        raise CorpusError(
            f"corrupt {codec} data at line {where[0]}: {exc}",
            file=path,
            line=where[0],
            kind="unreadable",
        ) from None
    if stream is not None:
        raise CorpusError(
            f"{codec} stream ends early at line {where[0]} (truncated file?)",
            file=path,
            line=where[0],
            kind="truncated",
        )


def _lines(f: IO[bytes], fmt: str, path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line without the newline)`` for every line of the file."""
    where = [1]
    pending: list[bytes] = []  # the start of a line that spans chunks
    for chunk in _chunks(f, fmt, path, where):
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        parts = chunk.split(b"\n")
        if pending:
            parts[0] = b"".join([*pending, parts[0]])
        pending = [parts.pop()]
        for part in parts:
            yield where[0], part
            where[0] += 1
    rest = b"".join(pending)
    if rest:
        yield where[0], rest


def _json_records(
    lines: Iterator[tuple[int, bytes]], path: str, text_field: str, id_field: str
) -> Iterator[Document | CorpusError]:
    for line, raw in lines:
        if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte order mark
        if not raw.strip():
            continue
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield CorpusError(
                f"invalid UTF-8 at byte {exc.start} of the line",
                file=path,
                line=line,
                kind="invalid_utf8",
            )
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as exc:
            yield CorpusError(
                f"invalid JSON: {exc.msg} (column {exc.colno})",
                file=path,
                line=line,
                kind="invalid_json",
            )
            continue
        if not isinstance(record, dict):
            yield CorpusError(
                f"expected a JSON object, got {type(record).__name__}",
                file=path,
                line=line,
                kind="invalid_json",
            )
            continue
        text = record.get(text_field)
        if not isinstance(text, str):
            problem = (
                f"no {text_field!r} field"
                if text_field not in record
                else f"{text_field!r} is {type(text).__name__}, not a string"
            )
            yield CorpusError(
                f"{problem} (keys: {', '.join(list(record)[:8])})",
                file=path,
                line=line,
                kind="missing_text",
            )
            continue
        doc_id = record.get(id_field)
        yield Document(
            text=text,
            id=f"{path}:{line}" if doc_id is None else str(doc_id),
            file=path,
            line=line,
        )


# ------------------------------------------------------------------------------------ parquet


def _parquet_records(
    f: IO[bytes], path: str, text_field: str, id_field: str
) -> Iterator[Document | CorpusError]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(
            f"not a readable parquet file: {exc}", file=path, kind="unreadable"
        ) from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise CorpusError(
            f"no {text_field!r} column (columns: {', '.join(schema.names[:12])})",
            file=path,
            kind="missing_column",
        )
    text_type = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    if not (
        pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or is_view(text_type)
    ):
        raise CorpusError(
            f"column {text_field!r} holds {text_type}, not strings",
            file=path,
            kind="missing_column",
        )
    columns = [text_field] + ([id_field] if id_field in schema.names else [])
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
            for text, doc_id in zip(texts, ids, strict=True):
                row += 1
                if text is None:
                    yield CorpusError(
                        f"{text_field!r} is null", file=path, line=row, kind="missing_text"
                    )
                    continue
                yield Document(
                    text=text,
                    id=f"{path}:{row}" if doc_id is None else str(doc_id),
                    file=path,
                    line=row,
                )
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(
            f"cannot read row {row + 1}: {exc}", file=path, line=row + 1, kind="unreadable"
        ) from None
