"""Ingestion planning: the source's CSVs into tables, and the pending images and reports cut into work units.

The four MIMIC CSVs are small next to the pixels, so they are re-read whole on every run and their parts replaced;
a malformed row becomes a rejects row naming the file and the line. Images and reports are incremental: only the
ones neither stored nor rejected yet are planned, in units whose names hash their ids, so a re-run after a kill plans
the very same units and overwrites any orphan a killed unit left behind.
"""

from __future__ import annotations

import csv
import gzip
import re
from dataclasses import dataclass
from pathlib import Path

from tasks import layout
from tasks.data import catalog
from tasks.data.catalog import chunk, unit_name
from tasks.data.ingest_images import ImageItem
from tasks.data.mirror import image_relpath, Mirror, read_sha256sums, SHA256SUMS
from tasks.data.reports import ReportItem
from tasks.pathologies import CHEXPERT_LABELS, column_name

DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
SUBJECT_ID = re.compile(r"^1\d{7}$")
STUDY_ID = re.compile(r"^5\d{7}$")
LABEL_VALUES = {"": None, "1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "1": 1.0, "0": 0.0, "-1": -1.0}
SPLITS = {"train", "validate", "test"}


class RowError(ValueError):
    """A CSV row that cannot be used; the message says which field and why."""


def _check_id(value: str, pattern: re.Pattern, field: str) -> str:
    if not pattern.match(value):
        raise RowError(f"{field} {value!r} is malformed")
    return value


def _metadata_row(row: dict[str, str]) -> dict:
    def integer(field: str) -> int | None:
        value = row[field].strip()
        if not value:
            return None
        try:
            return int(float(value))
        except ValueError:
            raise RowError(f"{field} {value!r} is not a number") from None

    return {
        "dicom_id": _check_id(row["dicom_id"], DICOM_ID, "dicom_id"),
        "subject_id": int(_check_id(row["subject_id"], SUBJECT_ID, "subject_id")),
        "study_id": int(_check_id(row["study_id"], STUDY_ID, "study_id")),
        "view_position": row["ViewPosition"].strip() or None,
        "rows": integer("Rows"),
        "columns": integer("Columns"),
        "study_date": integer("StudyDate"),
        "study_time": float(row["StudyTime"]) if row["StudyTime"].strip() else None,
        "procedure": row["PerformedProcedureStepDescription"] or None,
        "view_code": row["ViewCodeSequence_CodeMeaning"] or None,
        "orientation": row["PatientOrientationCodeSequence_CodeMeaning"] or None,
    }


def _label_row(row: dict[str, str], labeler: str) -> dict:
    out = {
        "subject_id": int(_check_id(row["subject_id"], SUBJECT_ID, "subject_id")),
        "study_id": int(_check_id(row["study_id"], STUDY_ID, "study_id")),
        "labeler": labeler,
    }
    for name in CHEXPERT_LABELS:
        value = row[name].strip()
        if value not in LABEL_VALUES:
            raise RowError(f"label {name} = {value!r} is not one of 1.0, 0.0, -1.0 or empty")
        out[column_name(name)] = LABEL_VALUES[value]
    return out


def _split_row(row: dict[str, str]) -> dict:
    if row["split"] not in SPLITS:
        raise RowError(f"split {row['split']!r} is not one of {sorted(SPLITS)}")
    return {
        "dicom_id": _check_id(row["dicom_id"], DICOM_ID, "dicom_id"),
        "study_id": int(_check_id(row["study_id"], STUDY_ID, "study_id")),
        "subject_id": int(_check_id(row["subject_id"], SUBJECT_ID, "subject_id")),
        "split": row["split"],
    }


def read_csv_rows(path: Path, parse) -> tuple[list[dict], list[dict]]:
    """Parse every data row of a (gzip) CSV; rows that fail become rejects naming the file and the line."""
    rows, rejects = [], []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle)
        for record in reader:
            line = reader.line_num
            try:
                if None in record or None in record.values():
                    raise RowError(f"{len(reader.fieldnames)} fields expected")
                rows.append(parse(record))
            except RowError as err:
                # The row's leading fields (its ids) go into the detail, so a person can find the record.
                identity = ",".join(str(value) for value in list(record.values())[:3])
                rejects.append({
                    "item_id": f"{path.name}:{line}", "item_kind": "csv_row", "stage": "ingest",
                    "reason": "malformed_csv_row", "detail": f"{path.name} line {line} ({identity}): {err}",
                    "source_path": str(path),
                })
    return rows, rejects


@dataclass(frozen=True)
class CsvCounts:
    metadata_rows: int
    label_rows: int
    split_rows: int
    rejected_rows: int


