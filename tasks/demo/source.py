"""The demo source: a miniature MIMIC-CXR in PhysioNet's exact layout, its radiographs projected from a real chest
CT with the findings of each study's ground truth planted in its anatomy (tasks/demo/phantom.py).

    python -m tasks.demo.source --out DIR --studies N [--seed S] [--image-size PX] [--workers W] [--no-defects]

Study i depends only on (seed, i): subjects are laid out in order (subject k owns the next 1-4 study numbers), and
every random draw comes from a generator seeded with (seed, stream, index). So a tree of N studies is a byte-exact
prefix of a tree of 2N studies, and re-running on an existing tree only hashes the files already there. Every file
is written atomically, so a killed run never leaves a half-written file under its real name.

plan_studies() samples ids, views, ground truth, reports and labels without rendering pixels (cheap: tests and
label statistics use it); write_demo_tree() renders and writes everything. Planted defects (a few per cent of
items, at least one of each kind in every block of 50 studies) are listed in demo-defects.csv with the item id a
reader would report: the dicom_id for images and metadata rows, the study_id for reports, the raw malformed
study_id text for label rows.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    UID,
    generate_uid,
)

from tasks.data.catalog import atomic_write_bytes
from tasks.demo.phantom import render, sample_anatomy, warm
from tasks.demo.reports import empty_labels, Report, sample_truth, StudyTruth, TRUTH_CLASSES, write_report
from tasks.pathologies import CHEXPERT_LABELS, column_name

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
NEGBIO_CSV = "mimic-cxr-2.0.0-negbio.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
GROUND_TRUTH_CSV = "demo-ground-truth.csv.gz"
DEFECTS_CSV = "demo-defects.csv"
CHECKSUMS = "SHA256SUMS.txt"

METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
LABEL_COLUMNS = ("subject_id", "study_id") + CHEXPERT_LABELS
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
GROUND_TRUTH_COLUMNS = ("dicom_id", "study_id", "subject_id", "view") + tuple(
    f"{column_name(name)}{suffix}" for name in TRUTH_CLASSES for suffix in ("", "_side", "_severity")
)

DEFECT_KINDS = (
    "truncated_dicom", "not_dicom", "unsupported_transfer_syntax", "missing_image", "empty_report",
    "malformed_metadata_row", "malformed_chexpert_row",
)
_IMAGE_DEFECTS = {"truncated_dicom", "not_dicom", "unsupported_transfer_syntax", "missing_image"}
_DEFECT_BLOCK = 50  # every block of this many studies holds each defect kind once
# A syntax with a valid header that no installed pydicom plugin decodes (HEVC/H.265 Main Profile).
UNSUPPORTED_SYNTAX = UID("1.2.840.10008.1.2.4.107")
_COMPRESSED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
_CR, _DX = UID("1.2.840.10008.5.1.4.1.1.1"), UID("1.2.840.10008.5.1.4.1.1.1.1")
_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
_PROCEDURE = {True: "CHEST (PORTABLE AP)", False: "CHEST (PA AND LAT)"}

# Stream tags of the seeded generators, so that no two kinds of draw share a sequence.
_SUBJECT, _STUDY, _IMAGE, _ANATOMY, _DEFECTS = range(5)


@dataclass(frozen=True)
class ImagePlan:
    dicom_id: str
    view: str  # PA, AP, LATERAL, LL
    rows: int
    columns: int
    photometric: str  # MONOCHROME1 / MONOCHROME2
    transfer_syntax: str
    defect: str | None = None


@dataclass(frozen=True)
class StudyPlan:
    seed: int
    index: int
    subject_index: int
    subject_id: int
    study_id: int
    study_date: int
    study_time: float
    split: str
    age: int
    female: bool
    truth: StudyTruth
    report: Report
    images: tuple[ImagePlan, ...]
    defect: str | None  # one of DEFECT_KINDS, at most one per study

    @property
    def folder(self) -> str:
        """files/pXX/pXXXXXXXX/sXXXXXXXX relative to the tree root."""
        return f"files/p{str(self.subject_id)[:2]}/p{self.subject_id}/s{self.study_id}"


@dataclass(frozen=True)
class DemoSummary:
    subjects: int
    studies: int
    images: int  # listed in the metadata CSV (a missing image included)
    files_written: int
    files_skipped: int  # already complete on disk (same name; writes are atomic)
    defects: int


@dataclass(frozen=True)
class _Subject:
    index: int
    subject_id: int
    n_studies: int
    chronic_heart: bool
    has_implant: bool
    female: bool
    age: int
    split: str
    first_day: int


def _rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *index])


def _subject(seed: int, k: int) -> _Subject:
    rng = _rng(seed, _SUBJECT, k)
    # Spread subjects over the p10..p19 folders as MIMIC does, ids unique and stable: 97 ids per slot.
    if k // 10 >= 1_000_000 // 97:
        raise ValueError(f"demo trees hold at most {10 * (1_000_000 // 97)} subjects")
    subject_id = 10_000_000 + (k % 10) * 1_000_000 + (k // 10) * 97 + int(rng.integers(97))
    return _Subject(
        index=k, subject_id=subject_id, n_studies=1 + int(rng.choice(4, p=[0.45, 0.27, 0.16, 0.12])),
        chronic_heart=bool(rng.random() < 0.2), has_implant=bool(rng.random() < 0.06),
        female=bool(rng.random() < 0.48), age=int(rng.integers(22, 90)),
        split=str(rng.choice(["train", "validate", "test"], p=[0.7, 0.1, 0.2])),
        first_day=int(rng.integers(0, 365 * 80)),
    )


def _hex_id(seed: int, *parts: object) -> str:
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).hexdigest()[:40]
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def _study_id(seed: int, i: int) -> int:
    # An odd multiplier coprime with 10**7 is a bijection on 0..10**7-1: unique, MIMIC-looking ids.
    return 50_000_000 + (i * 3_892_357 + seed * 7_919 + 7_305_331) % 10_000_000


def _defect_of(seed: int, i: int) -> str | None:
    slots = _rng(seed, _DEFECTS, i // _DEFECT_BLOCK).permutation(_DEFECT_BLOCK)[: len(DEFECT_KINDS)]
    hits = np.flatnonzero(slots == i % _DEFECT_BLOCK)
    return DEFECT_KINDS[hits[0]] if hits.size else None


def _views(rng: np.random.Generator, portable: bool) -> list[str]:
    if portable:  # bedside: one AP, sometimes repeated
        return ["AP"] if rng.random() < 0.82 else ["AP", "AP"]
    roll = rng.random()
    if roll < 0.8:
        return ["PA", "LATERAL"]
    return ["PA"] if roll < 0.9 else (["PA", "LL"] if roll < 0.95 else ["PA", "LATERAL", "PA"])


def _date(day: int) -> int:
    """MIMIC shifts dates into 2100-2200; day counts from 2110-01-01 in 365-day years, 28-day months."""
    year, rest = divmod(day, 365)
    month, dom = divmod(min(rest, 335), 28)
    return (2110 + year) * 10_000 + (month + 1) * 100 + dom + 1


def _time(seconds: float) -> float:
    """Seconds of the day as MIMIC's StudyTime, HHMMSS.fff read as a number."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return round(hours * 10_000 + minutes * 100 + secs, 3)


