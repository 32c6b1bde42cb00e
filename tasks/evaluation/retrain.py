"""The downstream protocol: DenseNet-121 on real train (+ synthetic) images, per synthetic ratio and seed, always
validated and tested on the same real images, with patient-bootstrap intervals.

Every run takes the same number of optimizer steps, and every batch mixes real and synthetic images in the ratio's
proportion (ratio r: r synthetic images per real one, a share r / (1 + r) of each batch), so compute never differs
between ratios. Per ratio, the estimate is the mean over the seeds of each seed's AUROC, and the intervals come
from a two-level bootstrap over test patients and seeds (tasks/evaluation/metrics.py); the paired difference to
ratio 0 pairs seed s with seed s. Each (ratio, seed) run is reported on its own too. The classifier registered as
the best is chosen on the real validation set, never on the test set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from tasks import layout, tracking
from tasks.config import ClassifierSection, RetrainSection
from tasks.data.curate import LABEL_COLUMNS
from tasks.data.pixels import PixelStore
from tasks.evaluation.classifier import LabelledImages, predict, save_classifier, train_classifier, TrainedClassifier
from tasks.evaluation.metrics import bootstrap_auroc, BootstrapReport, paired_bootstrap_difference
from tasks.generators.synthesis import load_synthetic, synth_ids, SynthesisPlan
from tasks.pathologies import PATHOLOGIES


@dataclass(frozen=True)
class RealSplit:
    images: np.ndarray  # uint8 [n, R, R]
    labels: np.ndarray  # float32 [n, 10], NaN = masked
    subject_ids: np.ndarray  # [n], the bootstrap's resampling unit

    def dataset(self) -> LabelledImages:
        return LabelledImages(self.images, self.labels)


def load_real_split(data_root: Path, resolution: int, split: str) -> RealSplit:
    cohort = pq.read_table(layout.cohort_file(data_root, "classifier")).to_pandas()
    rows = cohort[cohort["split"] == split]
    if rows.empty:
        raise ValueError(f"{layout.cohort_file(data_root, 'classifier')}: the {split!r} split is empty")
    images = PixelStore(data_root, resolution).get_many(rows["dicom_id"].tolist())
    labels = rows[LABEL_COLUMNS].to_numpy(dtype=np.float32, na_value=np.nan)
    return RealSplit(images, labels, rows["subject_id"].to_numpy())


def synthetic_set(data_root: Path, plan: SynthesisPlan, ratio: float, synthesis_seed: int, output_id: str
                  ) -> LabelledImages | None:
    """The ratio's synthetic images (a prefix of the largest ratio's plan); None at ratio 0."""
    if ratio == 0:
        return None
    images, labels = load_synthetic(data_root, output_id, synth_ids(plan.rows_for(ratio), synthesis_seed))
    return LabelledImages(images, labels)


def train_one(classifier: ClassifierSection, real: Dataset, synthetic: Dataset | None, synthetic_share: float,
              val: RealSplit, test: RealSplit, seed: int, out_dir: Path, device: str
              ) -> tuple[TrainedClassifier, np.ndarray]:
    """Train, save, and score the real test images (predict() puts the model in eval mode)."""
    trained = train_classifier(real, val.dataset(), classifier, seed=seed, device=device, synthetic=synthetic,
                               synthetic_share=synthetic_share)
    save_classifier(trained, out_dir)
    scores = predict(trained.model, test.dataset(), classifier.image_size, classifier.batch_size, device)
    return trained, scores


def best_validation_auroc(trained: TrainedClassifier) -> float:
    """The validation macro AUROC of the validation whose weights the classifier kept."""
    return next(record.val_macro_auroc for record in trained.history if record.step == trained.best_step)


@dataclass(frozen=True)
class RetrainResult:
    table: pd.DataFrame  # tracking.comparison_table: AUROC per pathology by ratio, with intervals and differences
    child_runs: dict[str, str]  # "ratio-<r>-seed-<s>" -> MLflow run id
    best: tuple[float, int]  # (ratio, seed) of the classifier that validated best: the one to register
    best_validation_auroc: float

    @property
    def best_run(self) -> str:
        """The best classifier's child run name."""
        return run_name(*self.best)


