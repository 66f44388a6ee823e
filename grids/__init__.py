"""Batched numpy operations on heatmap grids: exact area pooling, Gaussian blur, min-max,
patch sampling.

All functions take a batch of maps ``[N, h, w]`` and work on every map at once. Below the
stages: the synthetic ``shapes`` data pools its masks to grids with them too.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def cell_weights(n: int, g: int) -> np.ndarray:
    """``[g, n]``: the share of each of ``g`` equal cells covered by each of ``n`` unit pixels.

    Cell ``i`` spans ``[i * n / g, (i + 1) * n / g)``; each row sums to 1, so
    ``cell_weights(H, g) @ m @ cell_weights(W, g).T`` is the exact area average of ``m``.
    """
    edges = np.arange(g + 1) * n / g
    pixels = np.arange(n + 1)
    lo = np.maximum(edges[:-1, None], pixels[None, :-1])
    hi = np.minimum(edges[1:, None], pixels[None, 1:])
    return np.clip(hi - lo, 0.0, None) * (g / n)


def pool_to_grid(masks: np.ndarray, g: int) -> np.ndarray:
    """``[N, H, W]`` masks (nonzero = on) -> ``[N, g, g]`` float32 fraction of each cell on."""
    n, h, w = masks.shape
    rows = cell_weights(h, g).astype(np.float32)
    cols = cell_weights(w, g).astype(np.float32)
    # columns first as one [N*H, W] @ [W, g] product (a single BLAS call), then the small rows
    narrow = ((masks != 0).astype(np.float32).reshape(n * h, w) @ cols.T).reshape(n, h, g)
    return rows @ narrow


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of radius ``ceil(3 sigma)`` (cv2's kernel for that size)."""
    radius = math.ceil(3 * sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[N, h, w]`` maps in float64; ``sigma`` 0 = no blur.

    Outside the map counts as zero (cv2's BORDER_CONSTANT): a reflecting border would count
    an object at the image edge twice, and the blurred peak could land on an empty edge cell
    beside it. A single map matches ``cv2.GaussianBlur(m, (2r+1, 2r+1), sigma,
    borderType=cv2.BORDER_CONSTANT)`` with ``r = ceil(3 sigma)``.
    """
    out = np.asarray(maps, dtype=np.float64)
    if sigma == 0:
        return out.copy()
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="constant")
        out = sliding_window_view(padded, len(kernel), axis=axis) @ kernel
    return out


def minmax(maps: np.ndarray) -> np.ndarray:
    """Rescale each of ``[N, h, w]`` maps to [0, 1] in float64; a constant map becomes zeros."""
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(len(maps), -1)
    lo = flat.min(axis=1)[:, None, None]
    span = flat.max(axis=1)[:, None, None] - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0)


def sample_patch_sets(weights: np.ndarray, rngs: list[np.random.Generator], num_sets: int, k: int) -> np.ndarray:
    """``[N, cells]`` weights -> ``[N, num_sets, k]`` sorted cell indices, each set drawn without
    replacement with probability proportional to the weights (Gumbel-top-k), row ``i`` from
    ``rngs[i]`` only. Negative / non-finite weights count as 0; zero cells come only after every
    positive one (an all-zero row is uniform). Requires ``k <= cells``.
    """
    n, cells = weights.shape
    w = np.asarray(weights, dtype=np.float64)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    # zero-weight cells sit far below every positive cell (Gumbel noise stays within about +-40)
    log_w = np.where(w > 0, np.log(np.where(w > 0, w, 1.0)), -1e6)
    noise = np.stack([rng.gumbel(size=(num_sets, cells)) for rng in rngs]) if n else np.zeros((0, num_sets, cells))
    keys = log_w[:, None, :] + noise
    best = np.argpartition(-keys, k - 1, axis=-1)[..., :k]
    return np.sort(best, axis=-1)
