import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tasks.evaluation.metrics import (auroc_per_class, bootstrap_auroc, paired_bootstrap_difference,
                                      pooled_paired_difference, Replicate)
from tasks.pathologies import PATHOLOGIES

C = len(PATHOLOGIES)


def make_task(n_patients: int, images_per_patient: int = 1, signal: float = 1.0, seed: int = 0):
    """Labels per patient (shared by its images), scores = signal * label + noise; every class has both kinds."""
    rng = np.random.default_rng(seed)
    patient_labels = (rng.random((n_patients, C)) < 0.4).astype(float)
    patient_labels[:2] = [[1.0] * C, [0.0] * C]
    labels = np.repeat(patient_labels, images_per_patient, axis=0)
    scores = signal * labels + rng.normal(size=labels.shape)
    groups = np.repeat(np.arange(n_patients), images_per_patient)
    return labels, scores, groups


def width(interval) -> float:
    return interval.ci_high - interval.ci_low


def test_auroc_matches_sklearn_with_ties_and_masked_labels():
    rng = np.random.default_rng(1)
    labels = (rng.random((300, C)) < 0.3).astype(float)
    labels[rng.random(labels.shape) < 0.2] = np.nan
    scores = np.round(rng.random((300, C)) + 0.5 * np.nan_to_num(labels), 1)  # rounding makes many ties

    report = auroc_per_class(labels, scores)

    for c, name in enumerate(PATHOLOGIES):
        kept = ~np.isnan(labels[:, c])
        assert report.per_class[name] == pytest.approx(roc_auc_score(labels[kept, c], scores[kept, c]), abs=1e-12)
    assert report.macro == pytest.approx(np.mean(list(report.per_class.values())))
    assert report.skipped == {}


def test_masked_labels_do_not_count_whatever_their_scores():
    labels, scores, _ = make_task(60)
    labels[:20, 3] = np.nan
    changed = scores.copy()
    changed[:20, 3] = np.random.default_rng(5).normal(size=20) * 100

    assert auroc_per_class(labels, changed).per_class == auroc_per_class(labels, scores).per_class


def test_class_without_positives_is_skipped_reported_and_left_out_of_the_macro():
    labels, scores, _ = make_task(50)
    labels[:, 2] = 0.0  # no positives
    labels[:, 5] = np.nan  # nothing labelled

    report = auroc_per_class(labels, scores)

    assert report.per_class[PATHOLOGIES[2]] is None and report.per_class[PATHOLOGIES[5]] is None
    assert set(report.skipped) == {PATHOLOGIES[2], PATHOLOGIES[5]}
    assert "no positive labels" in report.skipped[PATHOLOGIES[2]]
    scored = [value for value in report.per_class.values() if value is not None]
    assert len(scored) == C - 2 and report.macro == pytest.approx(np.mean(scored))


def test_no_scorable_class_gives_no_macro():
    labels, scores, _ = make_task(10)
    report = auroc_per_class(np.ones_like(labels), scores)
    assert report.macro is None and len(report.skipped) == C


def test_bad_inputs_are_refused():
    labels, scores, groups = make_task(10)
    with pytest.raises(ValueError, match="shape"):
        auroc_per_class(labels, scores[:, :3])
    with pytest.raises(ValueError, match="1.0, 0.0 or NaN"):
        auroc_per_class(np.where(labels == 0, -1.0, labels), scores)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_auroc(labels, scores, groups[:-1], n_resamples=10)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_patients():
    small = bootstrap_auroc(*make_task(40), n_resamples=300, seed=0)
    large = bootstrap_auroc(*make_task(640), n_resamples=300, seed=0)

    point = auroc_per_class(*make_task(40)[:2])
    assert small.macro.estimate == pytest.approx(point.macro)
    for report in (small, large):
        for interval in [*report.per_class.values(), report.macro]:
            assert interval.ci_low <= interval.estimate <= interval.ci_high
            assert interval.n_skipped == 0
    # 16x the patients: intervals about 4x narrower.
    assert width(large.macro) < width(small.macro) / 2.5
    assert np.mean([width(large.per_class[p]) / width(small.per_class[p]) for p in PATHOLOGIES]) < 0.4