def retrain(data_root: Path, resolution: int, section: RetrainSection, plan: SynthesisPlan, synthesis_seed: int,
            generator_id: str, output_id: str, bootstrap_seed: int, parent: tracking.ParentRun, device: str,
            train: Callable[..., tuple[TrainedClassifier, np.ndarray]] = train_one) -> RetrainResult:
    """The protocol: one classifier per (ratio, seed) in an MLflow child run of `parent` (its training curve, test
    AUROC per pathology with intervals, ROC curves, the model); per ratio the mean over seeds of each seed's AUROC
    with two-level intervals; the table and the paired differences to ratio 0. The classifier with the best validation macro AUROC is the one to
    register: the test set never chooses. `train` runs one classifier (train_one, or a Prefect task of it)."""
    splits = {split: load_real_split(data_root, resolution, split) for split in ("train", "validate", "test")}
    real_train, val, test = splits["train"], splits["validate"], splits["test"]
    scores_by_ratio, child_runs, validation = {}, {}, {}
    for ratio in sorted(plan.ratios):
        synthetic = synthetic_set(data_root, plan, ratio, synthesis_seed, output_id)
        share = ratio / (1 + ratio)  # synthetic images per real one -> their share of every batch
        seed_scores = []
        for seed in section.seeds:
            name = run_name(ratio, seed)
            params = {"ratio": ratio, "seed": seed, "real_train_images": len(real_train.labels),
                      "synthetic_images": 0 if synthetic is None else len(synthetic), "synthetic_share": share,
                      "steps": section.classifier.steps}
            tags = {tracking.GENERATOR_RUN_TAG: generator_id, tracking.SYNTHETIC_OUTPUT_TAG: output_id}
            with tracking.child_run(parent, name, params, tags) as run:
                out_dir = layout.classifier_dir(data_root, output_id, ratio, seed)
                trained, scores = train(section.classifier, real_train.dataset(), synthetic, share, val, test, seed,
                                        out_dir, device)
                for record in trained.history:
                    mlflow.log_metrics({"train/loss": record.train_loss, "val/auroc/macro": record.val_macro_auroc},
                                       step=record.step)
                tracking.log_metrics_per_pathology("test/auroc", _bootstrap(section, bootstrap_seed, test, scores))
                tracking.log_roc_curves(test.labels, scores)
                mlflow.pytorch.log_model(trained.model, name="classifier", serialization_format="pickle")
                child_runs[name], validation[ratio, seed] = run.info.run_id, best_validation_auroc(trained)
            seed_scores.append(scores)
        scores_by_ratio[ratio] = np.stack(seed_scores)  # [seeds, n, C]: the intervals cover the seeds too

    reports = {ratio: _bootstrap(section, bootstrap_seed, test, scores) for ratio, scores in scores_by_ratio.items()}
    differences = ({ratio: paired_bootstrap_difference(test.labels, scores_by_ratio[0.0], scores, test.subject_ids,
                                                       section.bootstrap_resamples, bootstrap_seed)
                    for ratio, scores in scores_by_ratio.items() if ratio != 0.0}
                   if 0.0 in scores_by_ratio else {})
    best = max(validation, key=validation.__getitem__)
    positives = {name: int((test.labels[:, c] == 1).sum()) for c, name in enumerate(PATHOLOGIES)}
    return RetrainResult(tracking.comparison_table(reports, differences, positives), child_runs, best,
                         validation[best])


def run_name(ratio: float, seed: int) -> str:
    return f"ratio-{ratio:g}-seed-{seed}"


def _bootstrap(section: RetrainSection, seed: int, test: RealSplit, scores: np.ndarray) -> BootstrapReport:
    return bootstrap_auroc(test.labels, scores, test.subject_ids, section.bootstrap_resamples, seed)
