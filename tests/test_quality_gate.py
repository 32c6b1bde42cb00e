"""The quality gate: per-class thresholds on real validation, agreement with the prompts' labels, counts kept."""

import numpy as np

from tasks.evaluation.quality_gate import agreement, Gate, thresholds
from tasks.generators.synthesis import NO_FINDING
from tasks.pathologies import PATHOLOGIES

C = len(PATHOLOGIES)


def test_the_threshold_is_youdens_and_a_class_validation_cannot_judge_has_none():
    labels = np.zeros((6, C))
    labels[:, 0] = [0, 0, 0, 1, 1, 1]
    scores = np.full((6, C), 0.5)
    scores[:, 0] = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]  # J: 2/3 at 0.7 (highest such cut), 2/3 - 1/3 at 0.4
    labels[:, 1] = [0, 1, np.nan, 0, 1, 0]
    scores[:, 1] = [0.1, 0.8, 0.99, 0.3, 0.7, 0.2]  # separable once the masked row is left out
    labels[:, 2] = [0, 1, 0, 1, 0, 1]  # scores tied for every image: no cut beats chance
    labels[:, 3] = 1  # no negatives

    cuts = thresholds(labels, scores)

    assert cuts[0] == 0.7 and cuts[1] == 0.7
    assert np.isnan(cuts[2:]).all()  # class 2 at chance; 3 positive only; the rest negative only


def test_agreement_confirms_each_prompt_positive_and_no_finding_means_none_called():
    cuts = np.full(C, np.nan)
    cuts[:3] = 0.5  # classes 0-2 judged
    labels = np.zeros((6, C))
    labels[0, [0, 1]] = 1  # both confirmed, and class 2 high too: kept (findings co-occur)
    labels[1, [0, 1]] = 1  # class 1 not confirmed: dropped
    labels[2, 5] = 1  # positive only for a class not judged: nothing to refute, kept
    labels[4, 0] = np.nan  # masked is not positive: a No Finding prompt, class 1 called: dropped
    scores = np.full((6, C), 0.1)
    scores[0, [0, 1, 2]] = 0.9
    scores[1, 0] = 0.9
    scores[2, 5] = 0.0
    scores[3, 7] = 0.99  # No Finding, only a class not judged high: kept
    scores[4, 1] = 0.5  # at the threshold counts as called
    scores[5, :3] = 0.49  # No Finding, every judged class below: kept

    assert agreement(labels, scores, cuts).tolist() == [True, False, True, True, False, True]


def test_the_gate_counts_what_it_kept_per_class_within_a_prefix():
    labels = np.zeros((5, C))
    labels[0, 0] = labels[1, 0] = labels[1, 4] = labels[4, 4] = 1
    gate = Gate(np.array([True, False, True, False, True]), labels)

    everything, prefix = gate.kept_per_class(5), gate.kept_per_class(2)

    assert everything[PATHOLOGIES[0]] == (1, 2) and everything[PATHOLOGIES[4]] == (1, 2)
    assert everything[NO_FINDING] == (1, 2) and everything[PATHOLOGIES[1]] == (0, 0)
    assert prefix[PATHOLOGIES[0]] == (1, 2) and prefix[PATHOLOGIES[4]] == (0, 1) and prefix[NO_FINDING] == (0, 0)
