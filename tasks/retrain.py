"""The downstream protocol: DenseNet-121 on real train (+ synthetic) images, per synthetic ratio and seed, always
validated and tested on the same real images, with patient-bootstrap intervals.

Per ratio, the comparison uses the mean test scores over the seeds (one ensemble per ratio), so that the paired
difference to ratio 0 sees the seeds' average rather than one draw; each (ratio, seed) run is reported on its own
too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import ConcatDataset, Dataset

from tasks.classifier import LabelledImages, TrainedClassifier, predict, save_classifier, train_classifier
from tasks.config import Config
from tasks.curate import LABEL_COLUMNS, cohorts_dir
from tasks.metrics import BootstrapReport, PairedReport, bootstrap_auroc, paired_bootstrap_difference
from tasks.pixels import PixelStore
from tasks.synthesis import SynthesisPlan, load_synthetic, synth_ids


@dataclass(frozen=True)
class RealSplit:
    images: np.ndarray  # uint8 [n, R, R]
    labels: np.ndarray  # float32 [n, 10], NaN = masked
    subject_ids: np.ndarray  # [n], the bootstrap's resampling unit

    def dataset(self) -> LabelledImages:
        return LabelledImages(self.images, self.labels)


def load_real_split(data_root: Path, resolution: int, split: str) -> RealSplit:
    cohort = pq.read_table(cohorts_dir(data_root) / "classifier.parquet").to_pandas()
    rows = cohort[cohort["split"] == split]
    if rows.empty:
        raise ValueError(f"{cohorts_dir(data_root) / 'classifier.parquet'}: the {split!r} split is empty")
    images = PixelStore(data_root, resolution).get_many(rows["dicom_id"].tolist())
    labels = rows[LABEL_COLUMNS].to_numpy(dtype=np.float32, na_value=np.nan)
    return RealSplit(images, labels, rows["subject_id"].to_numpy())


def training_set(config: Config, real_train: RealSplit, plan: SynthesisPlan, ratio: float,
                 generator_id: str) -> Dataset:
    """Real train images plus the ratio's synthetic images (a prefix of the largest ratio's plan)."""
    if ratio == 0:
        return real_train.dataset()
    ids = synth_ids(plan.rows_for(ratio), config.synthesis.seed)
    images, labels = load_synthetic(config.run.data_root, generator_id, ids)
    return ConcatDataset([real_train.dataset(), LabelledImages(images, labels)])


def classifier_dir(data_root: Path, generator_id: str, ratio: float, seed: int) -> Path:
    """Where a trained classifier is saved; at ratio 0 it does not depend on the generator."""
    owner = generator_id if ratio > 0 else "real-only"
    return Path(data_root) / "models" / "classifier" / owner / f"ratio-{ratio:g}-seed-{seed}"


def train_one(config: Config, train: Dataset, val: RealSplit, test: RealSplit, seed: int, out_dir: Path,
              device: str) -> tuple[TrainedClassifier, np.ndarray]:
    """Train, save, and score the real test images (predict() puts the model in eval mode)."""
    trained = train_classifier(train, val.dataset(), config.retrain.classifier, seed=seed, device=device)
    save_classifier(trained, out_dir)
    scores = predict(trained.model, test.dataset(), config.retrain.classifier.image_size,
                     config.retrain.classifier.batch_size, device)
    return trained, scores


def report_on_test_set(config: Config, test: RealSplit, scores: np.ndarray) -> BootstrapReport:
    return bootstrap_auroc(test.labels, scores, test.subject_ids, config.retrain.bootstrap_resamples, config.run.seed)


def difference_to_real_only(config: Config, test: RealSplit, real_only: np.ndarray,
                            augmented: np.ndarray) -> PairedReport:
    """AUROC(augmented) - AUROC(real only) on the same patient resamples."""
    return paired_bootstrap_difference(test.labels, real_only, augmented, test.subject_ids,
                                       config.retrain.bootstrap_resamples, config.run.seed)
