"""``reports.paired``: the paired difference of two runs' accuracies with a bootstrap over images
and a sign-flip permutation test, against hand-computed cases and a brute-force enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from reports.paired import EXACT_UP_TO, paired_difference


def test_identical_runs_differ_by_nothing():
    acc = [1.0, 0.3, 0.0, 1.0, 0.6]
    d = paired_difference(acc, acc, ["i0", "i0", "i1", "i2", "i2"])
    assert (d.mean, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (d.n_questions, d.n_images) == (5, 3)


def test_one_image_where_b_is_right_on_every_question():
    d = paired_difference([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], ["i0"] * 3)
    # every resample is that image: the interval is the difference itself; both sign flips
    # (+3, -3) are as extreme as the observed one: p = 2/2
    assert (d.mean, d.low, d.high, d.p_value) == (1.0, 1.0, 1.0, 1.0)
    assert (d.n_questions, d.n_images, d.p_method) == (3, 1, "exact, all 2 sign flips")


def test_a_constant_difference_per_image_is_its_own_interval():
    # images of 1, 2 and 3 questions, each question 0.3 better in b: any draw of images means 0.3
    groups = ["i0", "i1", "i1", "i2", "i2", "i2"]
    a = [0.0, 0.3, 0.6, 0.0, 0.4, 0.7]
    d = paired_difference(a, [x + 0.3 for x in a], groups)
    assert d.mean == pytest.approx(0.3) and d.low == pytest.approx(0.3) and d.high == pytest.approx(0.3)


def test_the_exact_p_value_is_the_share_of_sign_flips_at_least_as_extreme():
    rng = np.random.default_rng(5)
    groups = np.repeat([f"i{k}" for k in range(9)], rng.integers(1, 4, 9))
    a = rng.integers(0, 2, len(groups)).astype(float)
    b = np.where(rng.random(len(groups)) < 0.7, 1.0, a)
    # brute force: every assignment of swapping a and b within an image
    images = sorted(set(groups))
    observed = abs(b.sum() - a.sum())
    extreme = 0
    for swap in itertools.product([False, True], repeat=len(images)):
        swapped = np.isin(groups, [im for im, s in zip(images, swap) if s])
        total = np.where(swapped, a - b, b - a).sum()
        extreme += abs(total) >= observed - 1e-9
    d = paired_difference(a, b, groups)
    assert d.p_method == "exact, all 512 sign flips"
    assert d.p_value == pytest.approx(extreme / 2 ** len(images))
    assert d.mean == pytest.approx((b - a).mean())


def test_many_images_draw_random_flips_reproducibly_and_near_the_exact_share():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(40), 3)
    a = rng.random(120)
    b = np.clip(a + rng.normal(0.04, 0.4, 120), 0, 1)
    first = paired_difference(a, b, groups, resamples=4000, seed=3)
    assert first == paired_difference(a, b, groups, resamples=4000, seed=3)
    assert first != paired_difference(a, b, groups, resamples=4000, seed=4)
    assert first.p_method == "4000 random sign flips" and len(set(groups)) > EXACT_UP_TO
    # the Monte Carlo p-value estimates the share of all 2^40 flips: check it against many more draws
    sums = np.bincount(groups, b - a)
    signs = np.random.default_rng(9).choice([-1.0, 1.0], size=(200_000, 40))
    share = np.mean(np.abs(signs @ sums) >= abs(sums.sum()) - 1e-9)
    assert abs(first.p_value - share) < 0.03
    assert first.low <= first.mean <= first.high and 0.01 < first.p_value < 0.99


def test_the_bootstrap_resamples_images_not_questions():
    # 20 images of 10 questions each; within an image b is better on all or on none of them:
    # the questions are far from independent, so the image-level interval is much wider than a
    # question-level one would be
    rng = np.random.default_rng(2)
    better = rng.random(20) < 0.5
    groups = np.repeat(np.arange(20), 10)
    a = np.zeros(200)
    b = np.repeat(better, 10).astype(float)
    by_image = paired_difference(a, b, groups, resamples=5000)
    by_question = paired_difference(a, b, np.arange(200), resamples=5000)
    assert by_image.mean == by_question.mean
    assert (by_image.high - by_image.low) > 2.5 * (by_question.high - by_question.low)
    # the image-level width is that of a mean of 20 coin-like values: about 4 standard errors
    se = np.std(better) / np.sqrt(20)
    assert by_image.high - by_image.low == pytest.approx(3.92 * se, rel=0.15)


def test_mismatched_lengths_and_no_questions():
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0], ["i0", "i0"])
    assert paired_difference([], [], []).n_questions == 0
