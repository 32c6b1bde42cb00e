"""Time class-balanced synthesis apart from the generator itself: planning at MIMIC scale, the resume check, and
the cost of storing and loading synthetic images, each beside a baseline measured in the same run.

1. plan_synthesis over cohorts of MIMIC-CXR's size (242,502 classifier images of 160,000 studies, 115,684 generator
   studies; label prevalences roughly MIMIC's) for ratios 0, 0.5, 1 (242,502 planned images). Baseline: reading
   the two cohort files with pyarrow, the I/O every plan needs.
2. synthesize on a finished ratio 1.0 (every image already stored: the nightly re-run), which only asks the catalog
   what exists. Baseline: the same rows' synth_ids alone (hashing).
3. synthesize with a generator that costs nothing (zeros), then load_synthetic of all its images. Baseline: np.save
   of the same shards into a folder, and np.load of them back.

    .venv/bin/python bench/synthesis.py [--images 1024] [--resolution 128] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks import layout
from tasks.data import catalog  # noqa: E402
from tasks.data.curate import LABEL_COLUMNS  # noqa: E402
from tasks.generators.interface import GeneratedBatch  # noqa: E402
from tasks.generators.synthesis import load_synthetic, plan_synthesis, synth_ids, synthesize  # noqa: E402

IMAGES, STUDIES, GENERATOR_STUDIES = 242_502, 160_000, 115_684
PREVALENCE = [0.20, 0.20, 0.05, 0.12, 0.02, 0.03, 0.23, 0.24, 0.07, 0.04]  # in PATHOLOGIES' order


def timed(work: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def write_cohorts(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    study_ids = np.arange(STUDIES) + 50_000_000
    study_labels = (rng.random((STUDIES, len(LABEL_COLUMNS))) < PREVALENCE).astype(np.float32)
    image_study = np.concatenate([np.arange(STUDIES), rng.integers(0, STUDIES, IMAGES - STUDIES)])
    split = np.where(rng.random(STUDIES) < 0.978, "train", "test")[image_study]
    layout.cohorts_dir(root).mkdir(parents=True)
    pq.write_table(pa.table({
        "dicom_id": [f"d{index}" for index in range(IMAGES)], "subject_id": study_ids[image_study],
        "study_id": study_ids[image_study], "split": split, "view_position": ["AP"] * IMAGES,
        **{col: study_labels[image_study, index] for index, col in enumerate(LABEL_COLUMNS)}}),
        layout.cohorts_dir(root) / "classifier.parquet")
    generator = np.sort(rng.choice(STUDIES, GENERATOR_STUDIES, replace=False))
    pq.write_table(pa.table({
        "dicom_id": [f"d{index}" for index in generator], "subject_id": study_ids[generator],
        "study_id": study_ids[generator], "split": split[generator],
        "impression": [f"Impression of study {study_ids[index]}: findings as labelled." for index in generator]}),
        layout.cohorts_dir(root) / "generator.parquet")


class ZeroGenerator:
    generator_id = output_id = "zeros"

    def __init__(self, resolution: int):
        self.resolution = resolution

    def generate(self, prompts: list[str], seeds: list[int]) -> GeneratedBatch:
        return GeneratedBatch(np.zeros((len(prompts), self.resolution, self.resolution), np.uint8),
                              [{"seed": seed} for seed in seeds])


def commit_all(root: Path, rows: list[dict], seed: int, unit: int) -> None:
    """The synthetic table of a finished run, written directly (no pixels): what a nightly re-run finds."""
    ids = synth_ids(rows, seed)
    for start in range(0, len(rows), unit):
        catalog.write_part(root, "synthetic", f"synthetic-{start:08d}", [
            {**row, "synth_id": synth_id, "generator_id": "zeros", "output_id": "zeros", "seed": 0, "sampling": "{}",
             "resolution": 8,
             "shard": f"synthetic-{start:08d}", "shard_row": offset}
            for offset, (row, synth_id) in enumerate(zip(rows[start:start + unit], ids[start:start + unit]))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="images stored and loaded in part 3")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="synthesis.batch_size: images per shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "plan"
        write_cohorts(root)
        read_s, _ = timed(lambda: [pq.read_table(layout.cohorts_dir(root) / f"{name}.parquet")
                                   for name in ("classifier", "generator")])
        plan_s, plan = timed(lambda: plan_synthesis(root, [0.0, 0.5, 1.0], seed=0))
        print(f"plan_synthesis, {len(plan.rows):,} rows at ratio 1: {plan_s:.2f} s "
              f"(baseline, reading both cohorts: {read_s:.2f} s)")

        commit_all(root, plan.rows, seed=0, unit=1024)
        ids_s, _ = timed(lambda: synth_ids(plan.rows, 0))
        resume_s, counts = timed(lambda: synthesize(root, ZeroGenerator(8), plan.rows, 1024, 0, progress=False))
        assert counts.generated == 0, counts
        print(f"synthesize on a finished ratio 1 ({counts.skipped:,} stored, {-(-len(plan.rows) // 1024)} parts): "
              f"{resume_s:.2f} s (baseline, hashing the synth_ids: {ids_s:.2f} s)")

        rows = plan.rows[:args.images]
        store = Path(tmp) / "store"
        write_s, _ = timed(lambda: synthesize(store, ZeroGenerator(args.resolution), rows, args.batch, 0,
                                              progress=False))
        load_s, (images, _) = timed(lambda: load_synthetic(store, "zeros", synth_ids(rows, 0)))
        plain = Path(tmp) / "plain"
        plain.mkdir()
        save_s, _ = timed(lambda: [np.save(plain / f"{start}.npy", images[start:start + args.batch])
                                   for start in range(0, len(rows), args.batch)])
        np_load_s, _ = timed(lambda: np.concatenate([np.load(path) for path in sorted(plain.glob("*.npy"))]))
        n = len(rows)
        print(f"store {n} images at {args.resolution} px, {args.batch} a shard: synthesize {n / write_s:,.0f} img/s "
              f"(baseline np.save: {n / save_s:,.0f} img/s); load_synthetic {n / load_s:,.0f} img/s "
              f"(baseline np.load: {n / np_load_s:,.0f} img/s)")


if __name__ == "__main__":
    main()
