"""The composite strategies' arithmetic: hand-computed answers and brute-force equivalents."""

import math
import tracemalloc

import numpy as np
import pytest

from orchestrator.al import selection_math as sm


def test_percentile_rank_spreads_finite_values_over_0_to_1_and_shares_ties():
    ranks = sm.percentile_rank(np.array([3.0, 1.0, 2.0, np.nan, 2.0, np.inf]))
    np.testing.assert_allclose(ranks[[0, 1, 2, 4]], [1.0, 0.0, 0.5, 0.5])
    assert np.isnan(ranks[3]) and np.isnan(ranks[5])
    assert sm.percentile_rank(np.array([7.0])).tolist() == [1.0]


def test_typicality_is_the_inverse_mean_distance_to_the_nearest_others():
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    got = sm.typicality(x, x, neighbours=2, self_anchor=np.arange(4))
    np.testing.assert_allclose(got, [1 / 1.5, 1 / 1.0, 1 / 1.5, 1 / 8.5])


def test_typicality_in_chunks_and_with_a_non_finite_row():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3))
    x[7] = np.nan
    anchors = x[:20]
    own = np.where(np.arange(50) < 20, np.arange(50), -1)
    at_once = sm.typicality(x, anchors, 5, self_anchor=own)
    chunked = sm.typicality(x, anchors, 5, self_anchor=own, chunk_rows=3)
    np.testing.assert_array_equal(at_once, chunked)
    assert np.isnan(at_once[7]) and np.isfinite(np.delete(at_once, 7)).all()


def test_greedy_log_det_passes_over_a_copy_of_its_first_pick():
    features = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # row 1 points where row 0 does
    quality = np.array([1.0, 0.99, 0.5])
    order = sm.greedy_log_det(features, quality, 3, np.arange(3), epsilon=0.1, diversity=1.0)
    np.testing.assert_array_equal(order, [0, 2, 1])
    no_diversity = sm.greedy_log_det(features, quality, 3, np.arange(3), diversity=0.0)
    np.testing.assert_array_equal(no_diversity, [0, 1, 2])


def test_greedy_log_det_gains_add_up_to_the_log_determinant_and_each_pick_is_the_best():
    rng = np.random.default_rng(3)
    n, e, eps = 9, 3, 0.2
    features = rng.standard_normal((n, e))
    quality = rng.uniform(0, 1, n)
    phi = features / np.linalg.norm(features, axis=1, keepdims=True)
    q = np.exp(quality / 2)
    kernel = q[:, None] * (phi @ phi.T + eps * np.eye(n)) * q[None, :]

    def log_det(rows):
        return np.linalg.slogdet(kernel[np.ix_(rows, rows)])[1] if rows else 0.0

    order = sm.greedy_log_det(features, quality, 6, rng.permutation(n), epsilon=eps)
    for i in range(1, 7):  # brute force: each pick maximises the log-det of the set so far
        best = max((r for r in range(n) if r not in order[:i - 1]),
                   key=lambda r: log_det(list(order[:i - 1]) + [r]))
        assert order[i - 1] == best


def test_greedy_log_det_takes_non_finite_rows_last():
    features = np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 1.0]])
    order = sm.greedy_log_det(features, np.array([0.0, 5.0, np.nan]), 3, np.arange(3))
    assert order[0] == 0 and set(order[1:].tolist()) == {1, 2}


def test_pareto_fronts_of_a_hand_made_set():
    #            P    Q    R    S    T(non-finite)
    a = np.array([3.0, 1.0, 2.0, 0.5, np.nan])
    b = np.array([0.0, 3.0, 2.0, 1.0, 1.0])
    np.testing.assert_array_equal(sm.pareto_fronts(a, b), [0, 0, 0, 1, -1])


def test_pareto_fronts_agree_with_brute_force_non_dominated_sorting_ties_included():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        a, b = rng.integers(0, 5, n).astype(float), rng.integers(0, 5, n).astype(float)
        expected, remaining, level = np.full(n, -1), set(range(n)), 0
        while remaining:
            front = [i for i in remaining if not any(
                a[j] >= a[i] and b[j] >= b[i] and (a[j] > a[i] or b[j] > b[i]) for j in remaining)]
            expected[front] = level
            remaining -= set(front)
            level += 1
        np.testing.assert_array_equal(sm.pareto_fronts(a, b), expected)