def _plan_study(seed: int, i: int, subject: _Subject, position: int, image_size: int, defects: bool) -> StudyPlan:
    rng = _rng(seed, _STUDY, i)
    portable = bool(rng.random() < 0.5)
    truth = sample_truth(rng, portable, subject.chronic_heart, subject.has_implant)
    age = subject.age + position
    report = write_report(truth, rng, age, "F" if subject.female else "M")
    defect = _defect_of(seed, i) if defects else None
    images = []
    views = _views(rng, portable)
    for j, view in enumerate(views):
        shape_roll = rng.random()
        if view == "AP" and shape_roll < 0.2:  # bedside cassettes are often landscape or square
            rows, columns = int(image_size * 0.82), image_size
        elif view == "AP" and shape_roll < 0.35:
            rows, columns = image_size, image_size
        else:
            rows, columns = image_size, int(image_size * 0.83)
        syntax = _COMPRESSED[int(rng.integers(3))] if rng.random() < 0.15 else ExplicitVRLittleEndian
        photometric = "MONOCHROME1" if rng.random() < 0.2 else "MONOCHROME2"
        images.append(ImagePlan(
            dicom_id=_hex_id(seed, i, j), view=view, rows=rows, columns=columns & ~1, photometric=photometric,
            transfer_syntax=str(syntax),
            defect=defect if defect in _IMAGE_DEFECTS and j == len(views) - 1 else None,  # the study's last image
        ))
    study_id = _study_id(seed, i)
    day = subject.first_day + position * 200 + int(rng.integers(150))  # a subject's studies in date order
    return StudyPlan(
        seed=seed, index=i, subject_index=subject.index, subject_id=subject.subject_id, study_id=study_id,
        study_date=_date(day), study_time=_time(float(rng.uniform(0, 86_400))), split=subject.split,
        age=age, female=subject.female, truth=truth,
        report=report if defect != "empty_report" else Report("", empty_labels(), empty_labels()),
        images=tuple(images), defect=defect,
    )


