"""AUROC per pathology and macro, with patient-level bootstrap intervals and paired differences between models.

Labels are [n, C] floats, one column per entry of PATHOLOGIES: 1.0 positive, 0.0 negative, NaN masked (an
uncertain label under the 'ignore' policy), which excludes that image from that class only. A class is
scored only where it has both positive and negative labels; the macro averages the classes scorable on the
full test set.

The bootstrap resamples patients, not images: images of one patient are correlated, so resampling images
would pretend to more independent evidence than there is and give intervals that are too narrow. A resample
is a vector of patient multiplicities, and the AUROC of a resample is a weighted AUROC over the original
rows, so every resample shares one sort of the scores and all resamples are computed as one array.

Several training seeds: scores may be [seeds, n, C]. The estimate is then the mean over seeds of each seed's AUROC,
and the interval covers both sources of chance with a two-level bootstrap: every resample draws patients (the
same draw for every seed and model) and then seeds with replacement, and averages over the drawn seeds. Two models
compared seed by seed are paired on the seed too (seed s of one against seed s of the other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasks.pathologies import PATHOLOGIES

CONFIDENCE = 0.95


@dataclass(frozen=True)
class MetricReport:
    per_class: dict[str, float | None]  # None: the class could not be scored, see `skipped`
    macro: float | None  # mean over the scored classes; None when no class could be scored
    skipped: dict[str, str]  # class -> why it has no AUROC


@dataclass(frozen=True)
class Interval:
    estimate: float  # on the full test set
    ci_low: float
    ci_high: float
    n_skipped: int  # resamples in which the metric was undefined (a class lacked positives or negatives)


@dataclass(frozen=True)
class Difference(Interval):
    share_b_better: float  # of the resamples where both are defined, the share with AUROC(b) > AUROC(a)


@dataclass(frozen=True)
class BootstrapReport:
    per_class: dict[str, Interval | None]
    macro: Interval | None
    skipped: dict[str, str]  # classes not scorable on the full test set, and why
    n_resamples: int


@dataclass(frozen=True)
class PairedReport:
    per_class: dict[str, Difference | None]
    macro: Difference | None
    skipped: dict[str, str]
    n_resamples: int


def auroc_per_class(labels: np.ndarray, scores: np.ndarray) -> MetricReport:
    """AUROC of every pathology and their macro; classes lacking positives or negatives are skipped, with the reason."""
    labels, (scores,) = _check(labels, [scores])
    point, _ = _aurocs(labels, [scores], np.empty((0, len(labels))))
    values = [None if np.isnan(value) else float(value) for value in point[0]]
    return MetricReport(dict(zip(PATHOLOGIES, values[:-1])), values[-1], _skip_reasons(labels))


def bootstrap_auroc(
    labels: np.ndarray, scores: np.ndarray, groups: Sequence, n_resamples: int = 1000, seed: int = 0
) -> BootstrapReport:
    """Per-class and macro AUROC with 95% percentile intervals from resampling patients (`groups`, one per row),
    and seeds when scores are [seeds, n, C]."""
    per_seed = _per_seed(scores)
    labels, per_seed = _check(labels, per_seed, groups)
    point, resampled = _aurocs(labels, per_seed, _patient_weights(groups, n_resamples, seed))
    point, resampled = point.mean(axis=0), _seed_resampled(resampled, seed)
    intervals = [_interval(point[c], resampled[:, c]) for c in range(point.shape[0])]
    return BootstrapReport(dict(zip(PATHOLOGIES, intervals[:-1])), intervals[-1], _skip_reasons(labels), n_resamples)


def paired_bootstrap_difference(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    groups: Sequence,
    n_resamples: int = 1000,
    seed: int = 0,
) -> PairedReport:
    """AUROC(b) - AUROC(a) per class and macro, both models scored on the same patient resamples (and, with
    [seeds, n, C] scores, the same seed draws, seed s of a paired with seed s of b).

    Pairing removes the test-set sampling noise the two models share, so the interval of the difference is
    much narrower than the two separate intervals suggest."""
    return pooled_paired_difference([Replicate(labels, scores_a, scores_b, groups)], n_resamples, seed)


@dataclass(frozen=True)
class Replicate:
    """One test set with the scores of the two models compared on it (arrays as paired_bootstrap_difference's)."""
    labels: np.ndarray
    scores_a: np.ndarray
    scores_b: np.ndarray
    groups: Sequence


def pooled_paired_difference(replicates: Sequence[Replicate], n_resamples: int = 1000, seed: int = 0
                             ) -> PairedReport:
    """The mean over independent replicates (other cohorts, other test patients, models trained again) of each
    replicate's paired difference AUROC(b) - AUROC(a), with its interval from resamples drawn independently per
    replicate (replicate r with seed + r) and averaged. A fixed-effect pool: the interval covers each replicate's
    test patients and training seeds, not how the effect itself varies between cohorts, so show the replicates'
    own differences beside it. One replicate: paired_bootstrap_difference. A class is pooled where every replicate
    scores it; each replicate's macro averages the classes it scores."""
    if not replicates:
        raise ValueError("no replicate to pool")
    points, resampled, skipped = [], [], {}
    for r, replicate in enumerate(replicates):
        seeds_a, seeds_b = _per_seed(replicate.scores_a), _per_seed(replicate.scores_b)
        if len(seeds_a) != len(seeds_b):
            raise ValueError(f"{len(seeds_a)} seeds of a against {len(seeds_b)} of b: pairing needs the same seeds")
        labels, per_seed = _check(replicate.labels, [*seeds_a, *seeds_b], replicate.groups)
        point, aurocs = _aurocs(labels, per_seed, _patient_weights(replicate.groups, n_resamples, seed + r))
        k = len(seeds_a)
        points.append((point[k:] - point[:k]).mean(axis=0))
        resampled.append(_seed_resampled(aurocs[k:] - aurocs[:k], seed + r))
        for name, reason in _skip_reasons(labels).items():
            skipped[name] = reason if len(replicates) == 1 else "; ".join(
                filter(None, [skipped.get(name), f"replicate {r + 1}: {reason}"]))
    point_diff, diffs = np.mean(points, axis=0), np.mean(resampled, axis=0)
    differences = []
    for c in range(len(point_diff)):
        interval = _interval(point_diff[c], diffs[:, c])
        differences.append(
            None if interval is None else Difference(**vars(interval), share_b_better=_share_positive(diffs[:, c]))
        )
    return PairedReport(
        dict(zip(PATHOLOGIES, differences[:-1])), differences[-1], skipped, n_resamples
    )


def _per_seed(scores: np.ndarray) -> list[np.ndarray]:
    """[n, C] or [seeds, n, C] -> one [n, C] array per seed."""
    scores = np.asarray(scores)
    return [scores] if scores.ndim == 2 else list(scores)


def _seed_resampled(per_seed: np.ndarray, seed: int) -> np.ndarray:
    """[seeds, resamples, C] -> [resamples, C]: each resample averages seeds drawn with replacement (one seed: the
    patient resamples alone)."""
    n_seeds, n_resamples = per_seed.shape[:2]
    if n_seeds == 1:
        return per_seed[0]
    draws = np.random.default_rng([seed, 1]).integers(0, n_seeds, (n_resamples, n_seeds))
    return per_seed[draws, np.arange(n_resamples)[:, None]].mean(axis=1)


def _check(labels, scores_list, groups=None) -> tuple[np.ndarray, list[np.ndarray]]:
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(PATHOLOGIES):
        raise ValueError(f"labels must be [n, {len(PATHOLOGIES)}], got {list(labels.shape)}")
    if not np.isin(labels[~np.isnan(labels)], (0.0, 1.0)).all():
        raise ValueError("labels must be 1.0, 0.0 or NaN (masked)")
    scores_list = [np.asarray(scores, dtype=np.float64) for scores in scores_list]
    for scores in scores_list:
        if scores.shape != labels.shape:
            raise ValueError(f"scores {list(scores.shape)} and labels {list(labels.shape)} differ in shape")
        if not np.isfinite(scores).all():
            raise ValueError("scores must be finite")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} rows")
    return labels, scores_list


