"""Parquet tables under <data_root>/tables and the DuckDB catalog of views over them.

A table is a folder of Parquet parts. A part is written to a temporary name and renamed into place, so a reader
(or a re-run after a crash) sees whole parts or none. Each table also holds a zero-row `_schema.parquet`, so its
view exists and has the right columns before any data arrives. Queries live in sql/, one per file.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import layout
from tasks.pathologies import CHEXPERT_LABELS, column_name, PATHOLOGIES


_LABEL_FIELDS = [pa.field(column_name(name), pa.float32()) for name in CHEXPERT_LABELS]

SCHEMAS: dict[str, pa.Schema] = {
    # One row per image listed by the source's metadata CSV that was decoded and stored.
    "images": pa.schema([
        ("dicom_id", pa.string()), ("subject_id", pa.int64()), ("study_id", pa.int64()),
        ("view_position", pa.string()), ("rows", pa.int32()), ("columns", pa.int32()),
        ("photometric", pa.string()), ("source_path", pa.string()), ("sha256", pa.string()),
        ("status", pa.string()),
    ]),
    # Where each image's preprocessed pixels are: row `shard_row` of pixels/<resolution>/<shard>.npy.
    "pixels": pa.schema([
        ("dicom_id", pa.string()), ("resolution", pa.int32()), ("shard", pa.string()), ("shard_row", pa.int32()),
    ]),
    # text_encoding: what decoded the report file, "utf-8", or "cp1252" / "latin-1" for one that is not valid UTF-8
    # (tasks.data.reports).
    "reports": pa.schema([
        ("study_id", pa.int64()), ("subject_id", pa.int64()), ("findings", pa.string()),
        ("impression", pa.string()), ("raw_text", pa.string()), ("parser_rule", pa.string()),
        ("impression_tokens", pa.int32()), ("impression_truncated", pa.bool_()), ("text_encoding", pa.string()),
    ]),
    # labeler: 'chexpert' or 'negbio'. Values as in the source: 1, 0, -1, null.
    "labels": pa.schema([("subject_id", pa.int64()), ("study_id", pa.int64()), ("labeler", pa.string())]
                        + _LABEL_FIELDS),
    "metadata": pa.schema([
        ("dicom_id", pa.string()), ("subject_id", pa.int64()), ("study_id", pa.int64()),
        ("view_position", pa.string()), ("rows", pa.int32()), ("columns", pa.int32()),
        ("study_date", pa.int32()), ("study_time", pa.float64()), ("procedure", pa.string()),
        ("view_code", pa.string()), ("orientation", pa.string()),
    ]),
    "splits": pa.schema([
        ("dicom_id", pa.string()), ("study_id", pa.int64()), ("subject_id", pa.int64()), ("split", pa.string()),
    ]),
    # Every input that was not ingested, with why. item_kind: image, report, csv_row, file.
    "rejects": pa.schema([
        ("item_id", pa.string()), ("item_kind", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
        ("detail", pa.string()), ("source_path", pa.string()),
    ]),
    # Where a study's impression embedding lies: rows start .. start + length - 1 of text/<encoder slug>/<shard>.npy
    # ([tokens, D] float16, tasks.generators.embeddings).
    "text_embeddings": pa.schema([
        ("study_id", pa.int64()), ("encoder_id", pa.string()), ("shard", pa.string()), ("start", pa.int64()),
        ("length", pa.int32()),
    ]),
    # An image's VQ-GAN codebook indices, row-major over the V x V token grid (tasks.generators.tokens).
    "tokens": pa.schema([("dicom_id", pa.string()), ("vqgan_id", pa.string()), ("tokens", pa.list_(pa.int16()))]),
    # A generated image (tasks.generators.synthesis): row `shard_row` of synthetic/<output_id>/<shard>.npy, made by
    # the weights `generator_id` with the sampling settings `output_id` names (the JSON in `sampling`) from the
    # impression `prompt` of training study `source_study_id`, whose classifier labels (NULL = masked) it carries.
    # `target` is the pathology the balancing plan drew it for; `sampling` is the generator's provenance as JSON.
    "synthetic": pa.schema([
        ("synth_id", pa.string()), ("generator_id", pa.string()), ("output_id", pa.string()),
        ("plan_position", pa.int32()),
        ("target", pa.string()), ("prompt", pa.string()), ("source_study_id", pa.int64()),
        *[pa.field(column_name(name), pa.float32()) for name in PATHOLOGIES],
        ("seed", pa.int64()), ("sampling", pa.string()), ("resolution", pa.int32()), ("shard", pa.string()),
        ("shard_row", pa.int32()),
    ]),
}


def read_sql(name: str) -> str:
    """The text of sql/<name>.sql."""
    return (layout.SQL_DIR / f"{name}.sql").read_text()


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`: renamed to `path` when the block succeeds, removed when it fails.

    Temp names start with '.' and end with '.tmp', so globs over real outputs never see them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_part(data_root: Path, table: str, part: str, rows: pa.Table | list[dict]) -> Path:
    """Write (or replace) one part of a table atomically. Rows are cast to the table's schema."""
    schema = SCHEMAS[table]
    if isinstance(rows, list):
        rows = pa.Table.from_pylist(rows, schema=schema)
    else:
        rows = rows.select(schema.names).cast(schema)
    path = layout.table_dir(data_root, table) / f"{part}.parquet"
    with atomic_output(path) as tmp:
        pq.write_table(rows, tmp)
    return path


def remove_stale_temp_files(root: Path) -> int:
    """Delete temp files a killed writer left under root. Call only when no writer can be running
    (the start of a stage; the deployment's concurrency limit of 1 guarantees it for scheduled runs)."""
    stale = [path for path in Path(root).rglob(".*.tmp") if path.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)


def unit_name(prefix: str, ids: list[str]) -> str:
    """A work unit's name: the same ids always give the same name, so re-runs replace rather than duplicate."""
    return f"{prefix}-{hashlib.sha256(chr(10).join(ids).encode()).hexdigest()[:16]}"


def chunk(rows: list, size: int) -> list[list]:
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def part_exists(data_root: Path, table: str, part: str) -> bool:
    return (layout.table_dir(data_root, table) / f"{part}.parquet").exists()


def ensure_tables(data_root: Path) -> None:
    for table, schema in SCHEMAS.items():
        path = layout.table_dir(data_root, table) / "_schema.parquet"
        if not path.exists():
            write_part(data_root, table, "_schema", schema.empty_table())


def _create_views(con: duckdb.DuckDBPyConnection, views: dict[str, Path]) -> None:
    template = read_sql("create_view")
    for name, files in views.items():
        con.execute(template.format(name=name, files=str(files).replace("'", "''")))


def _table_views(data_root: Path) -> dict[str, Path]:
    ensure_tables(data_root)
    return {table: layout.table_dir(data_root, table) / "*.parquet" for table in SCHEMAS}


def refresh_catalog(data_root: Path, extra_views: dict[str, Path] | None = None) -> Path:
    """(Re)create catalog.duckdb with one view per table, plus extra views over Parquet files (e.g. cohorts).

    The file is for people and tools (duckdb CLI, notebooks); the pipeline itself reads through connect().
    """
    with duckdb.connect(str(layout.catalog_file(data_root))) as con:
        _create_views(con, _table_views(data_root) | (extra_views or {}))
    return layout.catalog_file(data_root)


def connect(data_root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the tables as views: never locks catalog.duckdb against writers."""
    con = duckdb.connect()
    _create_views(con, _table_views(data_root))
    return con
