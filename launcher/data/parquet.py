"""The parquet part of ``launcher.data.records.scan_records``: rows, resumable by row.

A position is ``{"row": index of the next row}``; a resume opens only the row groups from the
one holding that row (the footer's row counts say which) and converts only the stripe's rows,
and only the columns the view asks for (``View.columns``), each row as a dict.

Parquet writers need not validate UTF-8 and neither does Arrow's reader, so a batch that will
not decode is converted row by row, the bad rows becoming ``invalid_utf8`` errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

from launcher.data.records import CorpusError, View, guarded

_BATCH = 1024


def scan_parquet(
    f: IO[bytes],
    path: str,
    view: View,
    row0: int,
    stripe: int,
    stripes: int,
    max_bytes: int | None,
    stats: dict[str, int],
) -> Iterator[tuple[Any, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(
            f"not a readable parquet file: {exc}", file=path, kind="unreadable"
        ) from None
    schema = pf.schema_arrow
    columns = view.columns(schema, path) or list(schema.names)
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
                values = [_values(rows.column(c)) for c in range(len(columns))]
                stats["parsed_records"] += len(picked)
                for k, row_values in zip(picked, zip(*values, strict=True), strict=True):
                    line = row + k + 1
                    broken = [
                        c
                        for c, v in zip(columns, row_values, strict=True)
                        if isinstance(v, _NotUtf8)
                    ]
                    if broken:
                        message = f"column {broken[0]!r} is not valid UTF-8"
                        item = CorpusError(message, file=path, line=line, kind="invalid_utf8")
                    else:
                        record = dict(zip(columns, row_values, strict=True))
                        item = guarded(path, line, view.convert, record, path, line, max_bytes)
                    if item is not None:
                        yield item, {"row": line}
            row += n
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(
            f"cannot read row {row + 1}: {exc}", file=path, line=row + 1, kind="unreadable"
        ) from None


class _NotUtf8:
    """Stands for a value whose bytes are not UTF-8."""


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