def test_bootstrap_resamples_patients_not_images():
    labels, scores, groups = make_task(80, images_per_patient=1, seed=3)
    copies = lambda array: np.repeat(array, 5, axis=0)  # every image of every patient five times

    per_patient = bootstrap_auroc(labels, scores, groups, n_resamples=400, seed=1).macro
    duplicated = bootstrap_auroc(copies(labels), copies(scores), copies(groups), n_resamples=400, seed=1).macro
    as_if_independent = bootstrap_auroc(
        copies(labels), copies(scores), np.arange(len(groups) * 5), n_resamples=400, seed=1
    ).macro

    assert duplicated.estimate == pytest.approx(per_patient.estimate)
    assert 0.8 < width(duplicated) / width(per_patient) < 1.25
    # Treating the copies as independent images would shrink the interval by about sqrt(5).
    assert width(as_if_independent) < 0.6 * width(per_patient)


def test_resamples_without_a_label_kind_are_skipped_and_counted():
    labels, scores, groups = make_task(20)
    labels[:, 4] = 0.0
    labels[0, 4] = 1.0  # one positive patient: absent from about (19/20)^20 = 36% of resamples

    report = bootstrap_auroc(labels, scores, groups, n_resamples=500, seed=2)

    rare = report.per_class[PATHOLOGIES[4]]
    assert 100 < rare.n_skipped < 260
    assert report.macro.n_skipped >= rare.n_skipped
    assert all(report.per_class[p].n_skipped < rare.n_skipped for p in PATHOLOGIES if p != PATHOLOGIES[4])


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    labels, scores, groups = make_task(50)

    report = paired_bootstrap_difference(labels, scores, scores.copy(), groups, n_resamples=200)

    for difference in [*report.per_class.values(), report.macro]:
        assert (difference.estimate, difference.ci_low, difference.ci_high) == (0.0, 0.0, 0.0)
        assert difference.share_b_better == 0.0


def test_paired_difference_of_a_clearly_better_model_excludes_zero():
    labels, weak, groups = make_task(150, signal=0.3, seed=4)
    strong = weak + 2.0 * labels

    report = paired_bootstrap_difference(labels, weak, strong, groups, n_resamples=300)

    assert report.macro.estimate > 0.1 and report.macro.ci_low > 0
    assert report.macro.share_b_better == 1.0
    assert all(report.per_class[p].ci_low > 0 for p in PATHOLOGIES)
    reverse = paired_bootstrap_difference(labels, strong, weak, groups, n_resamples=300)
    assert reverse.macro.estimate == pytest.approx(-report.macro.estimate) and reverse.macro.ci_high < 0


def test_paired_difference_uses_the_same_resamples_for_both_models():
    labels, scores_a, groups = make_task(100, seed=6)
    scores_b = scores_a + np.random.default_rng(7).normal(scale=0.05, size=scores_a.shape)

    difference = paired_bootstrap_difference(labels, scores_a, scores_b, groups, n_resamples=300).macro
    alone = bootstrap_auroc(labels, scores_a, groups, n_resamples=300).macro

    # Nearly identical models on the same draws differ far less than one model varies across draws;
    # independent draws for a and b would give a difference interval wider than either model's own.
    assert width(difference) < 0.2 * width(alone)


def test_one_seed_given_as_a_stack_is_the_single_seed_report():
    labels, scores, groups = make_task(80)
    flat, stacked = (bootstrap_auroc(labels, s, groups, n_resamples=200) for s in (scores, scores[None]))
    assert flat == stacked


