"""The difference in accuracy of two runs over the same questions, with a 95% interval and a
p-value that treat the questions of one image as one unit: the questions of an image share its
picture, its caption and its heatmaps, so they are right or wrong together more often than
independent questions would be, and counting them as independent would make intervals too narrow.

numpy only; every draw comes from one ``numpy.random.default_rng(seed)``, so a result is
reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

EXACT_UP_TO = 12           # images up to which the permutation test enumerates every sign flip (4096)
CELLS_PER_BLOCK = 4_000_000  # resamples x images held in memory at once


@dataclass(frozen=True)
class Difference:
    """``b - a`` in mean accuracy (fractions, not points) over ``n_questions`` questions of
    ``n_images`` images; ``low``, ``high``: the 95% percentile interval of a paired bootstrap
    over images; ``p_value``: two-sided, of a paired sign-flip permutation test over images,
    ``p_method`` saying whether it enumerated every flip or drew them."""
    mean: float
    low: float
    high: float
    p_value: float
    n_questions: int
    n_images: int
    p_method: str


def per_image(a: Sequence[float], b: Sequence[float], groups: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(summed difference b - a, questions)`` per image, the images in sorted order."""
    if not len(a) == len(b) == len(groups):
        raise ValueError(f"a, b and groups must have one value per question: {len(a)}, {len(b)}, {len(groups)}")
    diff = np.asarray(b, float) - np.asarray(a, float)
    _, image = np.unique(np.asarray(groups, object).astype(str), return_inverse=True)
    image = image.ravel()
    return np.bincount(image, diff), np.bincount(image).astype(float)


def bootstrap_interval(sums: np.ndarray, counts: np.ndarray, resamples: int,
                       rng: np.random.Generator) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the mean difference over ``resamples`` draws of as many
    images as there are, with replacement (each draw's mean: its questions' summed difference
    over its questions)."""
    n = len(sums)
    block = max(1, CELLS_PER_BLOCK // n)
    means = []
    for start in range(0, resamples, block):
        drawn = rng.integers(0, n, (min(block, resamples - start), n))  # one row of image indices per resample
        means.append(sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(low), float(high)


def sign_flip_p_value(sums: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, str]:
    """Two-sided p-value of the paired sign-flip test: under "no difference" each image's summed
    difference is as likely negated, so the observed |total| is compared with the |total| of
    every sign flip (exact, up to ``EXACT_UP_TO`` images) or of ``resamples`` random flips (the
    observed one counted among them, so p is never 0)."""
    n = len(sums)
    observed = abs(sums.sum()) - 1e-9 * (1 + np.abs(sums).sum())  # float sums of equal totals may differ in the last bit
    if n <= EXACT_UP_TO:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ sums) >= observed)), f"exact, all {2 ** n} sign flips"
    hits = 0
    block = max(1, CELLS_PER_BLOCK // n)
    for start in range(0, resamples, block):
        signs = 2.0 * rng.integers(0, 2, (min(block, resamples - start), n), dtype=np.int8) - 1
        hits += int(np.sum(np.abs(signs @ sums) >= observed))
    return (hits + 1) / (resamples + 1), f"{resamples} random sign flips"


def paired_difference(a: Sequence[float], b: Sequence[float], groups: Sequence, *, resamples: int = 10000,
                      seed: int = 0) -> Difference:
    """The accuracy difference ``b - a`` of two runs over the same questions: ``a``, ``b`` their
    per-question accuracies in [0, 1], ``groups`` the image of each question. The 95% interval is
    the percentile interval of a cluster bootstrap (``resamples`` draws of images with
    replacement, each with all its questions); the p-value is that of a sign-flip permutation
    test over images (not of the bootstrap): exact up to ``EXACT_UP_TO`` images, else from
    ``resamples`` random flips. Both draw from ``default_rng(seed)``."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    sums, counts = per_image(a, b, groups)
    if not len(sums):
        nan = float("nan")
        return Difference(nan, nan, nan, nan, 0, 0, "no questions")
    rng = np.random.default_rng(seed)
    low, high = bootstrap_interval(sums, counts, resamples, rng)
    p, method = sign_flip_p_value(sums, resamples, rng)
    return Difference(float(sums.sum() / counts.sum()), low, high, p, int(counts.sum()), len(sums), method)
