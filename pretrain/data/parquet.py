"""The parquet part of ``pretrain.data.documents.scan``: one text column, resumable by row.

A position is ``{"row": index of the next row}``; a resume opens only the row groups from the
one holding that row (the footer's row counts say which) and converts only the stripe's rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from pretrain.data.documents import CorpusError, Document, text_record

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
                texts = rows.column(0).to_pylist()
                ids = rows.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
                stats["parsed_records"] += len(texts)
                for k, text, doc_id in zip(picked, texts, ids, strict=True):
                    line = row + k + 1
                    yield (
                        text_record(text, doc_id, path, line, text_field, max_bytes),
                        {"row": line},
                    )
            row += n
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(
            f"cannot read row {row + 1}: {exc}", file=path, line=row + 1, kind="unreadable"
        ) from None
