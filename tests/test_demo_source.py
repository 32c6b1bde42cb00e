"""The demo source: layout, determinism, DICOM validity, report/label consistency, visible findings, defects."""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from tasks.demo.reports import TRUTH_CLASSES
from tasks.demo.source import (
    CHECKSUMS, CHEXPERT_CSV, DEFECT_KINDS, DEFECTS_CSV, GROUND_TRUTH_CSV, METADATA_CSV, NEGBIO_CSV, SPLIT_CSV,
    main, plan_studies, render_image, write_demo_tree,
)
from tasks.pathologies import CHEXPERT_LABELS, PATHOLOGIES

SEED, STUDIES, SIZE = 3, 50, 160

MIMIC_HEADERS = {
    METADATA_CSV: "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                  "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                  "PatientOrientationCodeSequence_CodeMeaning",
    CHEXPERT_CSV: "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                  "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
                  "Pneumothorax,Support Devices",
    SPLIT_CSV: "dicom_id,study_id,subject_id,split",
}
MIMIC_HEADERS[NEGBIO_CSV] = MIMIC_HEADERS[CHEXPERT_CSV]

# How a reader recognises each finding in free text; written independently of the report templates.
TERMS = {
    "Atelectasis": ("atelecta", "collapse"), "Cardiomegaly": ("cardiomegaly", "heart is", "cardiac silhouette"),
    "Consolidation": ("consolidation",), "Edema": ("edema",), "Fracture": ("fracture",),
    "Lung Lesion": ("nodule", "mass"), "Lung Opacity": ("opacit",), "Pleural Effusion": ("effusion",),
    "Pneumonia": ("pneumonia",), "Pneumothorax": ("pneumothorax",),
    "Support Devices": ("tube", "catheter", "pacemaker", "wires"),
}
HEDGES = ("cannot exclude", "possible", "not excluded", "may represent")


