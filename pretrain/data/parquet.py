"""The parquet part of ``pretrain.data.documents.scan``: one text column, resumable by row.

A position is ``{"row": index of the next row}``; a resume opens only the row groups from the
one holding that row (the footer's row counts say which) and converts only the stripe's rows.

The text column may be any Arrow string type, or a dictionary of strings (pandas categoricals);
a null is a ``missing_text`` row. Parquet writers need not validate UTF-8 and neither does
Arrow's reader, so a batch that will not decode is converted row by row, the bad rows becoming
``invalid_utf8`` errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from pretrain.data.documents import CorpusError, Document, guarded, text_record

_BATCH = 1024


def scan_parquet(
    f: IO[bytes],
    path: str,
    text_field: str,
    id_field: str,
    row0: int,
    stripe: int,
    stripes: int,
    max_bytes: int | None,
    stats: dict[str, int],
) -> Iterator[tuple[Document | CorpusError, dict]]:
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
    if not _is_text(pa, text_type):
        raise CorpusError(
            f"column {text_field!r} holds {text_type}, not strings",
            file=path,
            kind="missing_column",
        )
    columns = [text_field] + ([id_field] if id_field in schema.names else [])
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    group, row = 0, 0  # the row group holding ``row0``, and its first row
    while group < len(sizes) and row + sizes[group] <= row0:
        row += sizes[group]
        group += 1
    if group == len(sizes):
        return
    try:
        batches = (
            batch  # group by group: pyarrow's batches may span row groups
            for g in range(group, len(sizes))
            for batch in pf.iter_batches(batch_size=_BATCH, row_groups=[g], columns=columns)
        )
        for batch in batches:
            n = batch.num_rows
            stats["decoded_bytes"] += batch.nbytes
            first = max(row, row0)
            first += (stripe - first) % stripes  # the stripe's first row from there
            if first < row + n:
                picked = range(first - row, n, stripes)
                rows = batch.take(pa.array(picked)) if stripes > 1 else batch.slice(picked[0])
                texts = _values(rows.column(0))
                ids = _values(rows.column(1)) if len(columns) > 1 else [None] * len(texts)
                stats["parsed_records"] += len(texts)
                for k, text, doc_id in zip(picked, texts, ids, strict=True):
                    line = row + k + 1
                    if isinstance(text, _NotUtf8) or isinstance(doc_id, _NotUtf8):
                        where = text_field if isinstance(text, _NotUtf8) else id_field
                        message = f"column {where!r} is not valid UTF-8"
                        item = CorpusError(message, file=path, line=line, kind="invalid_utf8")
                    else:
                        item = guarded(
                            path, line, text_record, text, doc_id, path, line, text_field, max_bytes
                        )
                    yield item, {"row": line}
            row += n
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(
            f"cannot read row {row + 1}: {exc}", file=path, line=row + 1, kind="unreadable"
        ) from None


class _NotUtf8:
    """Stands for a value whose bytes are not UTF-8."""


def _is_text(pa, text_type) -> bool:
    """Arrow string types (plain, large, view), or a dictionary of them."""
    if pa.types.is_dictionary(text_type):
        text_type = text_type.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return (
        pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or is_view(text_type)
    )


def _values(column) -> list:
    """The column as Python values; a string that is not UTF-8 becomes a ``_NotUtf8``."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # rare: find the bad rows one by one
        out = []
        for i in range(len(column)):
            try:
                out.append(column[i].as_py())
            except UnicodeDecodeError:
                out.append(_NotUtf8())
        return out
