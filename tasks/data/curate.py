"""Curation: the generator and classifier cohorts, selected by the SQL in sql/ from the catalog's tables.

The rules (views, one image per study, uncertainty policy, one split per patient) are documented at the top of
each SQL file: curate_images.sql, curate_label_macro.sql, generator_cohort.sql, classifier_cohort.sql,
cohort_summary.sql. Cohorts are written to <data_root>/cohorts/{generator,classifier}.parquet.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import layout
from tasks.config import CurateSection
from tasks.data.catalog import atomic_write_bytes, connect, read_sql
from tasks.pathologies import column_name, PATHOLOGIES

LABEL_COLUMNS: list[str] = [column_name(pathology) for pathology in PATHOLOGIES]
GENERATOR_COLUMNS: list[str] = ["dicom_id", "subject_id", "study_id", "split", "view_position", "impression"]
CLASSIFIER_COLUMNS: list[str] = ["dicom_id", "subject_id", "study_id", "split", "view_position", *LABEL_COLUMNS]


@dataclass(frozen=True)
class CohortSummary:
    generator: dict[str, int]  # split -> images (one per study)
    classifier: dict[str, int]  # split -> images
    positives: dict[str, dict[str, int]]  # split -> pathology (PATHOLOGIES' names) -> positive classifier images

    def to_markdown(self) -> str:
        """One row per split: images in each cohort, then the classifier's positives per pathology."""
        header = ["split", "generator images", "classifier images", *PATHOLOGIES]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for split in sorted(set(self.generator) | set(self.classifier)):
            positives = self.positives.get(split, {})
            cells = [split, self.generator.get(split, 0), self.classifier.get(split, 0),
                     *(positives.get(name, 0) for name in PATHOLOGIES)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        return "\n".join(lines)


def open_curation(data_root: Path) -> duckdb.DuckDBPyConnection:
    """A catalog connection with what the cohort queries build on: label_value() and the curate_images view."""
    con = connect(data_root)
    con.execute(read_sql("curate_label_macro"))
    con.execute(read_sql("curate_images"))
    return con


def generator_cohort(con: duckdb.DuckDBPyConnection, curate: CurateSection) -> pa.Table:
    params = {"generator_views": curate.generator_views}
    return con.sql(read_sql("generator_cohort"), params=params).to_arrow_table().select(GENERATOR_COLUMNS)


def classifier_cohort(con: duckdb.DuckDBPyConnection, curate: CurateSection) -> pa.Table:
    params = {"classifier_views": curate.classifier_views, "labeler": curate.label_source,
              "uncertainty": curate.uncertainty, "label_columns": LABEL_COLUMNS}
    # select() fixes the column order and fails loudly if a pathology column is missing from the labels table.
    return con.sql(read_sql("classifier_cohort"), params=params).to_arrow_table().select(CLASSIFIER_COLUMNS)


def summarize(con: duckdb.DuckDBPyConnection, generator: pa.Table, classifier: pa.Table) -> CohortSummary:
    con.register("generator_cohort", generator)
    con.register("classifier_cohort", classifier)
    params = {"label_columns": LABEL_COLUMNS}
    rows = con.sql(read_sql("cohort_summary"), params=params).to_arrow_table().to_pylist()
    by_cohort: dict[str, dict[str, int]] = {"generator": {}, "classifier": {}}
    positives: dict[str, dict[str, int]] = {}
    for row in rows:
        by_cohort[row["cohort"]][row["split"]] = row["images"]
        if row["cohort"] == "classifier":
            positives[row["split"]] = {name: row[column_name(name)] for name in PATHOLOGIES}
    return CohortSummary(generator=by_cohort["generator"], classifier=by_cohort["classifier"], positives=positives)


def _write_parquet(path: Path, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def build_cohorts(data_root: Path, curate: CurateSection) -> CohortSummary:
    """Select both cohorts, write them atomically under <data_root>/cohorts, and return their summary."""
    with open_curation(data_root) as con:
        generator = generator_cohort(con, curate)
        classifier = classifier_cohort(con, curate)
        _write_parquet(layout.cohort_file(data_root, "generator"), generator)
        _write_parquet(layout.cohort_file(data_root, "classifier"), classifier)
        return summarize(con, generator, classifier)