def read_csv(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo_tree(root, STUDIES, seed=SEED, image_size=SIZE)


@pytest.fixture(scope="module")
def defects(tree) -> dict[str, list[dict[str, str]]]:
    by_kind: dict[str, list[dict[str, str]]] = {}
    for row in read_csv(tree[0] / DEFECTS_CSV):
        by_kind.setdefault(row["kind"], []).append(row)
    return by_kind


@pytest.fixture(scope="module")
def many_plans():
    return plan_studies(3000, seed=11, image_size=SIZE)


def test_layout_ids_and_counts(tree):
    root, summary = tree
    metadata = read_csv(root / METADATA_CSV)
    dicom_re = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
    studies = set()
    for row in metadata:
        if not row["study_id"].isdigit():
            continue  # the planted malformed row, checked in test_defects
        subject, study = row["subject_id"], row["study_id"]
        assert re.fullmatch(r"1\d{7}", subject) and re.fullmatch(r"5\d{7}", study)
        assert dicom_re.match(row["dicom_id"])
        studies.add((subject, study))
    for subject, study in studies:
        assert (root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").is_file()
    on_disk = {p.stem for p in (root / "files").rglob("*.dcm")}
    assert on_disk <= {row["dicom_id"] for row in metadata}
    assert (summary.studies, summary.images) == (STUDIES, len(metadata) - 1)
    assert summary.subjects == len({s for s, _ in studies}) and 1 <= STUDIES / summary.subjects <= 4


def test_csv_headers_values_and_split(tree):
    root, _ = tree
    for name, header in MIMIC_HEADERS.items():
        with gzip.open(root / name, "rt") as handle:
            assert handle.readline().rstrip("\n") == header
    for name in (CHEXPERT_CSV, NEGBIO_CSV):
        values = {row[label] for row in read_csv(root / name) for label in CHEXPERT_LABELS}
        assert values <= {"", "1.0", "0.0", "-1.0"} and {"1.0", "0.0", "-1.0"} <= values
    split_of_subject: dict[str, set[str]] = {}
    for row in read_csv(root / SPLIT_CSV):
        split_of_subject.setdefault(row["subject_id"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_subject.values())
    assert set().union(*split_of_subject.values()) <= {"train", "validate", "test"}
    truth = read_csv(root / GROUND_TRUTH_CSV)
    assert len(truth) == len(read_csv(root / SPLIT_CSV))
    expected = {"pleural_effusion", "pleural_effusion_side", "pleural_effusion_severity", "support_devices"}
    assert expected <= set(truth[0])


def test_checksums_cover_every_file(tree):
    root, _ = tree
    listed = {}
    for line in (root / CHECKSUMS).read_text().splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS}
    assert set(listed) == files
    assert all(hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest for rel, digest in listed.items())


def test_prefix_property_and_workers(tree, tmp_path):
    """Half the studies, written with a process pool: the same bytes for every shared file, CSV rows a prefix."""
    root, _ = tree
    write_demo_tree(tmp_path, STUDIES // 2, seed=SEED, image_size=SIZE, workers=2)
    small = {str(p.relative_to(tmp_path)): p.read_bytes() for p in (tmp_path / "files").rglob("*") if p.is_file()}
    assert len(small) > STUDIES // 2
    assert all((root / rel).read_bytes() == data for rel, data in small.items())
    for name in (METADATA_CSV, CHEXPERT_CSV, SPLIT_CSV):
        small_lines = gzip.decompress((tmp_path / name).read_bytes()).splitlines()
        big_lines = gzip.decompress((root / name).read_bytes()).splitlines()
        assert big_lines[: len(small_lines)] == small_lines and len(big_lines) > len(small_lines)
    other_seed = plan_studies(5, seed=SEED + 1)
    assert [p.study_id for p in other_seed] != [p.study_id for p in plan_studies(5, seed=SEED)]


def test_rerun_writes_nothing_and_completes_a_missing_file(tree):
    root, first = tree
    again = write_demo_tree(root, STUDIES, seed=SEED, image_size=SIZE)
    assert again.files_written == 0 and again.files_skipped == first.files_written
    victim = sorted((root / "files").rglob("*.dcm"))[3]
    original = victim.read_bytes()
    victim.unlink()
    healed = write_demo_tree(root, STUDIES, seed=SEED, image_size=SIZE)
    assert healed.files_written == 1 and victim.read_bytes() == original
    assert not list(root.rglob("*.tmp"))
    with pytest.raises(ValueError, match="another seed"):
        write_demo_tree(root, STUDIES, seed=SEED, image_size=SIZE + 32)


def test_dicoms_decode_and_match_metadata(tree, defects):
    root, _ = tree
    planted = {row["item_id"] for kind in defects.values() for row in kind}
    plans = {p.study_id: p for p in plan_studies(STUDIES, seed=SEED, image_size=SIZE)}
    photometrics, syntaxes, rendered_checked = Counter(), Counter(), 0
    for row in read_csv(root / METADATA_CSV):
        if row["dicom_id"] in planted:
            continue
        subject = row["subject_id"]
        ds = pydicom.dcmread(root / f"files/p{subject[:2]}/p{subject}/s{row['study_id']}/{row['dicom_id']}.dcm")
        pixels = ds.pixel_array
        assert pixels.shape == (int(row["Rows"]), int(row["Columns"])) == (ds.Rows, ds.Columns)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.ViewPosition == row["ViewPosition"] and ds.PatientID == row["subject_id"]
        assert ds.SOPClassUID.name.startswith(("Computed Radiography", "Digital X-Ray"))
        photometrics[ds.PhotometricInterpretation] += 1
        syntaxes[ds.file_meta.TransferSyntaxUID] += 1
        # A correct reader inverts MONOCHROME1; lossless syntaxes give back exactly what was rendered.
        seen = 4095 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels
        if ds.PhotometricInterpretation == "MONOCHROME1" or ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
            plan = plans[int(row["study_id"])]
            j = [image.dicom_id for image in plan.images].index(row["dicom_id"])
            np.testing.assert_array_equal(seen, render_image(plan, j))
            rendered_checked += 1
    assert photometrics["MONOCHROME1"] >= 3 and photometrics["MONOCHROME2"] > photometrics["MONOCHROME1"]
    assert sum(n for uid, n in syntaxes.items() if uid != ExplicitVRLittleEndian) >= 3
    assert rendered_checked >= 6


@pytest.mark.filterwarnings("ignore:End of file reached")  # pydicom's note on the truncated file
def test_defects_are_planted_as_listed(tree, defects):
    root, _ = tree
    assert set(defects) == set(DEFECT_KINDS)
    metadata = {row["dicom_id"]: row for row in read_csv(root / METADATA_CSV)}
    for kind in ("truncated_dicom", "unsupported_transfer_syntax"):
        for row in defects[kind]:
            ds = pydicom.dcmread(root / row["detail"])  # the header still reads
            with pytest.raises(Exception):
                ds.pixel_array
    for row in defects["not_dicom"]:
        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(root / row["detail"])
    for row in defects["missing_image"]:
        assert row["item_id"] in metadata and not (root / row["detail"]).exists()
    for row in defects["empty_report"]:
        text = (root / row["detail"]).read_text()
        assert "FINDINGS" not in text and "IMPRESSION" not in text
    for row in defects["malformed_metadata_row"]:
        assert not metadata[row["item_id"]]["study_id"].isdigit()
    chexpert_ids = {row["study_id"] for row in read_csv(root / CHEXPERT_CSV)}
    assert all(row["item_id"] in chexpert_ids for row in defects["malformed_chexpert_row"])
    listed = sum(len(rows) for rows in defects.values())
    assert listed / (len(metadata) + 2 * STUDIES) < 0.06  # a few per cent of the items


def _sections(text: str) -> str:
    return text.split("FINDINGS:", 1)[1].lower() if "FINDINGS:" in text else ""


def test_reports_agree_with_labels(many_plans):
    variants = Counter()
    for plan in many_plans:
        text = plan.report.text
        if plan.defect == "empty_report":
            continue
        assert text.lstrip().startswith("FINAL REPORT") and "EXAMINATION:" in text and "INDICATION:" in text
        body = _sections(text)
        sentences = re.split(r"(?<=\.)\s+", body)
        for name, value in plan.report.chexpert.items():
            if name not in TERMS or value not in (1.0, -1.0):
                continue
            mentions = [s for s in sentences if any(term in s for term in TERMS[name])]
            assert mentions, (name, text)
            if value == -1.0:
                assert any(h in s for s in mentions for h in HEDGES), (name, text)
        if plan.report.chexpert["No Finding"] == 1.0:
            assert all(plan.report.chexpert[name] in (None, 0.0) for name in PATHOLOGIES)
        headers = ("IMPRESSIONS:", "CONCLUSION:", "IMPRESSION :", "IMPRESSION:")
        variants[next((h for h in headers if h in text), "none")] += 1
    assert variants["IMPRESSION:"] > len(many_plans) / 2
    assert all(variants[v] > 0 for v in ("IMPRESSIONS:", "CONCLUSION:", "IMPRESSION :", "none"))


def test_label_noise_and_negbio_differ_a_little(many_plans):
    cells = disagree = differ = 0
    for plan in many_plans:
        if plan.defect == "empty_report":
            continue
        for name in PATHOLOGIES:
            cells += 1
            disagree += plan.truth.findings[name].present != (plan.report.chexpert[name] in (1.0, -1.0))
            differ += plan.report.chexpert[name] != plan.report.negbio[name]
    assert 0.001 < disagree / cells < 0.05
    assert 0.001 < differ / cells < 0.05


def test_prevalence_cooccurrence_views_and_split(many_plans):
    present = {name: np.array([p.truth.findings[name].present for p in many_plans]) for name in TRUTH_CLASSES}
    effusion, edema, cardiomegaly = present["Pleural Effusion"], present["Edema"], present["Cardiomegaly"]
    assert effusion[edema].mean() > 2 * effusion.mean()
    assert cardiomegaly[edema].mean() > 2 * cardiomegaly.mean()
    assert 0.1 < effusion.mean() < 0.35 and 0.1 < present["Support Devices"].mean() < 0.45
    assert 0.005 < present["Fracture"].mean() < 0.05 and 0.005 < present["Lung Lesion"].mean() < 0.05
    assert 0.17 < present["Lung Opacity"].mean() < 0.28  # MIMIC-CXR: about 22%
    no_finding = np.mean([p.truth.no_finding for p in many_plans])
    assert 0.25 < no_finding < 0.55
    views = Counter(image.view for p in many_plans for image in p.images)
    assert 0.5 < views["AP"] / (views["AP"] + views["PA"]) < 0.65 and views["LATERAL"] > 0 and views["LL"] > 0
    splits = Counter(p.split for p in many_plans)
    assert abs(splits["train"] / len(many_plans) - 0.7) < 0.07 and abs(splits["test"] / len(many_plans) - 0.2) < 0.05
    sizes = Counter(p.subject_id for p in many_plans)
    assert set(sizes.values()) == {1, 2, 3, 4}


def test_cli_writes_a_tree(tmp_path, capsys):
    main(["--out", str(tmp_path), "--studies", "3", "--image-size", "64", "--no-defects"])
    assert "studies=3" in capsys.readouterr().out
    assert (tmp_path / METADATA_CSV).is_file() and not read_csv(tmp_path / DEFECTS_CSV)