def test_gaussians_share_a_shrunk_covariance_and_give_mahalanobis_distances():
    ring = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    x = np.concatenate([ring, ring + [4.0, 0.0]])
    labels = np.array([0] * 4 + [1] * 4)
    classes, means, precision = sm.fit_gaussians(x, labels, shrinkage=0.5)
    # pooled covariance: 4·I / (8 − 2) = (2/3)·I, already isotropic, so shrinking keeps it
    np.testing.assert_allclose(means, [[0.0, 0.0], [4.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(precision, 1.5 * np.eye(2))
    np.testing.assert_allclose(sm.mahalanobis_sq(np.array([[2.0, 0.0], [0.0, 1.0]]), means, precision),
                               [[6.0, 6.0], [1.5, 1.5 * 17]])
    assert classes.tolist() == [0, 1]


def test_a_class_of_one_row_each_still_gives_an_invertible_covariance():
    _, _, precision = sm.fit_gaussians(np.array([[0.0, 0.0], [2.0, 2.0]]), np.array([0, 1]), 0.5)
    assert np.isfinite(precision).all() and np.linalg.det(precision) > 0


def test_exp3_starts_even_then_favours_the_arm_whose_batch_gained():
    rounds = [(np.array([10, 0]), 0.1), (np.array([0, 10]), -0.05), (np.array([5, 5]), math.nan)]
    p = sm.exp3_probabilities(rounds, 2, gamma=0.2, eta=10.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5])
    first = 0.8 * np.array([math.e**2, 1.0]) / (math.e**2 + 1) + 0.1  # log w = [10·0.1·1/0.5, 0]
    np.testing.assert_allclose(p[1], first)
    log_w = np.array([2.0, 10 * -0.05 / first[1]])
    second = 0.8 * np.exp(log_w) / np.exp(log_w).sum() + 0.1
    np.testing.assert_allclose(p[2], second)
    np.testing.assert_allclose(p[3], second)  # a round with no reward changes nothing
    assert len(p) == 4 and all(v.sum() == pytest.approx(1.0) for v in p)


@pytest.mark.parametrize("n, anchors", [(5, 10), (50, 10)])
def test_anchors_are_all_rows_of_a_small_set_else_a_sorted_sample(n, anchors):
    chosen = sm.sample_anchors(n, anchors, np.random.default_rng(0))
    assert len(chosen) == min(n, anchors) and np.all(np.diff(chosen) > 0)
    assert set(chosen.tolist()) <= set(range(n))


def test_memory_stays_linear_in_the_pool():
    """20,000 rows: an N×N float64 matrix would be 3.2 GB; every helper stays under 40 MB."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 16))
    quality = rng.uniform(size=len(x))
    tracemalloc.start()
    try:
        sm.typicality(x, x[:200], 20)
        sm.mahalanobis_sq(x, x[:10], np.eye(16))
        sm.greedy_log_det(x, quality, 50, np.arange(len(x)))
        sm.pareto_fronts(quality, x[:, 0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20


def blobs(n_per_class, classes=3, dims=5, spread=0.3, seed=0):
    """Well-separated Gaussian classes: centres on the axes, ``n_per_class`` rows each."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = 3.0 * np.eye(classes, dims)[y] + spread * rng.standard_normal((len(y), dims))
    return x, y


def test_a_probe_on_separable_embeddings_classifies_the_validation_rows():
    x, y = blobs(20)
    val_x, val_y = blobs(10, seed=1)
    assert sm.probe_accuracy(x, y, val_x, val_y, 3) == 1.0
    assert sm.probe_accuracy(x, y, val_x, val_y, 3) == sm.probe_accuracy(x, y, val_x, val_y, 3)


def test_a_probe_without_validation_rows_has_no_accuracy_and_without_training_rows_a_constant():
    x, y = blobs(5)
    assert math.isnan(sm.probe_accuracy(x, y, x[:0], y[:0], 3))
    assert sm.probe_accuracy(x[:0], y[:0], x, y, 3) == pytest.approx(1 / 3)  # class 0 everywhere


def test_leaving_out_the_only_rows_of_a_class_costs_that_class_and_a_redundant_group_nothing():
    x, y = blobs(20)
    val_x, val_y = blobs(10, seed=1)
    groups = np.full(len(y), -1)
    groups[y == 2] = 0  # every example of class 2
    groups[np.flatnonzero(y == 0)[:5]] = 1  # 5 of 20 examples of class 0
    gain = sm.leave_group_out_gain(x, y, groups, 3, val_x, val_y, 3)
    assert gain[0] == pytest.approx(1 / 3)  # without them class 2 is never predicted
    assert gain[1] == 0.0
    assert math.isnan(gain[2])  # a group that chose nothing


def test_junk_answers_never_train_the_probe_but_stay_in_their_group():
    x, y = blobs(20)
    val_x, val_y = blobs(10, seed=1)
    junk = np.full((10, x.shape[1]), 50.0)  # far from every class: would pull a class if trained on
    groups = np.r_[np.full(len(y), -1), np.zeros(10, int)]
    gain = sm.leave_group_out_gain(np.r_[x, junk], np.r_[y, np.full(10, -1)], groups, 1,
                                   val_x, val_y, 3)
    assert gain.tolist() == [0.0]


def test_useful_balance_is_one_for_even_answers_and_falls_with_skew_and_junk():
    even = np.repeat(np.arange(4), 25)
    assert sm.useful_balance(even, 4) == 1.0
    skewed = np.r_[np.zeros(85, int), np.arange(1, 4).repeat(5)]
    assert 0.3 < sm.useful_balance(skewed, 4) < 0.6
    assert sm.useful_balance(np.r_[even, np.full(25, -1)], 4) == pytest.approx(0.8)  # a fifth junk
    assert sm.useful_balance(np.full(3, -1), 4) == 0.0
    assert math.isnan(sm.useful_balance(np.zeros(0, int), 4))


def test_even_draws_score_more_with_more_answers_unless_judged_per_size():
    rng = np.random.default_rng(0)
    few = [rng.integers(0, 13, 5) for _ in range(500)]
    many = [rng.integers(0, 13, 80) for _ in range(500)]
    plain = [np.mean([sm.useful_balance(a, 13) for a in draws]) for draws in (few, many)]
    sized = [np.mean([sm.useful_balance(a, 13, per_size=True) for a in draws]) for draws in (few, many)]
    assert plain[1] - plain[0] > 0.25  # log C is out of reach of 5 answers
    assert sized == pytest.approx([1.0, 1.0], abs=0.02)


def test_per_size_balance_still_falls_with_skew_and_junk():
    even = np.repeat(np.arange(4), 25)
    skewed = np.r_[np.zeros(85, int), np.arange(1, 4).repeat(5)]
    assert sm.useful_balance(skewed, 4, per_size=True) < 0.6
    assert sm.useful_balance(np.r_[even, np.full(25, -1)], 4, per_size=True) == pytest.approx(
        0.8 * sm.useful_balance(even, 4, per_size=True))
    assert sm.useful_balance(np.array([2]), 4, per_size=True) == 1.0  # one answer: nothing uneven


def test_expected_even_entropy_matches_simulated_draws():
    rng = np.random.default_rng(1)
    for n, classes in ((3, 13), (20, 13), (40, 50)):
        simulated = []
        for _ in range(4000):
            counts = np.bincount(rng.integers(0, classes, n))
            p = counts[counts > 0] / n
            simulated.append(-(p * np.log(p)).sum() + (len(p) - 1) / (2 * n))
        assert sm.expected_even_entropy(n, classes) == pytest.approx(np.mean(simulated), rel=0.01)
    assert sm.expected_even_entropy(1, 13) == 0.0


def test_useful_balance_corrects_a_small_sample_so_random_answers_score_near_one():
    rng = np.random.default_rng(0)
    small = [sm.useful_balance(rng.integers(13, size=20), 13) for _ in range(300)]
    assert 0.92 < np.mean(small) <= 1.0  # uncorrected, 20 draws from 13 classes average 0.86
