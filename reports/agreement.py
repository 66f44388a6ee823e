"""Rank agreement between two scores: Spearman's rho with tied values given their average rank.

Used by the quality report to say how far a score computed without masks (heatmap
faithfulness) orders samples and variants as the mask-based scores do.
"""

from __future__ import annotations

import math
from typing import Sequence


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values``; a run of equal values shares the mean of the ranks it spans
    ([10, 20, 20, 5] -> [2, 3.5, 3.5, 1])."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Spearman's rho of the pairs where both values are numbers: the Pearson correlation of
    their average ranks. None with fewer than 3 pairs or when either side is constant (no order)."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y, strict=True)
             if a is not None and b is not None and not math.isnan(a) and not math.isnan(b)]
    if len(pairs) < 3:
        return None
    rx, ry = average_ranks([a for a, _ in pairs]), average_ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)
