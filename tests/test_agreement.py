"""Spearman's rho with ties (reports/agreement.py) on hand-computed cases; scipy as the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from reports.agreement import average_ranks, spearman


def test_average_ranks_share_the_mean_rank_of_a_tie():
    assert average_ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    assert average_ranks([1, 1, 1]) == [2, 2, 2]
    assert average_ranks([]) == []


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x 1 2 3 4, y 2 1 4 3: 1 - 6 * (1 + 1 + 1 + 1) / (4 * 15) = 0.6
    assert spearman([1, 2, 3, 4], [20, 10, 40, 30]) == pytest.approx(0.6)
    # a tie: x ranks 1 2.5 2.5 4, y 1 2 3 4; Pearson of ranks = 4.5 / sqrt(4.5 * 5) = 0.9487
    assert spearman([0, 1, 1, 2], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    # a binary score (pointing game) against a continuous one: x ranks 1.5 1.5 3.5 3.5, y 1 3 2 4
    # sum of products of deviations 2, sums of squares 4 and 5: 2 / sqrt(20)
    assert spearman([0, 0, 1, 1], [0.1, 0.5, 0.3, 0.9]) == pytest.approx(2 / np.sqrt(20))


def test_missing_values_pairs_and_constant_scores():
    assert spearman([1, None, 2, 3, float("nan")], [1, 5, 2, 3, 4]) == pytest.approx(1.0)  # 3 pairs left
    assert spearman([1, 2], [1, 2]) is None                 # fewer than 3 pairs: no ranking to speak of
    assert spearman([1, 1, 1], [1, 2, 3]) is None           # a constant side has no order
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_agrees_with_scipy_on_random_tied_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 40))
        x, y = rng.integers(0, 5, n).tolist(), rng.normal(size=n).round(1).tolist()
        expected = stats.spearmanr(x, y).statistic
        got = spearman(x, y)
        assert (got is None) if np.isnan(expected) else got == pytest.approx(expected, abs=1e-12)
