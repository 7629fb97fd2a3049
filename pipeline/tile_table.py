"""Per-tile records as Parquet tables: one row per tile, one column per field.

The pipeline keeps a record per tile in three places (the cube's ingest manifest, the inference manifest of a
tile directory, a refresh version's tile state). As JSON documents those are rewritten whole and grow to
hundreds of MB at 10^5 tiles (a refresh version keeps every tile's seen item ids); as Parquet the same records
are a few MB (item ids repeat from tile to tile: dictionary-encoded, then Zstandard), typed, and open in pandas,
DuckDB, QGIS or ``pyarrow.parquet.read_table`` without this package. What a scheduler reads (``latest.json``,
the summary line, ``manifest.json``'s counts) stays a small JSON document beside the table.

    write_records(path, {"31TDJ_..": {"status": "done", "seen": ["S2A_..", ..]}, ..})
    read_records(path) -> {"31TDJ_..": {"status": "done", "seen": [..]}, ..}

Column types are pyarrow's inference over every row (a field a row lacks is null there and is left out of that
row's record when read back); nested records become struct columns, lists list columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline import storage

KEY = "tile"  # the column naming the tile of a row
MEDIA_TYPE = "application/vnd.apache.parquet"  # registered with IANA in 2024
COMPRESSION = "zstd"


def write_records(path: str | Path, records: Mapping[str, Mapping[str, Any]], key: str = KEY) -> Path:
    """Write ``{tile_id: record}`` as a Parquet table at ``path`` (a local path or an ``s3://`` URL; whole and
    atomically, ``pipeline.storage.write_bytes``), rows sorted by tile id; returns ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{key: t, **{k: v for k, v in rec.items() if k != key}} for t, rec in sorted(records.items())]
    names = _column_names(rows, key)
    # column by column: pa.Table.from_pylist would take the fields of the first row only
    table = pa.table({n: pa.array([r.get(n) for r in rows], type=pa.string() if n == key else None) for n in names})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression=COMPRESSION)
    storage.write_bytes(path, buf.getvalue().to_pybytes())  # whole: a temporary file + os.replace, or one PUT
    return Path(path) if not storage.is_remote(path) else path


def read_records(path: str | Path, what: str = "the tile table", fix: str = "move it away to rebuild it",
                 key: str = KEY, columns: Iterable[str] | None = None) -> dict[str, dict]:
    """``{tile_id: record}`` from a table :func:`write_records` wrote (null fields left out); ``columns``: only
    those fields (the key is always read). A damaged or missing file raises
    :class:`~pipeline.jsonfiles.CorruptRecordError` naming ``what``, the file and ``fix``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.jsonfiles import CorruptRecordError

    cols = None if columns is None else [key, *(c for c in columns if c != key)]
    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(path)), columns=cols)
    except (pa.ArrowException, OSError) as e:
        raise CorruptRecordError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); {fix}") from None
    if key not in table.column_names:
        raise CorruptRecordError(f"{what} {path} has no {key!r} column; {fix}")
    cols = table.to_pydict()  # column by column: faster than Table.to_pylist's row dicts
    tiles = cols.pop(key)
    names, values = list(cols), list(cols.values())
    return {t: {k: v for k, v in zip(names, row, strict=True) if v is not None}
            for t, row in zip(tiles, zip(*values, strict=True) if values else ((),) * len(tiles), strict=True)}


def _column_names(rows: list[dict], key: str) -> list[str]:
    """The key first, then every field in the order rows first name it."""
    names = {key: None}
    for r in rows:
        for k in r:
            names.setdefault(k, None)
    return list(names)
