"""The source CSVs into tables: validation, rejects naming file and line, and the pending-work queries."""

import gzip
from pathlib import Path

from tasks.data import catalog
from tasks.data.catalog import unit_name
import pytest

from tasks.data.ingest import (ResolutionMismatch, check_resolution, ingest_summary, load_source_csvs, pending_images,
                          pending_reports, remove_uncommitted_units)
from tasks.data.mirror import Mirror
from tasks.pathologies import CHEXPERT_LABELS

META_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
               "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
               "PatientOrientationCodeSequence_CodeMeaning")
D1 = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
D2 = "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"
D3 = "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"


def gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def labels_line(subject: str, study: str, values: dict[str, str]) -> str:
    return ",".join([subject, study] + [values.get(name, "") for name in CHEXPERT_LABELS])


def source_csvs(tmp_path: Path) -> Mirror:
    labels_header = "subject_id,study_id," + ",".join(CHEXPERT_LABELS)
    meta = [
        META_HEADER,
        f"{D1},10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect",
        f"{D2},10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect",
        f"{D3},10000033,53189527,CHEST (PORTABLE AP),AP,2544,3056,21800626,165500.312,CHEST (PORTABLE AP),antero-posterior,",
        "not-a-dicom-id,10000034,50000001,CHEST,AP,1,1,21800101,1.0,CHEST,antero-posterior,",  # line 5
        f"{D1[:-1]}f,10000035,5abc0001,CHEST,AP,1,1,21800101,1.0,CHEST,antero-posterior,",  # line 6: bad study id
        f"{D2[:-1]}f,10000036",  # line 7: too few fields
    ]
    chexpert = [
        labels_header,
        labels_line("10000032", "50414267", {"No Finding": "1.0"}),
        labels_line("10000033", "53189527", {"Pleural Effusion": "1.0", "Pneumonia": "-1.0", "Edema": "0.0"}),
        labels_line("10000034", "50000001", {"Edema": "yes"}),  # line 4: bad value
    ]
    split = ["dicom_id,study_id,subject_id,split", f"{D1},50414267,10000032,train",
             f"{D3},53189527,10000033,test", f"{D2},50414267,10000032,holdout"]
    return Mirror(
        dataset="mimic-cxr", root=tmp_path, files_root=tmp_path / "files", reports_root=tmp_path, image_ext="dcm",
        metadata_csv=gz(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", meta),
        chexpert_csv=gz(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", chexpert),
        negbio_csv=gz(tmp_path / "mimic-cxr-2.0.0-negbio.csv.gz", chexpert[:3]),
        split_csv=gz(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", split),
    )


def test_malformed_rows_become_rejects_naming_file_and_line(tmp_path):
    counts = load_source_csvs(tmp_path, source_csvs(tmp_path))
    assert (counts.metadata_rows, counts.label_rows, counts.split_rows, counts.rejected_rows) == (3, 4, 2, 5)
    with catalog.connect(tmp_path) as con:
        rejects = con.execute("SELECT item_id, reason, detail FROM rejects ORDER BY item_id").fetchall()
    by_id = {item_id: (reason, detail) for item_id, reason, detail in rejects}
    assert set(by_id) == {
        "mimic-cxr-2.0.0-metadata.csv.gz:5", "mimic-cxr-2.0.0-metadata.csv.gz:6", "mimic-cxr-2.0.0-metadata.csv.gz:7",
        "mimic-cxr-2.0.0-chexpert.csv.gz:4", "mimic-cxr-2.0.0-split.csv.gz:4",
    }
    assert all(reason == "malformed_csv_row" for reason, _ in by_id.values())
    assert "dicom_id 'not-a-dicom-id' is malformed" in by_id["mimic-cxr-2.0.0-metadata.csv.gz:5"][1]
    assert "study_id '5abc0001'" in by_id["mimic-cxr-2.0.0-metadata.csv.gz:6"][1]
    assert "Edema = 'yes'" in by_id["mimic-cxr-2.0.0-chexpert.csv.gz:4"][1]
    assert "holdout" in by_id["mimic-cxr-2.0.0-split.csv.gz:4"][1]


def test_label_values_keep_the_source_meaning(tmp_path):
    load_source_csvs(tmp_path, source_csvs(tmp_path))
    with catalog.connect(tmp_path) as con:
        row = con.execute("SELECT pleural_effusion, pneumonia, edema, atelectasis FROM labels "
                      "WHERE labeler = 'chexpert' AND study_id = 53189527").fetchone()
    assert row == (1.0, -1.0, 0.0, None)


def test_rerun_replaces_rather_than_duplicates(tmp_path):
    paths = source_csvs(tmp_path)
    load_source_csvs(tmp_path, paths)
    load_source_csvs(tmp_path, paths)
    summary = ingest_summary(tmp_path)
    assert summary["images_listed"] == 3 and summary["csv_rows_rejected"] == 5


def test_selection_narrows_the_listing(tmp_path):
    load_source_csvs(tmp_path, source_csvs(tmp_path), select=lambda rows: [r for r in rows if r["subject_id"] == 10000033])
    assert [row["dicom_id"] for row in pending_images(tmp_path)] == [D3]


def test_pending_work_skips_what_is_stored_or_rejected(tmp_path):
    load_source_csvs(tmp_path, source_csvs(tmp_path))
    assert [row["dicom_id"] for row in pending_images(tmp_path)] == [D1, D2, D3]
    catalog.write_part(tmp_path, "images", "unit-a", [{"dicom_id": D1, "subject_id": 10000032, "study_id": 50414267}])
    catalog.write_part(tmp_path, "rejects", "unit-a", [{"item_id": D3, "item_kind": "image", "stage": "ingest",
                                                       "reason": "truncated"}])
    assert [row["dicom_id"] for row in pending_images(tmp_path)] == [D2]
    assert [row["study_id"] for row in pending_reports(tmp_path)] == [50414267, 53189527]
    catalog.write_part(tmp_path, "reports", "unit-b", [{"study_id": 50414267, "subject_id": 10000032}])
    assert [row["study_id"] for row in pending_reports(tmp_path)] == [53189527]


def test_unit_names_are_stable_and_content_addressed():
    assert unit_name("images", [D1, D2]) == unit_name("images", [D1, D2])
    assert unit_name("images", [D1, D2]) != unit_name("images", [D1, D3])


def test_a_data_root_keeps_one_resolution(tmp_path):
    check_resolution(tmp_path, 64)  # nothing ingested yet: any resolution goes
    catalog.write_part(tmp_path, "pixels", "images-x", [{"dicom_id": D1, "resolution": 64, "shard": "images-x",
                                                         "shard_row": 0}])
    check_resolution(tmp_path, 64)
    with pytest.raises(ResolutionMismatch, match=r"holds pixels at \[64\] px but ingest.resolution is 128"):
        check_resolution(tmp_path, 128)


def test_uncommitted_units_are_removed(tmp_path):
    (tmp_path / "pixels" / "64").mkdir(parents=True)
    for name in ("images-done", "images-killed"):
        (tmp_path / "pixels" / "64" / f"{name}.npy").write_bytes(b"x")
        catalog.write_part(tmp_path, "pixels", name, [])
        catalog.write_part(tmp_path, "rejects", name, [])
    catalog.write_part(tmp_path, "images", "images-done", [])
    catalog.write_part(tmp_path, "rejects", "reports-killed", [])
    stale = tmp_path / "tables" / "images" / ".images-x.parquet.123.tmp"
    stale.write_bytes(b"half")
    assert remove_uncommitted_units(tmp_path) == 5
    remaining = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*-*.*") if p.is_file())
    assert remaining == ["pixels/64/images-done.npy", "tables/images/images-done.parquet",
                         "tables/pixels/images-done.parquet", "tables/rejects/images-done.parquet"]
