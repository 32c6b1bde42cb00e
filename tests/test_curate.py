"""Curation rules on small hand-built catalogs: each test writes only the rows that matter to it."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks import layout
from tasks.config import CurateSection
from tasks.data.catalog import write_part
from tasks.data.curate import build_cohorts, CLASSIFIER_COLUMNS, GENERATOR_COLUMNS, LABEL_COLUMNS
from tasks.pathologies import CHEXPERT_LABELS, column_name, PATHOLOGIES


def image(dicom_id: str, subject_id: int, study_id: int, view: str = "AP", split: str = "train",
          date: int | None = 21000101, time: float | None = 120000.0, ingested: bool = True) -> dict:
    return {"dicom_id": dicom_id, "subject_id": subject_id, "study_id": study_id, "view": view, "split": split,
            "date": date, "time": time, "ingested": ingested}


def write_catalog(root: Path, images: list[dict], impressions: dict[int, str | None],
                  labels: dict[tuple[int, str], dict[str, float | None]]) -> None:
    """images: see image(); impressions: study_id -> impression; labels: (study_id, labeler) -> {label: value}."""
    subject_of = {row["study_id"]: row["subject_id"] for row in images}
    write_part(root, "images", "p0", [
        {"dicom_id": r["dicom_id"], "subject_id": r["subject_id"], "study_id": r["study_id"],
         "view_position": r["view"], "rows": 64, "columns": 64, "photometric": "MONOCHROME2",
         "source_path": f"{r['dicom_id']}.dcm", "sha256": "0" * 64, "status": "ingested"}
        for r in images if r["ingested"]])
    write_part(root, "metadata", "p0", [
        {"dicom_id": r["dicom_id"], "subject_id": r["subject_id"], "study_id": r["study_id"],
         "view_position": r["view"], "rows": 64, "columns": 64, "study_date": r["date"], "study_time": r["time"]}
        for r in images])
    write_part(root, "splits", "p0", [
        {"dicom_id": r["dicom_id"], "study_id": r["study_id"], "subject_id": r["subject_id"], "split": r["split"]}
        for r in images])
    write_part(root, "reports", "p0", [
        {"study_id": study, "subject_id": subject_of[study], "impression": text, "raw_text": text or "",
         "parser_rule": "impression" if text else "findings_only", "text_encoding": "utf-8"}
        for study, text in impressions.items()])
    write_part(root, "labels", "p0", [
        {"study_id": study, "subject_id": subject_of[study], "labeler": labeler,
         **{column_name(name): values.get(name) for name in CHEXPERT_LABELS}}
        for (study, labeler), values in labels.items()])


def cohort(root: Path, name: str) -> list[dict]:
    return pq.read_table(layout.cohorts_dir(root) / f"{name}.parquet").to_pylist()


def test_generator_takes_one_ap_image_per_study_earliest_first(tmp_path: Path) -> None:
    write_catalog(tmp_path, [
        # study 1: the earliest date wins over a smaller dicom_id and an earlier time on a later date
        image("a1", 10, 1, date=21000102, time=80000.0), image("b1", 10, 1, date=21000101, time=230000.0),
        # study 2: same date, the earliest time wins
        image("a2", 20, 2, time=130000.0), image("b2", 20, 2, time=90000.0),
        # study 3: same date and time, the smallest dicom_id wins; a missing date comes last
        image("c3", 30, 3), image("b3", 30, 3), image("a3", 30, 3, date=None),
        # study 4: the PA image is earlier, but only AP counts; the lateral is never a candidate
        image("a4", 40, 4, view="PA", date=20990101), image("b4", 40, 4), image("c4", 40, 4, view="LATERAL"),
        # study 5: PA only, so not in the generator cohort
        image("a5", 50, 5, view="PA"),
    ], impressions={s: f"Impression {s}: no acute process." for s in range(1, 6)}, labels={})
    build_cohorts(tmp_path, CurateSection())
    rows = cohort(tmp_path, "generator")
    assert {r["study_id"]: r["dicom_id"] for r in rows} == {1: "b1", 2: "b2", 3: "b3", 4: "b4"}
    assert list(rows[0]) == GENERATOR_COLUMNS
    assert rows[0]["impression"] == "Impression 1: no acute process."


def test_generator_views_come_from_the_config(tmp_path: Path) -> None:
    write_catalog(tmp_path, [image("a1", 10, 1, view="PA"), image("a2", 20, 2, view="AP")],
                  impressions={1: "Clear lungs.", 2: "Clear lungs."}, labels={})
    build_cohorts(tmp_path, CurateSection(generator_views=["AP", "PA"]))
    assert sorted(r["dicom_id"] for r in cohort(tmp_path, "generator")) == ["a1", "a2"]


def test_generator_excludes_studies_without_an_impression(tmp_path: Path) -> None:
    write_catalog(tmp_path, [image("a1", 10, 1), image("a2", 20, 2), image("a3", 30, 3), image("a4", 40, 4)],
                  impressions={1: "Small left effusion.", 2: None, 3: "   "}, labels={})  # study 4: no report row
    build_cohorts(tmp_path, CurateSection())
    assert [r["study_id"] for r in cohort(tmp_path, "generator")] == [1]


def test_non_ingested_images_are_in_no_cohort(tmp_path: Path) -> None:
    write_catalog(tmp_path, [image("a1", 10, 1), image("b1", 10, 1, ingested=False, date=20000101)],
                  impressions={1: "Clear lungs."}, labels={(1, "chexpert"): {"Edema": 1.0}})
    build_cohorts(tmp_path, CurateSection())
    assert [r["dicom_id"] for r in cohort(tmp_path, "generator")] == ["a1"]
    assert [r["dicom_id"] for r in cohort(tmp_path, "classifier")] == ["a1"]


@pytest.mark.parametrize(("policy", "uncertain"), [("zeros", 0.0), ("ones", 1.0), ("ignore", None)])
def test_uncertainty_policy(tmp_path: Path, policy: str, uncertain: float | None) -> None:
    write_catalog(tmp_path, [image("a1", 10, 1)], impressions={1: "Possible edema."},
                  labels={(1, "chexpert"): {"Edema": -1.0, "Cardiomegaly": 1.0, "Atelectasis": 0.0,
                                            "No Finding": 1.0}})
    build_cohorts(tmp_path, CurateSection(uncertainty=policy))
    (row,) = cohort(tmp_path, "classifier")
    assert list(row) == CLASSIFIER_COLUMNS
    not_mentioned = set(LABEL_COLUMNS) - {"edema", "cardiomegaly", "atelectasis"}
    assert row["edema"] == uncertain
    assert (row["cardiomegaly"], row["atelectasis"]) == (1.0, 0.0)
    assert {row[column] for column in not_mentioned} == {0.0}  # not mentioned is negative under every policy


def test_label_source_picks_the_labeler(tmp_path: Path) -> None:
    write_catalog(tmp_path, [image("a1", 10, 1, view="PA"), image("a2", 20, 2, view="PA")],
                  impressions={},
                  labels={(1, "chexpert"): {"Pneumonia": 1.0}, (1, "negbio"): {"Pneumonia": 0.0, "Fracture": 1.0},
                          (2, "negbio"): {"Pneumothorax": 1.0}})  # study 2 has no CheXpert row: unlabelled
    build_cohorts(tmp_path, CurateSection(label_source="chexpert"))
    (row,) = cohort(tmp_path, "classifier")
    assert (row["dicom_id"], row["pneumonia"], row["fracture"]) == ("a1", 1.0, 0.0)

    build_cohorts(tmp_path, CurateSection(label_source="negbio"))
    rows = {r["dicom_id"]: r for r in cohort(tmp_path, "classifier")}
    assert (rows["a1"]["pneumonia"], rows["a1"]["fracture"]) == (0.0, 1.0)
    assert rows["a2"]["pneumothorax"] == 1.0


def test_classifier_takes_every_frontal_image(tmp_path: Path) -> None:
    write_catalog(tmp_path, [image("a1", 10, 1, view="AP"), image("b1", 10, 1, view="PA"),
                             image("c1", 10, 1, view="LATERAL"), image("d1", 10, 1, view="AP")],
                  impressions={1: "Clear."}, labels={(1, "chexpert"): {"Edema": 1.0}})
    build_cohorts(tmp_path, CurateSection())
    assert [r["dicom_id"] for r in cohort(tmp_path, "classifier")] == ["a1", "b1", "d1"]


def test_a_subject_in_two_splits_goes_wholly_to_the_most_held_out(tmp_path: Path) -> None:
    write_catalog(tmp_path, [
        image("a1", 10, 1, split="train"), image("a2", 10, 2, split="test"),  # subject 10: train + test
        image("b1", 20, 3, split="train"), image("b2", 20, 4, split="validate"),  # subject 20: train + validate
        image("c1", 30, 5, split="train"),
    ], impressions={s: "Clear lungs." for s in range(1, 6)},
        labels={(s, "chexpert"): {"Edema": 0.0} for s in range(1, 6)})
    build_cohorts(tmp_path, CurateSection())
    for name in ("generator", "classifier"):
        splits = {r["dicom_id"]: r["split"] for r in cohort(tmp_path, name)}
        assert splits == {"a1": "test", "a2": "test", "b1": "validate", "b2": "validate", "c1": "train"}


def test_summary_counts_match_the_written_cohorts(tmp_path: Path) -> None:
    write_catalog(tmp_path, [
        image("a1", 10, 1, split="train"), image("b1", 10, 1, view="PA", split="train"),
        image("a2", 20, 2, split="train"), image("a3", 30, 3, split="test"),
    ], impressions={1: "Effusion.", 2: "Edema.", 3: "Pneumothorax."},
        labels={(1, "chexpert"): {"Pleural Effusion": 1.0}, (2, "chexpert"): {"Edema": 1.0, "Pleural Effusion": -1.0},
                (3, "chexpert"): {"Pneumothorax": 1.0}})
    summary = build_cohorts(tmp_path, CurateSection(uncertainty="ones"))
    generator, classifier = cohort(tmp_path, "generator"), cohort(tmp_path, "classifier")
    for counts, rows in ((summary.generator, generator), (summary.classifier, classifier)):
        assert counts == {split: sum(r["split"] == split for r in rows) for split in ("test", "train")}
    for split in ("test", "train"):
        assert summary.positives[split] == {
            name: sum(r[column_name(name)] == 1.0 for r in classifier if r["split"] == split) for name in PATHOLOGIES}
    assert all(type(n) is int for counts in summary.positives.values() for n in counts.values())
    assert summary.positives["train"]["Pleural Effusion"] == 3  # two images of study 1, plus the uncertain study 2
    assert not [p for p in layout.cohorts_dir(tmp_path).iterdir() if p.suffix != ".parquet"]  # no temp files left
