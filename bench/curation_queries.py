"""Time the curation queries on a MIMIC-CXR-sized catalog of generated rows.

Writes, with tasks.data.catalog.write_part into a temporary data root, 377,110 images of 227,835 studies of 65,379
subjects (MIMIC-CXR 2.0.0's counts), split into shard-like parts: images, metadata, splits (a few subjects in two
splits), one report per study (some without an impression), CheXpert and NegBio labels. Then runs each curation
step several times and prints the best and median seconds. Target: each query under 1 s.

    .venv/bin/python bench/curation_queries.py [--repeat 5] [--parts 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.data.catalog import write_part  # noqa: E402
from tasks.config import CurateSection  # noqa: E402
from tasks.data.curate import build_cohorts, classifier_cohort, generator_cohort, open_curation, summarize  # noqa: E402
from tasks.pathologies import CHEXPERT_LABELS, column_name  # noqa: E402

IMAGES, STUDIES, SUBJECTS = 377_110, 227_835, 65_379
VIEWS = (["AP", "PA", "LATERAL", "LL", ""], [0.40, 0.25, 0.25, 0.08, 0.02])  # roughly MIMIC-CXR's mix
IMPRESSIONS = [
    "No acute cardiopulmonary process.",
    "Moderate right pleural effusion with adjacent atelectasis, increased since ___.",
    "1. Mild pulmonary edema. 2. Stable cardiomegaly. 3. No pneumothorax.",
    "Endotracheal tube 4.5 cm above the carina. Right basilar opacity may reflect pneumonia.",
    "Small left apical pneumothorax, 1 cm, new since prior study. Findings discussed with Dr. ___ at 10:30.",
]


def _write(root: Path, table: str, columns: dict[str, object], parts: int) -> None:
    rows = pa.table(columns)
    size = -(-rows.num_rows // parts)
    for index in range(parts):
        write_part(root, table, f"bench-{index:03d}", rows.slice(index * size, size))


def build_catalog(root: Path, parts: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    study_subject = np.sort(rng.integers(0, SUBJECTS, STUDIES)) + 10_000_000
    study_ids = rng.permutation(STUDIES) + 50_000_000
    # Every study has an image; the remaining images go to random studies (1-2 per study on average, as in MIMIC).
    image_study = np.concatenate([np.arange(STUDIES), rng.integers(0, STUDIES, IMAGES - STUDIES)])
    dicom_ids = [f"{a:016x}-{b:016x}" for a, b in rng.integers(0, 2**63, (IMAGES, 2))]
    subject_ids, image_study_ids = study_subject[image_study], study_ids[image_study]
    views = rng.choice(VIEWS[0], IMAGES, p=VIEWS[1])

    image_columns = {"dicom_id": dicom_ids, "subject_id": subject_ids, "study_id": image_study_ids,
                     "view_position": views}
    ingested = rng.random(IMAGES) > 0.01  # 1% failed to ingest: listed in metadata and splits, not in images
    _write(root, "images", {
        **{k: np.asarray(v)[ingested] for k, v in image_columns.items()},
        "rows": np.full(ingested.sum(), 3056, np.int32), "columns": np.full(ingested.sum(), 2544, np.int32),
        "photometric": ["MONOCHROME2"] * int(ingested.sum()), "source_path": np.asarray(dicom_ids)[ingested],
        "sha256": ["0" * 64] * int(ingested.sum()), "status": ["ingested"] * int(ingested.sum())}, parts)
    _write(root, "metadata", {
        **image_columns, "rows": np.full(IMAGES, 3056, np.int32), "columns": np.full(IMAGES, 2544, np.int32),
        "study_date": (21000101 + rng.integers(0, 3650, IMAGES)).astype(np.int32),
        "study_time": rng.integers(0, 235959, IMAGES).astype(np.float64),
        "procedure": ["CHEST (PA AND LAT)"] * IMAGES, "view_code": views, "orientation": ["Erect"] * IMAGES}, parts)

    subject_split = rng.choice(["train", "validate", "test"], SUBJECTS, p=[0.978, 0.008, 0.014])
    image_split = subject_split[subject_ids - 10_000_000]
    leaked = rng.random(IMAGES) < 0.001  # a few images of a subject filed under another split
    image_split[leaked] = "test"
    _write(root, "splits", {"dicom_id": dicom_ids, "study_id": image_study_ids, "subject_id": subject_ids,
                            "split": image_split}, parts)

    impressions = np.asarray(IMPRESSIONS, dtype=object)[rng.integers(0, len(IMPRESSIONS), STUDIES)]
    impressions[rng.random(STUDIES) < 0.05] = None  # findings-only reports
    _write(root, "reports", {
        "study_id": study_ids, "subject_id": study_subject, "findings": impressions, "impression": impressions,
        "raw_text": impressions, "parser_rule": ["impression"] * STUDIES,
        "impression_tokens": np.full(STUDIES, 20, np.int32), "impression_truncated": np.zeros(STUDIES, bool),
        "text_encoding": ["utf-8"] * STUDIES},
        parts)

    label_values = np.array([1.0, 0.0, -1.0, np.nan], np.float32)
    labelers = np.repeat(["chexpert", "negbio"], STUDIES)
    labels = {"subject_id": np.tile(study_subject, 2), "study_id": np.tile(study_ids, 2), "labeler": labelers}
    for name in CHEXPERT_LABELS:
        values = rng.choice(label_values, 2 * STUDIES, p=[0.1, 0.1, 0.05, 0.75])
        labels[column_name(name)] = pa.array(values, mask=np.isnan(values))
    _write(root, "labels", labels, parts)


def _time(label: str, repeat: int, step: Callable[[], object]) -> object:
    seconds, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = step()
        seconds.append(time.perf_counter() - start)
    print(f"{label:<28} best {min(seconds):6.3f} s   median {statistics.median(seconds):6.3f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parts", type=int, default=8, help="Parquet parts per table")
    args = parser.parse_args()
    curate = CurateSection()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        build_catalog(root, args.parts)
        print(f"catalog: {IMAGES:,} images, {STUDIES:,} studies, {SUBJECTS:,} subjects, {args.parts} parts per "
              f"table, written in {time.perf_counter() - start:.1f} s")
        con = _time("open_curation (views)", args.repeat, lambda: open_curation(root))
        generator = _time("generator_cohort", args.repeat, lambda: generator_cohort(con, curate))
        classifier = _time("classifier_cohort", args.repeat, lambda: classifier_cohort(con, curate))
        _time("classifier_cohort (ignore)", args.repeat,
              lambda: classifier_cohort(con, CurateSection(uncertainty="ignore", label_source="negbio")))
        _time("cohort_summary", args.repeat, lambda: summarize(con, generator, classifier))
        summary = _time("build_cohorts (all, + write)", args.repeat, lambda: build_cohorts(root, curate))
        print(f"generator images per split: {summary.generator}")
        print(f"classifier images per split: {summary.classifier}")
        print(f"classifier positives (train): {summary.positives['train']}")


if __name__ == "__main__":
    main()
