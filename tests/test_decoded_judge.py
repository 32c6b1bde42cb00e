import numpy as np
import pytest

from tasks.evaluation.decoded_judge import MIN_PER_SIDE, fit_decoded_judge
from tasks.pathologies import PATHOLOGIES


def features_for(labels: np.ndarray, seed: int) -> np.ndarray:
    """Noise in 40 dimensions, with class c's positives shifted along dimension c."""
    rng = np.random.default_rng(seed)
    found = rng.normal(size=(len(labels), 40))
    found[:, :len(PATHOLOGIES)] += 3.0 * np.nan_to_num(labels)
    return found


def random_labels(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, len(PATHOLOGIES))) < 0.3).astype(np.float32)


def test_the_probes_rank_held_out_positives_and_leave_masked_labels_out():
    train_labels = random_labels(300, 0)
    train_labels[:150, 1] = np.nan  # masked: neither positive nor negative for class 1
    judge = fit_decoded_judge(features_for(train_labels, 1), train_labels)
    held_out = random_labels(200, 2)

    found = judge.report(features_for(held_out, 3), held_out)
    assert all(value > 0.9 for value in found.per_class.values()) and found.macro > 0.93
    unrelated = judge.report(features_for(random_labels(200, 4), 5), held_out)
    assert abs(unrelated.macro - 0.5) < 0.1


def test_a_class_with_too_few_training_positives_is_skipped_with_its_reason():
    train_labels = random_labels(100, 0)
    train_labels[:, 2] = 0
    train_labels[0, 2] = 1  # one positive: fewer than MIN_PER_SIDE
    assert MIN_PER_SIDE > 1
    judge = fit_decoded_judge(features_for(train_labels, 1), train_labels)
    held_out = random_labels(80, 2)

    found = judge.report(features_for(held_out, 3), held_out)
    assert found.per_class[PATHOLOGIES[2]] is None
    assert "1 positive and 99 negative training images" in found.skipped[PATHOLOGIES[2]]
    assert found.per_class[PATHOLOGIES[0]] is not None


def test_features_and_labels_that_do_not_pair_up_are_a_clear_error():
    with pytest.raises(ValueError, match="do not pair up"):
        fit_decoded_judge(np.zeros((5, 8)), np.zeros((4, len(PATHOLOGIES))))