def load_source_csvs(data_root: Path, source: Mirror, select=None) -> CsvCounts:
    """Read metadata, chexpert, negbio and split CSVs into their tables (parts replaced whole on each run).

    The mirror's check already verified that the files exist and carry the columns read here.
    `select(metadata_rows) -> rows` narrows the listing to the studies this run covers (a selective download);
    the metadata table is the listing: every image in it ends up ingested or rejected.
    """
    metadata, metadata_rejects = read_csv_rows(source.metadata_csv, _metadata_row)
    if select is not None:
        metadata = select(metadata)
    chexpert, chexpert_rejects = read_csv_rows(source.chexpert_csv, lambda row: _label_row(row, "chexpert"))
    negbio, negbio_rejects = read_csv_rows(source.negbio_csv, lambda row: _label_row(row, "negbio"))
    splits, split_rejects = read_csv_rows(source.split_csv, _split_row)
    catalog.write_part(data_root, "metadata", "source", metadata)
    catalog.write_part(data_root, "labels", "chexpert", chexpert)
    catalog.write_part(data_root, "labels", "negbio", negbio)
    catalog.write_part(data_root, "splits", "source", splits)
    rejects = metadata_rejects + chexpert_rejects + negbio_rejects + split_rejects
    catalog.write_part(data_root, "rejects", "source-csvs", rejects)
    return CsvCounts(len(metadata), len(chexpert) + len(negbio), len(splits), len(rejects))


# A unit's parts are written in this order; the last one (its commit marker) says the unit is complete.
UNIT_PARTS = {"images": ("pixels", "rejects", "images"), "reports": ("rejects", "reports")}


def remove_uncommitted_units(data_root: Path) -> int:
    """Delete what killed units left behind: temp files, and parts (and pixel shards) of units whose commit marker
    is missing. Afterwards pending_images/pending_reports see exactly the committed work. Call at stage start."""
    removed = catalog.remove_stale_temp_files(data_root)
    tables = layout.tables_dir(data_root)
    for prefix, parts in UNIT_PARTS.items():
        marker = parts[-1]
        committed = {path.stem for path in (tables / marker).glob(f"{prefix}-*.parquet")}
        orphans = [path for table in parts[:-1] for path in (tables / table).glob(f"{prefix}-*.parquet")]
        if prefix == "images":
            orphans += list(layout.pixels_dir(data_root).glob(f"*/{prefix}-*.npy"))
        for path in orphans:
            if path.stem not in committed:
                path.unlink()
                removed += 1
    return removed


class ResolutionMismatch(ValueError):
    """The data root holds pixels at another resolution than the config asks for."""


def check_resolution(data_root: Path, resolution: int) -> None:
    """One resolution per data root: the images table says what is ingested, whatever the size, so a changed
    ingest.resolution must go to a new run.data_root rather than silently keep the old pixels."""
    found = [row["resolution"] for row in _query_rows(data_root, "ingested_resolutions")]
    if found and found != [resolution]:
        raise ResolutionMismatch(
            f"{data_root} holds pixels at {found} px but ingest.resolution is {resolution}: "
            f"use a new run.data_root for another resolution (or delete {layout.pixels_dir(data_root)} and the "
            f"images, pixels and rejects tables to re-ingest)")


def pending_images(data_root: Path) -> list[dict]:
    """Listed images (the metadata table) neither ingested nor rejected yet, ordered by subject, study, dicom id."""
    return _query_rows(data_root, "pending_images")


def pending_reports(data_root: Path) -> list[dict]:
    """Listed studies whose report is neither parsed nor rejected yet."""
    return _query_rows(data_root, "pending_reports")


def _query_rows(data_root: Path, query: str) -> list[dict]:
    with catalog.connect(data_root) as con:
        return con.sql(catalog.read_sql(query)).to_arrow_table().to_pylist()


def ingest_summary(data_root: Path) -> dict[str, int]:
    """Counts a person checks after a run: listed images = ingested + rejected, and reports likewise."""
    with catalog.connect(data_root) as con:
        summary = con.sql(catalog.read_sql("ingest_summary")).to_arrow_table().to_pylist()[0]
    return summary


def plan_image_units(data_root: Path, source: Mirror, unit_size: int) -> list[tuple[str, list[ImageItem]]]:
    """Pending images cut into named shards, each item pointing at its file and its published SHA256."""
    sums_file = source.root / SHA256SUMS
    checksums = read_sha256sums(sums_file) if sums_file.exists() else {}
    items = []
    for row in pending_images(data_root):
        relpath = image_relpath(row["subject_id"], row["study_id"], row["dicom_id"], source.image_ext)
        items.append(ImageItem(
            dicom_id=row["dicom_id"], subject_id=row["subject_id"], study_id=row["study_id"],
            view_position=row["view_position"], source_path=source.root / relpath, sha256=checksums.get(relpath),
        ))
    return [(unit_name("images", [item.dicom_id for item in unit]), unit) for unit in chunk(items, unit_size)]


def plan_report_units(data_root: Path, source: Mirror, unit_size: int) -> list[tuple[str, list[ReportItem]]]:
    items = [
        ReportItem(study_id=row["study_id"], subject_id=row["subject_id"],
                   path=source.report_path(row["subject_id"], row["study_id"]))
        for row in pending_reports(data_root)
    ]
    return [(unit_name("reports", [str(item.study_id) for item in unit]), unit) for unit in chunk(items, unit_size)]