def plan_studies(n_studies: int, seed: int = 0, image_size: int = 1024, defects: bool = True) -> list[StudyPlan]:
    """Ids, views, ground truth, report and labels of studies 0..n-1, without pixels."""
    plans: list[StudyPlan] = []
    k = 0
    while len(plans) < n_studies:
        subject = _subject(seed, k)
        for position in range(min(subject.n_studies, n_studies - len(plans))):
            plans.append(_plan_study(seed, len(plans), subject, position, image_size, defects))
        k += 1
    return plans


# ---------------------------------------------------------------------------------------------------------------
# DICOM


def render_image(plan: StudyPlan, j: int) -> np.ndarray:
    """Pixels of image j of a study as written (MONOCHROME2 sense, 0..4095), rendered again from the plan."""
    subject_rng = _rng(plan.seed, _ANATOMY, plan.subject_index)
    study_rng = _rng(plan.seed, _ANATOMY, plan.subject_index, plan.index)
    anatomy = sample_anatomy(subject_rng, study_rng, plan.truth.portable, plan.female)
    image = plan.images[j]
    return render(anatomy, plan.truth.findings, plan.truth.devices, image.view, image.rows, image.columns,
                  _rng(plan.seed, _IMAGE, plan.index, j))


def _dicom_bytes(plan: StudyPlan, image: ImagePlan, pixels: np.ndarray) -> bytes:
    """A DICOM file real tools read: file meta, deterministic UIDs, 12-bit pixels, windowing."""
    stored = 4095 - pixels if image.photometric == "MONOCHROME1" else pixels  # inverted so readers see the same
    low, high = np.percentile(pixels[:: 4, :: 4], [2, 99.5])
    centre = (low + high) / 2 if image.photometric == "MONOCHROME2" else 4095 - (low + high) / 2
    sop_class = _CR if plan.truth.portable else _DX
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(plan.seed), image.dicom_id])  # stable across runs
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(plan.seed), str(plan.study_id)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(plan.seed), image.dicom_id, "series"])
    ds.Modality = "CR" if sop_class == _CR else "DX"
    ds.PatientID = str(plan.subject_id)
    ds.PatientName = "___"
    ds.PatientSex = "F" if plan.female else "M"
    ds.StudyID = str(plan.study_id)
    ds.AccessionNumber = str(plan.study_id)
    ds.StudyDate = str(plan.study_date)
    ds.StudyTime = f"{plan.study_time:010.3f}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = image.view
    ds.PatientOrientation = ["A", "F"] if image.view in ("LATERAL", "LL") else ["L", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = image.photometric
    ds.Rows, ds.Columns = image.rows, image.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = round(float(centre), 1), round(float(max(high - low, 64)), 1)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    spacing = round(0.139 * 3050 / max(image.rows, image.columns), 4)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()
    if image.defect == "unsupported_transfer_syntax":
        ds.file_meta.TransferSyntaxUID = UNSUPPORTED_SYNTAX
        ds.PixelData = encapsulate([hashlib.sha256(image.dicom_id.encode()).digest() * 64])
        ds["PixelData"].VR = "OB"
    elif image.transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(image.transfer_syntax, generate_instance_uid=False)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    if image.defect == "truncated_dicom":
        return data[: len(data) * 3 // 5]
    return data


_NOT_DICOM = b"<html><head><title>503 Service Unavailable</title></head><body>Try again later.</body></html>\n"


# ---------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class _StudyFiles:
    checksums: tuple[tuple[str, str], ...]  # (relative path, sha256) of the files on disk
    written: int
    skipped: int


def _put(root: Path, rel: str, make: Callable[[], bytes]) -> tuple[str, bool]:
    """Write root/rel from make() unless it is already there; return its sha256 and whether it was written."""
    path = root / rel
    if path.exists():
        return hashlib.sha256(path.read_bytes()).hexdigest(), False
    data = make()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest(), True


def _write_study(job: tuple[Path, StudyPlan]) -> _StudyFiles:
    root, plan = job
    report = f"{plan.folder}.txt"
    digest, new = _put(root, report, lambda: _report_bytes(plan))
    sums, written = [(report, digest)], int(new)
    for j, image in enumerate(plan.images):
        if image.defect == "missing_image":
            continue
        rel = f"{plan.folder}/{image.dicom_id}.dcm"

        def make(image: ImagePlan = image, j: int = j) -> bytes:
            return _NOT_DICOM if image.defect == "not_dicom" else _dicom_bytes(plan, image, render_image(plan, j))

        digest, new = _put(root, rel, make)
        sums.append((rel, digest))
        written += new
    return _StudyFiles(tuple(sums), written, len(sums) - written)


def _report_bytes(plan: StudyPlan) -> bytes:
    if plan.defect == "empty_report":  # no usable section: empty, or the header line alone
        return b"" if plan.index % 2 else b"                                 FINAL REPORT\n"
    return plan.report.text.encode()


def _label(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _csv_bytes(columns: tuple[str, ...], rows: list[tuple], compress: bool = True) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    raw = text.getvalue().encode()
    return gzip.compress(raw, mtime=0) if compress else raw  # mtime=0: same rows, same bytes


def _malformed_study_id(plan: StudyPlan) -> str:
    return f"s5x{str(plan.study_id)[-4:]}"


def _tables(plans: list[StudyPlan]) -> dict[str, bytes]:
    metadata, chexpert, negbio, split, truth, defects = [], [], [], [], [], []
    for plan in plans:
        for image in plan.images:
            metadata.append((image.dicom_id, plan.subject_id, plan.study_id, _PROCEDURE[plan.truth.portable],
                             image.view, image.rows, image.columns, plan.study_date, plan.study_time,
                             _PROCEDURE[plan.truth.portable], _VIEW_CODE[image.view],
                             "Recumbent" if image.view == "AP" else "Erect"))
            split.append((image.dicom_id, plan.study_id, plan.subject_id, plan.split))
            row = [image.dicom_id, plan.study_id, plan.subject_id, image.view]
            for name in TRUTH_CLASSES:
                f = plan.truth.findings[name]
                row += [int(f.present), f.side or "", f.severity or ""]
            truth.append(tuple(row))
            if image.defect:
                defects.append((image.dicom_id, image.defect, f"{plan.folder}/{image.dicom_id}.dcm"))
        chexpert.append((plan.subject_id, plan.study_id, *(_label(plan.report.chexpert[n]) for n in CHEXPERT_LABELS)))
        negbio.append((plan.subject_id, plan.study_id, *(_label(plan.report.negbio[n]) for n in CHEXPERT_LABELS)))
        if plan.defect == "empty_report":
            defects.append((str(plan.study_id), plan.defect, f"{plan.folder}.txt"))
        elif plan.defect == "malformed_metadata_row":
            # An extra row (no file behind it) whose study_id is not a number.
            dicom_id = _hex_id(plan.study_id, "malformed")
            metadata.append((dicom_id, plan.subject_id, _malformed_study_id(plan), *metadata[-1][3:]))
            defects.append((dicom_id, plan.defect, f"{METADATA_CSV}: study_id {_malformed_study_id(plan)!r}"))
        elif plan.defect == "malformed_chexpert_row":
            chexpert.append((plan.subject_id, _malformed_study_id(plan), *chexpert[-1][2:]))  # a duplicate, garbled
            defects.append((_malformed_study_id(plan), plan.defect, f"{CHEXPERT_CSV}: study_id of {plan.study_id}"))
    return {
        METADATA_CSV: _csv_bytes(METADATA_COLUMNS, metadata),
        CHEXPERT_CSV: _csv_bytes(LABEL_COLUMNS, chexpert),
        NEGBIO_CSV: _csv_bytes(LABEL_COLUMNS, negbio),
        SPLIT_CSV: _csv_bytes(SPLIT_COLUMNS, split),
        GROUND_TRUTH_CSV: _csv_bytes(GROUND_TRUTH_COLUMNS, truth),
        DEFECTS_CSV: _csv_bytes(("item_id", "kind", "detail"), defects, compress=False),
    }


def _put_if_changed(path: Path, data: bytes) -> bool:
    if path.exists() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def _check_same_tree(root: Path, metadata: bytes) -> None:
    """Refuse to mix trees: files already there are kept, so they must be the ones these settings would write."""
    if not (root / METADATA_CSV).exists():
        return
    old = gzip.decompress((root / METADATA_CSV).read_bytes()).splitlines()
    new = gzip.decompress(metadata).splitlines()
    if len(old) > len(new) or new[: len(old)] != old:
        raise ValueError(f"{root} holds a demo tree written with another seed, image size, defects setting or more "
                         f"studies ({root / METADATA_CSV} differs); write to an empty folder")


def write_demo_tree(root: Path, studies: int, seed: int = 0, image_size: int = 1024, defects: bool = True,
                    workers: int = 1) -> DemoSummary:
    """Write (or complete) a demo tree of `studies` studies under root; files already there are kept."""
    if studies < 1:
        raise ValueError(f"studies must be >= 1, got {studies}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 pixels, got {image_size}")
    root = Path(root)
    plans = plan_studies(studies, seed, image_size, defects)
    tables = _tables(plans)
    _check_same_tree(root, tables[METADATA_CSV])
    jobs = [(root, plan) for plan in plans]
    if workers > 1:
        warm()  # the CT and its precomputed slabs, loaded once here and shared by the forked workers
        with Pool(workers) as pool:
            results = list(pool.imap(_write_study, jobs, chunksize=4))
            # Leaving the block would SIGTERM the workers, which inherit Prefect's SIGTERM handler and log a
            # traceback each: let them exit on their own instead.
            pool.close()
            pool.join()
    else:
        results = [_write_study(job) for job in jobs]
    sums = [pair for result in results for pair in result.checksums]
    written = sum(r.written for r in results)
    skipped = sum(r.skipped for r in results)
    for name, data in tables.items():
        new = _put_if_changed(root / name, data)
        written, skipped = written + new, skipped + (not new)
        sums.append((name, hashlib.sha256(data).hexdigest()))
    listing = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums)).encode()
    new = _put_if_changed(root / CHECKSUMS, listing)
    return DemoSummary(
        subjects=len({p.subject_id for p in plans}), studies=len(plans),
        images=sum(len(p.images) for p in plans), files_written=written + new,
        files_skipped=skipped + (not new), defects=sum(p.defect is not None for p in plans),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a miniature MIMIC-CXR tree projected from a real chest CT.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--studies", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-defects", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = write_demo_tree(args.out, args.studies, args.seed, args.image_size, not args.no_defects, args.workers)
    elapsed = time.perf_counter() - start
    print(f"{summary} in {elapsed:.1f} s ({summary.studies / elapsed:.1f} studies/s)")


if __name__ == "__main__":
    main()
