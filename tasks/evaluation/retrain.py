"""The downstream protocol: DenseNet-121 on real train (+ synthetic) images, per arm, synthetic ratio and seed, always
validated and tested on the same real images, with patient-bootstrap intervals. An arm fixes the real training
patients the classifier sees: all of them, or a share (low data, where synthetic images are said to help most).

Every run of an arm takes the same number of optimizer steps, so compute never differs between its ratios. How a run
spends them is the arm's schedule: "mixed", every batch mixes real and synthetic images in the ratio's proportion
(ratio r: r synthetic images per real one, a share r / (1 + r) of each batch); or "pretrain_finetune", the first
pretrain_share of the steps on the ratio's synthetic images alone, the rest on real images alone, with validation
(early stopping, the weights kept) in the fine-tune phase only. A quality-gated arm trains on the synthetic images the
reference arm's real-only classifier agrees with (tasks/evaluation/quality_gate.py), one gate for every ratio and
seed; or (retrain.gate_judge: decoded, for a generator with a latent space) that classifier's features with probes
refitted on reconstructions of the real images (tasks/evaluation/decoded_judge.py). At ratio 0 every arm trains on
its real images alone: the arm's paired baseline. Per ratio, the estimate is the mean over the seeds of each seed's
AUROC, and the intervals come from a two-level bootstrap over test patients and seeds (tasks/evaluation/metrics.py);
the paired difference to ratio 0 pairs seed s with seed s. Each (ratio, seed) run
is reported on its own too. The classifier registered as the best is chosen on the real validation set, never on the
test set.
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
from tasks.config import ArmSection, ClassifierSection, RetrainSection
from tasks.data.curate import LABEL_COLUMNS
from tasks.data.pixels import PixelStore
from tasks.evaluation import fidelity, quality_gate
from tasks.evaluation.decoded_judge import fit_on_reconstructions
from tasks.evaluation.generator_eval import in_domain_extractor
from tasks.evaluation.classifier import (LabelledImages, load_classifier, predict, save_classifier, train_classifier,
                                         TrainedClassifier)
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


def synthetic_set(data_root: Path, plan: SynthesisPlan, ratio: float, synthesis_seed: int, output_id: str,
                  gate: quality_gate.Gate | None = None) -> LabelledImages | None:
    """The ratio's synthetic images (a prefix of the largest ratio's plan); None at ratio 0. With a gate (over the
    whole plan: quality_gate_of), only the images it keeps."""
    if ratio == 0:
        return None
    images, labels = load_synthetic(data_root, output_id, synth_ids(plan.rows_for(ratio), synthesis_seed))
    if gate is not None:
        rows = gate.keep[:len(labels)]
        if not rows.any():
            raise ValueError(f"the quality gate kept none of the {len(labels)} synthetic images of {output_id} at "
                             f"ratio {ratio:g}: the real-trained classifier agrees with none of their prompts")
        images, labels = images[rows], labels[rows]
    return LabelledImages(images, labels)


def quality_gate_of(data_root: Path, plan: SynthesisPlan, synthesis_seed: int, output_id: str,
                    section: RetrainSection, train: RealSplit, val: RealSplit, device: str,
                    reconstruct: Callable[[np.ndarray], np.ndarray] | None = None) -> quality_gate.Gate:
    """Which of the plan's synthetic images the reference arm's real-only classifier (ratio 0, first seed: the
    label-faithfulness judge, trained by then) agrees with (tasks/evaluation/quality_gate.py). With `reconstruct`
    (the generator's latent space and back), the judge is that classifier's features with per-class probes fitted
    on reconstructions of the real training images, its thresholds chosen on reconstructions of the validation
    images: decoded images lie off the real images' domain (tasks/evaluation/decoded_judge.py). Once per synthetic
    set: every ratio and seed of every gated arm uses this one gate."""
    synthetic = LabelledImages(*load_synthetic(data_root, output_id, synth_ids(plan.rows, synthesis_seed)))
    if reconstruct is None:
        judge = load_classifier(section.judge_dir(data_root), device)
        size, batch = judge.config.image_size, judge.config.batch_size
        cuts = quality_gate.thresholds(val.labels, predict(judge.model, val.dataset(), size, batch, device))
        scores = predict(judge.model, synthetic, size, batch, device)
    else:
        extractor = in_domain_extractor(section.judge_dir(data_root))
        decoded = fit_on_reconstructions(train.images, train.labels, reconstruct, extractor)
        val_scores = decoded.scores(fidelity.features(reconstruct(val.images), extractor))
        cuts = np.where(decoded.judged, quality_gate.thresholds(val.labels, val_scores), np.nan)
        scores = decoded.scores(fidelity.features(synthetic.images, extractor))
    return quality_gate.Gate(quality_gate.agreement(synthetic.labels, scores, cuts), synthetic.labels)


def train_one(classifier: ClassifierSection, real: Dataset, synthetic: Dataset | None, synthetic_share: float,
              val: RealSplit, test: RealSplit, seed: int, out_dir: Path, device: str, pretrain_steps: int = 0
              ) -> tuple[TrainedClassifier, np.ndarray]:
    """Train, save, and score the real test images (predict() puts the model in eval mode)."""
    trained = train_classifier(real, val.dataset(), classifier, seed=seed, device=device, synthetic=synthetic,
                               synthetic_share=synthetic_share, pretrain_steps=pretrain_steps)
    save_classifier(trained, out_dir)
    scores = predict(trained.model, test.dataset(), classifier.image_size, classifier.batch_size, device)
    return trained, scores


def best_validation_auroc(trained: TrainedClassifier) -> float:
    """The validation macro AUROC of the validation whose weights the classifier kept."""
    return next(record.val_macro_auroc for record in trained.history if record.step == trained.best_step)


def arm_subset(split: RealSplit, real_share: float) -> RealSplit:
    """The real training images of a random real_share of the patients (at least one), the same for every call:
    a low-data arm's patients do not change with the ratio or the classifier seed, so its runs pair."""
    if real_share >= 1:
        return split
    subjects = np.unique(split.subject_ids)
    keep = np.random.default_rng(0).permutation(subjects)[:max(1, round(real_share * len(subjects)))]
    rows = np.isin(split.subject_ids, keep)
    return RealSplit(split.images[rows], split.labels[rows], split.subject_ids[rows])


def real_only_arm(section: RetrainSection, arm: ArmSection) -> str:
    """The arm whose ratio-0 runs `arm` pairs with: the first of the same real patients and classifier settings.
    Ratio 0 trains on real images alone whatever the schedule or gate, so later arms reuse those runs."""
    return next(other.name for other in section.arms if (other.real_share, section.arm_classifier(other))
                == (arm.real_share, section.arm_classifier(arm)))


def arm_description(section: RetrainSection, name: str) -> str:
    """What sets the arm apart, in words, for its table's heading."""
    arm = next(arm for arm in section.arms if arm.name == name)
    words = ["all real training patients" if arm.real_share == 1 else
             f"{arm.real_share:.0%} of the real training patients"]
    if arm.schedule == "pretrain_finetune":
        words.append(f"pretrained on synthetic images alone for {section.pretrain_steps(arm)} of "
                     f"{section.arm_classifier(arm).steps} steps, then fine-tuned on real ones")
    if arm.quality_gate:
        words.append("only the synthetic images the real-trained classifier agrees with")
    return "; ".join(words)


@dataclass(frozen=True)
class RetrainResult:
    # arm -> tracking.comparison_table: AUROC per pathology by ratio, with intervals and differences to ratio 0
    tables: dict[str, pd.DataFrame]
    child_runs: dict[str, str]  # layout.classifier_run_name(arm, ratio, seed) -> MLflow run id
    best: tuple[str, float, int]  # (arm, ratio, seed) of the classifier that validated best: the one to register
    best_validation_auroc: float

    @property
    def best_run(self) -> str:
        """The best classifier's child run name."""
        return layout.classifier_run_name(*self.best)


def retrain(data_root: Path, resolution: int, section: RetrainSection, plan: SynthesisPlan, synthesis_seed: int,
            generator_id: str, output_id: str, bootstrap_seed: int, parent: tracking.ParentRun, device: str,
            train: Callable[..., tuple[TrainedClassifier, np.ndarray]] = train_one,
            reconstruct: Callable[[np.ndarray], np.ndarray] | None = None) -> RetrainResult:
    """The protocol, per arm: one classifier per (ratio, seed) in an MLflow child run of `parent` (its training
    curve, test AUROC per pathology with intervals, ROC curves, the model); per ratio the mean over seeds of each
    seed's AUROC with two-level intervals; the arm's table with the paired differences to its ratio 0. The
    classifier with the best validation macro AUROC over every arm is the one to register: the test set never
    chooses. `train` runs one classifier (train_one, or a Prefect task of it); `reconstruct`, the generator's where
    it has a latent space and section.gate_judge is "decoded", makes the quality gate judge in the decoded domain
    (quality_gate_of)."""
    splits = {split: load_real_split(data_root, resolution, split) for split in ("train", "validate", "test")}
    val, test = splits["validate"], splits["test"]
    positives = {name: int((test.labels[:, c] == 1).sum()) for c, name in enumerate(PATHOLOGIES)}
    tables, child_runs, validation = {}, {}, {}
    gate = None  # over the whole plan, computed at the first gated arm
    real_only: dict[str, np.ndarray] = {}  # real_only_arm -> its ratio-0 scores
    for arm in section.arms:
        real_train = arm_subset(splits["train"], arm.real_share)
        classifier = section.arm_classifier(arm)
        paired_with = real_only_arm(section, arm)
        if arm.quality_gate and gate is None:
            gate = quality_gate_of(data_root, plan, synthesis_seed, output_id, section, splits["train"], val, device,
                                   reconstruct)
        scores_by_ratio = {}
        for ratio in sorted(arm.ratios if arm.ratios is not None else plan.ratios):
            if ratio == 0 and paired_with in real_only:
                scores_by_ratio[ratio] = real_only[paired_with]
                continue
            synthetic = synthetic_set(data_root, plan, ratio, synthesis_seed, output_id,
                                      gate if arm.quality_gate else None)
            # Pretraining on synthetic images, then fine-tuning on real ones only; or every batch mixed, ratio r
            # (synthetic images per real one, before any gate) -> their batch share. Ratio 0 is real only either way.
            pretrain = section.pretrain_steps(arm) if synthetic is not None else 0
            share = 0.0 if pretrain else ratio / (1 + ratio)
            gate_counts = (gate.kept_per_class(plan.ratios[ratio].images) if arm.quality_gate and ratio > 0
                           else {})
            seed_scores = []
            for seed in section.seeds:
                name = layout.classifier_run_name(arm.name, ratio, seed)
                params = {"arm": arm.name, "real_share": arm.real_share, "ratio": ratio, "seed": seed,
                          "real_train_images": len(real_train.labels),
                          "synthetic_images": 0 if synthetic is None else len(synthetic), "synthetic_share": share,
                          "steps": classifier.steps, "schedule": arm.schedule, "pretrain_steps": pretrain,
                          "quality_gate": arm.quality_gate}
                tags = {tracking.GENERATOR_RUN_TAG: generator_id, tracking.SYNTHETIC_OUTPUT_TAG: output_id}
                with tracking.child_run(parent, name, params, tags) as run:
                    out_dir = layout.classifier_dir(data_root, output_id, arm.name, ratio, seed)
                    trained, scores = train(classifier, real_train.dataset(), synthetic, share, val, test, seed,
                                            out_dir, device, pretrain_steps=pretrain)
                    for record in trained.history:
                        mlflow.log_metrics({"train/loss": record.train_loss,
                                            "val/auroc/macro": record.val_macro_auroc}, step=record.step)
                    if gate_counts:
                        mlflow.log_metrics({f"quality_gate/{what}/{pathology}": count
                                            for pathology, counts in gate_counts.items()
                                            for what, count in zip(("kept", "generated"), counts)})
                    tracking.log_metrics_per_pathology("test/auroc", _bootstrap(section, bootstrap_seed, test, scores))
                    tracking.log_roc_curves(test.labels, scores)
                    tracking.log_classifier(trained.model)
                    child_runs[name] = run.info.run_id
                    validation[arm.name, ratio, seed] = best_validation_auroc(trained)
                seed_scores.append(scores)
            scores_by_ratio[ratio] = np.stack(seed_scores)  # [seeds, n, C]: the intervals cover the seeds too
            if ratio == 0:
                real_only[paired_with] = scores_by_ratio[ratio]
        reports = {ratio: _bootstrap(section, bootstrap_seed, test, scores) for ratio, scores in scores_by_ratio.items()}
        differences = ({ratio: paired_bootstrap_difference(test.labels, scores_by_ratio[0.0], scores,
                                                           test.subject_ids, section.bootstrap_resamples,
                                                           bootstrap_seed)
                        for ratio, scores in scores_by_ratio.items() if ratio != 0.0}
                       if 0.0 in scores_by_ratio else {})
        tables[arm.name] = tracking.comparison_table(reports, differences, positives)
    best = max(validation, key=validation.__getitem__)
    return RetrainResult(tables, child_runs, best, validation[best])


def _bootstrap(section: RetrainSection, seed: int, test: RealSplit, scores: np.ndarray) -> BootstrapReport:
    return bootstrap_auroc(test.labels, scores, test.subject_ids, section.bootstrap_resamples, seed)
