"""Documents: the text view of records, what pretraining (and tokenizer training) reads.

A ``Document`` is one record's text field (and id). ``scan`` is ``records.scan_records`` with
the ``TextView``: a record without the field, or whose field is not a non-blank string of valid
Unicode, is a record-level ``CorpusError`` (``missing_text``, ``empty_text``,
``invalid_unicode``); a parquet file without a string text column is a whole-file one
(``missing_column``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from launcher.data.records import (
    FORMATS,
    RECORD_ERRORS,
    STATS,
    CorpusError,
    bad,
    detect_format,
    is_unicode,
    not_unicode,
    scan_records,
)

__all__ = [
    "FORMATS",
    "RECORD_ERRORS",
    "STATS",
    "CorpusError",
    "Document",
    "TextView",
    "detect_format",
    "is_unicode",
    "iter_records",
    "read_documents",
    "scan",
]


@dataclass(frozen=True)
class Document:
    text: str
    id: str
    """The record's id field, or ``<file>:<line>`` when it has none."""
    file: str
    line: int
    """1-based line number (JSON lines) or row number (parquet)."""


@dataclass(frozen=True)
class TextView:
    """A record's ``text_field`` as a ``Document`` (parquet: only that column and the id's)."""

    text_field: str = "text"
    id_field: str = "id"

    def columns(self, schema: Any, path: str) -> list[str] | None:
        import pyarrow as pa

        if self.text_field not in schema.names:
            raise CorpusError(
                f"no {self.text_field!r} column (columns: {', '.join(schema.names[:12])})",
                file=path,
                kind="missing_column",
            )
        text_type = schema.field(self.text_field).type
        if not _is_text(pa, text_type):
            raise CorpusError(
                f"column {self.text_field!r} holds {text_type}, not strings",
                file=path,
                kind="missing_column",
            )
        return [self.text_field] + ([self.id_field] if self.id_field in schema.names else [])

    def convert(
        self, record: dict, path: str, line: int, max_bytes: int | None
    ) -> Document | CorpusError:
        if self.text_field not in record:
            keys = ", ".join(list(record)[:8])
            message = f"no {self.text_field!r} field (keys: {keys})"
            return bad(path, line, "missing_text", message)
        text, doc_id = record[self.text_field], record.get(self.id_field)
        return text_record(text, doc_id, path, line, self.text_field, max_bytes)


def _is_text(pa, text_type) -> bool:
    """Arrow string types (plain, large, view), or a dictionary of them."""
    if pa.types.is_dictionary(text_type):
        text_type = text_type.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return (
        pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or is_view(text_type)
    )


def text_record(
    text: Any, doc_id: Any, path: str, line: int, text_field: str, max_bytes: int | None
) -> Document | CorpusError:
    """The document of a record whose text field holds ``text``, or why there is none.

    The text must be a non-blank string of valid Unicode (so must the record's id, as a
    string) and, with ``max_bytes``, at most that many bytes of UTF-8.
    """
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        return bad(path, line, "missing_text", f"{text_field!r} is {kind}, not a string")
    if not text.strip():
        return bad(path, line, "empty_text", f"{text_field!r} is empty or blank")
    if not is_unicode(text):
        return bad(path, line, "invalid_unicode", not_unicode(text_field, text))
    if max_bytes is not None and len(text) * 4 > max_bytes and len(text.encode()) > max_bytes:
        size = len(text.encode())
        return bad(
            path, line, "too_long", f"the text is {size} bytes, over the limit of {max_bytes}"
        )
    if doc_id is None:
        doc_id = f"{path}:{line}"
    elif not is_unicode(doc_id := str(doc_id)):
        return bad(path, line, "invalid_unicode", not_unicode("id", doc_id))
    return Document(text=text, id=doc_id, file=path, line=line)


def read_documents(
    path: str, text_field: str = "text", format: str = "auto", id_field: str = "id"
) -> Iterator[Document]:
    """The documents of one file, in order; raises ``CorpusError`` on the first problem.

    ``path`` is a local path or an fsspec URL; ``format`` is ``auto`` (from the suffix) or one
    of ``FORMATS``. Empty lines and documents whose text is empty or blank are skipped.
    """
    for record in iter_records(path, text_field=text_field, format=format, id_field=id_field):
        if isinstance(record, Document):
            yield record
        elif record.kind != "empty_text":
            raise record


def iter_records(
    path: str, text_field: str = "text", format: str = "auto", id_field: str = "id"
) -> Iterator[Document | CorpusError]:
    """Like ``read_documents``, but yields record-level problems instead of raising them.

    Whole-file problems (missing, truncated or unreadable file, no text column) still raise.
    """
    for item, _ in scan(path, format=format, text_field=text_field, id_field=id_field):
        yield item


def scan(
    path: str, *, text_field: str = "text", id_field: str = "id", **kwargs: Any
) -> Iterator[tuple[Document | CorpusError, dict]]:
    """``records.scan_records`` of the ``TextView`` (same ``format``, ``start``, ``stripe``,
    ``stripes``, ``max_bytes`` and ``stats`` arguments)."""
    return scan_records(path, TextView(text_field, id_field), **kwargs)
