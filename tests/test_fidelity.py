"""tasks.evaluation.fidelity: FID, KID, precision/recall/density/coverage on features, from kept libraries."""

import numpy as np
import pytest

from tasks.evaluation import fidelity


def gaussian(n: int, shift: float, seed: int, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, (n, dim))


def test_the_same_distribution_is_close_and_a_shifted_one_far():
    same = fidelity.distances(gaussian(300, 0, 0), gaussian(300, 0, 1), nearest_k=5)
    shifted = fidelity.distances(gaussian(300, 0, 0), gaussian(300, 1.5, 2), nearest_k=5)
    assert same["fid"] < 0.2 * shifted["fid"]
    assert abs(same["kid"]) < 3 * same["kid_std"] < shifted["kid"]  # unbiased: zero within its error
    for measure in ("precision", "recall", "density", "coverage"):
        assert same[measure] > 0.6 > shifted[measure], measure


def test_recall_sees_a_collapsed_generator_that_precision_does_not():
    real = gaussian(300, 0, 0)
    collapsed = real[:10].repeat(30, axis=0) + 0.01 * gaussian(300, 0, 3)  # ten modes, copied with jitter
    scores = fidelity.precision_recall_density_coverage(real, collapsed, nearest_k=5)
    assert scores["precision"] > 0.9 and scores["recall"] < 0.2 and scores["coverage"] < 0.2


def test_nearest_distances_find_the_nearest_reference():
    references = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    distance, index = fidelity.nearest_distances(np.array([[9.0, 0.0], [0.0, 0.5]]), references)
    np.testing.assert_allclose(distance, [1.0, 0.5])
    assert index.tolist() == [1, 0]


def test_nearest_neighbours_are_the_k_nearest_references_nearest_first():
    references = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [4.0, 0.0]])
    distance, index = fidelity.nearest_neighbours(np.array([[9.0, 0.0], [0.0, 9.0]]), references, k=2)
    assert index.tolist() == [[1, 3], [2, 0]]
    np.testing.assert_allclose(distance, [[1.0, 5.0], [1.0, 9.0]])


def test_too_few_points_for_the_neighbourhood_is_a_clear_error():
    with pytest.raises(ValueError, match="nearest_k=5"):
        fidelity.precision_recall_density_coverage(gaussian(5, 0, 0), gaussian(50, 0, 1), nearest_k=5)
