"""The downstream answer over replicates: one config run to the end on several data roots (other draws of the demo's
cohort with source.seed; other splits of a real dataset), each arm's paired difference to its ratio 0 pooled.

A demo test set holds 4 to 14 positives of each rare class, too few for a class's interval to say whether it gains;
replicates add independent test patients and classifiers trained again on other images. The pooled difference is
the mean of the replicates' paired differences, its interval from resamples drawn independently in each replicate
(tasks/evaluation/metrics.py, pooled_paired_difference): a fixed-effect pool, so the table keeps each replicate's
own difference beside it, where a disagreement between cohorts shows. The classifiers are the ones the retrain stage saved; their
test scores are computed again here, so every replicate must have finished its retrain stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import layout, stages
from tasks.config import Config
from tasks.evaluation.classifier import load_classifier, predict
from tasks.evaluation.metrics import PairedReport, pooled_paired_difference, Replicate
from tasks.evaluation.retrain import load_real_split, real_only_arm
from tasks.pathologies import PATHOLOGIES


@dataclass(frozen=True)
class ArmScores:
    labels: np.ndarray  # the replicate's real test labels [n, C]
    subject_ids: np.ndarray  # [n]
    by_ratio: dict[float, np.ndarray]  # ratio -> test scores [seeds, n, C]


def replicate_scores(config: Config, data_root: Path, family: str) -> dict[str, ArmScores]:
    """Each arm's test scores by ratio, from the classifiers the retrain stage of `family` saved under data_root."""
    stage = stages.per_generator("retrain", family, config.generators)
    record = stages.recorded_summary(data_root, stage)
    if record is None:
        raise FileNotFoundError(f"{layout.stage_record(data_root, stage)}: no completed retrain stage of {family}; "
                                "run the pipeline on this data root to the end first")
    test = load_real_split(data_root, config.ingest.resolution, "test")
    section = config.retrain
    arms = {}
    for arm in section.arms:
        by_ratio = {}
        for ratio in sorted(arm.ratios if arm.ratios is not None else config.synthesis.ratios):
            owner = real_only_arm(section, arm) if ratio == 0 else arm.name
            seeds = []
            for seed in section.seeds:
                directory = layout.classifier_dir(data_root, record["output_id"], owner, ratio, seed)
                if not (directory / "model.pt").exists():
                    raise FileNotFoundError(f"{directory}: no classifier saved there (arm {arm.name}, ratio "
                                            f"{ratio:g}, seed {seed}); was {data_root} run with this config?")
                trained = load_classifier(directory)
                seeds.append(predict(trained.model, test.dataset(), trained.config.image_size,
                                     trained.config.batch_size, "cpu"))
            by_ratio[ratio] = np.stack(seeds)
        arms[arm.name] = ArmScores(test.labels, test.subject_ids, by_ratio)
    return arms


def pooled_markdown(config: Config, replicates: dict[str, dict[str, ArmScores]]) -> str:
    """Per arm and synthetic ratio, a row per pathology: each replicate's paired difference to ratio 0 [95% CI], the
    pooled one, and the test positives of each replicate. `replicates`: name -> replicate_scores."""
    section, blocks = config.retrain, []
    names = list(replicates)
    for arm in section.arms:
        scored = [replicates[name][arm.name] for name in names]
        for ratio in sorted(scored[0].by_ratio):
            if ratio == 0:
                continue
            pairs = [Replicate(s.labels, s.by_ratio[0.0], s.by_ratio[ratio], s.subject_ids) for s in scored]
            # Replicate r's column from the resamples the pool draws for it (seed + r), so the pool averages them.
            reports = [pooled_paired_difference([pair], section.bootstrap_resamples, config.run.seed + r)
                       for r, pair in enumerate(pairs)]
            pooled = pooled_paired_difference(pairs, section.bootstrap_resamples, config.run.seed)
            rows = {}
            for c, pathology in enumerate([*PATHOLOGIES, "macro"]):
                rows[pathology] = ([_cell(report, pathology) for report in reports] + [_cell(pooled, pathology)] +
                                   ["" if pathology == "macro" else
                                    " + ".join(str(int((s.labels[:, c] == 1).sum())) for s in scored)])
            table = pd.DataFrame.from_dict(rows, orient="index",
                                           columns=[*(f"Δ {name}" for name in names), "Δ pooled", "test positives"])
            table.index.name = "pathology"
            blocks.append(f"Arm {arm.name}, {ratio:.0%} synthetic against 0%, over {len(names)} replicates:\n\n"
                          + table.to_markdown())
    return "\n\n".join(blocks)


def _cell(report: PairedReport, pathology: str) -> str:
    difference = report.macro if pathology == "macro" else report.per_class[pathology]
    return "n/a" if difference is None else \
        f"{difference.estimate:+.3f} [{difference.ci_low:+.3f}, {difference.ci_high:+.3f}]"
