"""The quality gate of a gated arm: only the synthetic images whose prompt labels the real-trained classifier agrees
with are trained on.

The judge is the reference arm's real-only classifier (ratio 0, the first seed), the one that measures label
faithfulness. Each class gets a threshold chosen on the real validation set: the score that maximises Youden's J
(sensitivity + specificity - 1), the highest such score on ties. A class is not judged (NaN threshold) where the
validation set cannot tell: it lacks positive or negative labels, or no threshold beats chance (J <= 0).

A synthetic image agrees with its prompt when
- its prompt's study is positive (label 1) for some classes: each of them that is judged scores at or above its
  threshold; other classes scoring high do not matter (findings co-occur, and an impression need not name them all);
- it is positive for none (a No Finding prompt; masked labels are not positive): no judged class scores at or above
  its threshold.

Scores come from the model in eval mode, so the gate is deterministic; it is computed once per synthetic set (the
largest ratio's plan) and every ratio keeps the agreeing images of its prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve

from tasks.generators.synthesis import NO_FINDING
from tasks.pathologies import PATHOLOGIES


def thresholds(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per class [C], the Youden threshold on validation labels [n, C] (NaN = masked) and scores [n, C]; NaN for a
    class that cannot be judged."""
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        known = ~np.isnan(labels[:, c])
        y = labels[known, c]
        if y.min(initial=1) == 1 or y.max(initial=0) == 0:
            continue
        fpr, tpr, cut = roc_curve(y, scores[known, c])
        j = tpr - fpr
        # Cuts decrease: the first maximum is the highest score reaching it (ties within float rounding).
        best = int(np.argmax(j >= j.max() - 1e-9))
        if j[best] > 0:
            out[c] = cut[best]
    return out


def agreement(labels: np.ndarray, scores: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """bool [n]: whether the classifier's scores [n, C] agree with the prompts' labels [n, C] (module doc)."""
    judged = ~np.isnan(cuts)
    positive = labels == 1
    called = scores >= np.where(judged, cuts, np.inf)  # never for a class not judged
    confirmed = (called | ~(positive & judged)).all(axis=1)
    return np.where(positive.any(axis=1), confirmed, ~called.any(axis=1))


@dataclass(frozen=True)
class Gate:
    """The gate over a synthetic set in plan order; a ratio's images are a prefix of it."""

    keep: np.ndarray  # bool [n]: agreement()
    labels: np.ndarray  # [n, C], the prompts' labels

    def kept_per_class(self, n: int) -> dict[str, tuple[int, int]]:
        """{class: (kept, generated)} among the first n images positive for it, and NO_FINDING for those positive
        for none."""
        positive, keep = self.labels[:n] == 1, self.keep[:n]
        columns = {name: positive[:, c] for c, name in enumerate(PATHOLOGIES)} | {NO_FINDING: ~positive.any(axis=1)}
        return {name: (int((rows & keep).sum()), int(rows.sum())) for name, rows in columns.items()}