def test_seed_variation_widens_the_interval_around_the_mean_of_the_seeds():
    labels, _, groups = make_task(200)
    rng = np.random.default_rng(5)
    # Three training seeds that learned very differently: the seed, not the test set, dominates the spread.
    seeds = np.stack([signal * labels + rng.normal(size=labels.shape) for signal in (0.3, 1.0, 2.5)])
    report = bootstrap_auroc(labels, seeds, groups, n_resamples=400)
    per_seed = [auroc_per_class(labels, s).macro for s in seeds]
    assert report.macro.estimate == pytest.approx(np.mean(per_seed))
    alone = bootstrap_auroc(labels, seeds[1], groups, n_resamples=400)
    assert width(report.macro) > 2 * width(alone.macro)
    assert report.macro.ci_low < per_seed[1] < report.macro.ci_high


def test_paired_differences_pair_the_seeds():
    labels, _, groups = make_task(200)
    rng = np.random.default_rng(6)
    a = np.stack([signal * labels + rng.normal(size=labels.shape) for signal in (0.5, 1.5)])
    better = a + 0.8 * labels  # seed by seed, b adds the same signal to a
    paired = paired_bootstrap_difference(labels, a, better, groups, n_resamples=400)
    assert paired.macro.ci_low > 0 and paired.macro.share_b_better == 1.0
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap_difference(labels, a, better[:1], groups)


def replicate(seed: int, gain: float, n_patients: int = 120) -> Replicate:
    """One independent test set, model b scoring `gain` times the label better than model a."""
    labels, scores, groups = make_task(n_patients, signal=0.5, seed=seed)
    return Replicate(labels, scores, scores + gain * labels, groups)


def test_pooled_difference_is_the_mean_of_the_replicates_with_a_narrower_interval():
    first, second = replicate(seed=1, gain=0.4), replicate(seed=2, gain=0.4)
    alone = [paired_bootstrap_difference(r.labels, r.scores_a, r.scores_b, r.groups, 300, seed=s).macro
             for s, r in enumerate((first, second))]

    pooled = pooled_paired_difference([first, second], n_resamples=300).macro

    assert pooled.estimate == pytest.approx(np.mean([d.estimate for d in alone]))
    # Each replicate's resamples are those it has alone (seed + r), averaged: twice the test patients.
    assert width(pooled) < 0.85 * min(width(d) for d in alone)
    assert pooled.ci_low > 0


def test_replicates_that_disagree_pool_to_their_mean_within_each_of_their_intervals():
    up, down = replicate(seed=1, gain=0.6), replicate(seed=2, gain=-0.6)
    alone = [pooled_paired_difference([r], 300, seed=s).macro for s, r in enumerate((up, down))]
    pooled = pooled_paired_difference([up, down], 300).macro
    # A fixed-effect pool: its interval covers the test patients and seeds of each replicate, not how the effect
    # varies between cohorts, so the replicates' own columns must stay beside it.
    assert alone[0].ci_low > 0 > alone[1].ci_high
    assert pooled.estimate == pytest.approx((alone[0].estimate + alone[1].estimate) / 2)
    assert alone[1].ci_high < pooled.ci_low <= pooled.ci_high < alone[0].ci_low


def test_one_replicate_is_the_paired_difference_and_skips_name_the_replicate():
    one = replicate(seed=3, gain=0.3)
    assert pooled_paired_difference([one], 200, seed=5) == paired_bootstrap_difference(
        one.labels, one.scores_a, one.scores_b, one.groups, 200, seed=5)

    other = replicate(seed=4, gain=0.3)
    labels = other.labels.copy()
    labels[:, 0] = 0.0  # no positive of the first class in the second replicate
    pooled = pooled_paired_difference([one, Replicate(labels, other.scores_a, other.scores_b, other.groups)], 200)
    assert pooled.per_class[PATHOLOGIES[0]] is None  # pooled only where every replicate scores the class
    assert pooled.skipped[PATHOLOGIES[0]].startswith("replicate 2: no positive labels")
    assert pooled.per_class[PATHOLOGIES[1]] is not None
    with pytest.raises(ValueError, match="no replicate"):
        pooled_paired_difference([])
