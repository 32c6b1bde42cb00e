"""A label judge for decoded images: the real-trained classifier's features, its last layer refitted on the
generator's reconstructions of real training images.

Every image a latent generator makes goes through its decoder, and a decoder can put its images off the domain of a
classifier trained on real films: softer, with other textures, so that the real-trained classifier ranks findings
near chance on them even where they are drawn (the tiny VQ-GAN of tests/test_raygen_learns.py did this to a judge
trained on sharp images). Faithfulness therefore asks two judges, each beside its reference
(tasks/evaluation/generator_eval.py):

- the real-trained classifier on half B's real images (what it can tell at all), on their reconstructions (what
  survives the tokenizer, for that reader) and on the generated images;
- this judge: a per-class logistic regression on the real-trained classifier's in-domain features (the DenseNet
  that FID uses), fitted on reconstructions of the generator cohort's real training images with their labels. Its
  AUROC on reconstructions of half B's images is its ceiling (held-out, same domain); its AUROC on the generated
  images says whether the finding the prompt names is drawn, apart from how decoded images look.

Where the real-trained classifier reads reconstructions as well as real images (the demo's VQ-GAN: docs/RESULTS.md),
it is the better reader and its column is the one to read; where it does not, this one's.

The features are standardised and the classes balanced (rare findings have a few dozen positives); a fixed, strong
L2 penalty (C below) since there are about as many training images as feature dimensions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tasks.evaluation import fidelity
from tasks.evaluation.metrics import auroc_per_class, MetricReport
from tasks.pathologies import PATHOLOGIES

C = 0.05  # inverse L2 strength of each class's probe
MIN_PER_SIDE = 2  # training positives and negatives a class needs for a probe


@dataclass(frozen=True)
class DecodedJudge:
    probes: list[Pipeline | None]  # one per pathology; None where training had too few positives or negatives
    reasons: dict[str, str]  # pathology -> why it has no probe

    @property
    def judged(self) -> np.ndarray:
        """bool [C]: the classes that have a probe."""
        return np.array([probe is not None for probe in self.probes])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """[n, C] log-odds of each class from features [n, D]; 0 for a class without a probe (see `judged`)."""
        return np.column_stack([np.zeros(len(features)) if probe is None else probe.decision_function(features)
                                for probe in self.probes])

    def report(self, features: np.ndarray, labels: np.ndarray) -> MetricReport:
        """Per-class AUROC of the probes on features [n, D] against labels [n, C] (NaN = masked); a class without
        a probe is skipped with its reason."""
        report = auroc_per_class(np.where(self.judged, labels, np.nan), self.scores(features))
        return replace(report, skipped=report.skipped | self.reasons)


def fit_decoded_judge(features: np.ndarray, labels: np.ndarray) -> DecodedJudge:
    """One probe per pathology on training features [n, D] and labels [n, C] (NaN = masked: left out of that
    class)."""
    if len(features) != len(labels) or labels.shape[1] != len(PATHOLOGIES):
        raise ValueError(f"features {list(features.shape)} and labels {list(labels.shape)} do not pair up over "
                         f"{len(PATHOLOGIES)} classes")
    probes, reasons = [], {}
    for c, name in enumerate(PATHOLOGIES):
        known = ~np.isnan(labels[:, c])
        y = labels[known, c]
        positives, negatives = int((y == 1).sum()), int((y == 0).sum())
        if min(positives, negatives) < MIN_PER_SIDE:
            probes.append(None)
            reasons[name] = (f"the decoded-domain judge has {positives} positive and {negatives} negative training "
                             f"images, fewer than {MIN_PER_SIDE} on a side")
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=2000))
        probes.append(probe.fit(features[known], y))
    return DecodedJudge(probes, reasons)


def fit_on_reconstructions(images: np.ndarray, labels: np.ndarray, reconstruct: Callable[[np.ndarray], np.ndarray],
                           extractor: fidelity.Extractor) -> DecodedJudge:
    """The judge of the module doc: probes on the extractor's features of real images [n, R, R] through the
    generator's latent space and back (`reconstruct`), with the images' labels [n, C]."""
    return fit_decoded_judge(fidelity.features(reconstruct(images), extractor), labels)