def _skip_reasons(labels: np.ndarray) -> dict[str, str]:
    reasons = {}
    for c, name in enumerate(PATHOLOGIES):
        column = labels[:, c]
        positives, negatives = int((column == 1).sum()), int((column == 0).sum())
        if positives == 0 or negatives == 0:
            missing = "positive" if positives == 0 else "negative"
            reasons[name] = f"no {missing} labels ({positives} positive, {negatives} negative, " \
                            f"{int(np.isnan(column).sum())} masked)"
    return reasons


def _patient_weights(groups: Sequence, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n_rows]: how often each row's patient was drawn; patients drawn with replacement."""
    _, patient_of_row = np.unique(np.asarray(groups), return_inverse=True)
    n_patients = patient_of_row.max() + 1
    draws = np.random.default_rng(seed).multinomial(n_patients, np.full(n_patients, 1 / n_patients), n_resamples)
    return draws[:, patient_of_row].astype(np.float64)


def _weighted_auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[n_weightings, C] AUROC where row i counts weights[k, i] times; NaN where a class lacks a label kind.

    AUROC = P(score of a positive > score of a negative) + 0.5 P(tie), over weighted pairs: each positive
    collects the negative weight below its score plus half the negative weight at its score."""
    result = np.full((len(weights), labels.shape[1]), np.nan)
    for c in range(labels.shape[1]):
        rows = ~np.isnan(labels[:, c])
        if not rows.any():
            continue
        order = np.argsort(scores[rows, c], kind="stable")
        sorted_scores, positive = scores[rows, c][order], labels[rows, c][order] == 1
        w = weights[:, rows][:, order]
        tie_starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) > 0])
        pos = np.add.reduceat(w * positive, tie_starts, axis=1)
        neg = np.add.reduceat(w * ~positive, tie_starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            result[:, c] = np.where(pairs > 0, (pos * (neg_below + 0.5 * neg)).sum(axis=1) / pairs, np.nan)
    return result


def _aurocs(
    labels: np.ndarray, scores_list: list[np.ndarray], weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Point [models, C+1] and resampled [models, resamples, C+1] AUROC, the last column being the macro.

    A resample's macro averages the classes scored on the full set; it is undefined (NaN, and counted as
    skipped) when one of them is unscorable in that resample, so every macro value averages the same classes."""
    points, resamples = [], []
    for scores in scores_list:
        both = _weighted_auroc(labels, scores, np.vstack([np.ones(len(labels)), weights]))
        scored = ~np.isnan(both[0])
        macro = both[:, scored].mean(axis=1) if scored.any() else np.full(len(both), np.nan)
        both = np.column_stack([both, macro])
        points.append(both[0])
        resamples.append(both[1:])
    return np.stack(points), np.stack(resamples)


def _interval(estimate: float, resampled: np.ndarray) -> Interval | None:
    if np.isnan(estimate):
        return None
    defined = resampled[~np.isnan(resampled)]
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail]) if defined.size else (np.nan, np.nan)
    return Interval(float(estimate), float(low), float(high), int(resampled.size - defined.size))


def _share_positive(diffs: np.ndarray) -> float:
    defined = diffs[~np.isnan(diffs)]
    return float((defined > 0).mean()) if defined.size else float("nan")
