"""The scenes and prompts ``runtime train sam`` trains and evaluates on (:mod:`training.sam`):
shapes scenes rendered on demand with their per-object masks and low-res targets
(:class:`ShapesScenes`), a point prompt on an object (:func:`sample_prompt`), one step's images
and prompt sets (:func:`draw_batch`) and the held-out prompts (:func:`eval_prompts`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from training.sam import SamSettings

EVAL_POINTS = (1, 3)      # foreground points of the held-out prompts


class Rendered(NamedTuple):
    image: np.ndarray      # uint8 [S, S, 3]
    masks: np.ndarray      # bool [O, S, S]
    targets: np.ndarray    # float32 0/1 [O, L, L]: the masks area-pooled to the low-res size, >= 0.5


class ShapesScenes:
    """Shapes scenes of one seed, rendered on demand (:func:`render_scene` is cheap and exact),
    with their per-object masks and low-res mask targets; ``keep=True`` keeps them in memory."""

    def __init__(self, params, count: int, low_res: int, keep: bool = False) -> None:
        self.params, self.count, self.low_res, self.keep = params, count, low_res, keep
        self._kept: dict[int, Rendered] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Rendered:
        from shapes.dataset import render_scene
        from grids import pool_to_grid

        i = int(i)
        if i in self._kept:
            return self._kept[i]
        scene = render_scene(self.params.seed, i, self.params)
        masks = np.stack([np.asarray(m) != 0 for m in scene.masks])
        targets = (pool_to_grid(masks, self.low_res) >= 0.5).astype(np.float32)
        out = Rendered(scene.image, masks, targets)
        if self.keep:
            self._kept[i] = out
        return out


def sample_prompt(rng: np.random.Generator, mask: np.ndarray, num_points: int, negative: bool,
                  pad_to: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_points`` foreground points (label 1) drawn uniformly from the pixels of ``mask``
    (bool ``[H, W]``), then one background point (label 0) off it when ``negative``; padded with
    (-1, -1) / label -1 to ``pad_to``. Returns points ``[pad_to, 2]`` float32 ``(x, y)`` pixel
    coordinates and labels ``[pad_to]`` int64."""
    points = np.full((pad_to, 2), -1.0, np.float32)
    labels = np.full(pad_to, -1, np.int64)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("cannot prompt an empty mask")
    pick = rng.integers(0, len(ys), size=num_points)
    points[:num_points, 0], points[:num_points, 1] = xs[pick], ys[pick]
    labels[:num_points] = 1
    if negative:
        ys0, xs0 = np.nonzero(~mask)
        if len(ys0):
            j = int(rng.integers(0, len(ys0)))
            points[num_points] = (xs0[j], ys0[j])
            labels[num_points] = 0
    return points, labels


class StepBatch(NamedTuple):
    images: np.ndarray     # [B] scene indices
    points: np.ndarray     # float32 [B, Q, N, 2]
    labels: np.ndarray     # int64 [B, Q, N]
    targets: np.ndarray    # float32 [B, Q, L, L]


def draw_batch(scenes: ShapesScenes, rng: np.random.Generator, s: SamSettings, pad_to: int) -> StepBatch:
    """One step's images and prompt sets, from ``rng`` alone."""
    images = rng.integers(0, len(scenes), size=s.batch_size)
    points, labels, targets = [], [], []
    for i in images:
        r = scenes[int(i)]
        n = len(r.masks)
        order = rng.permutation(n)
        objects = np.resize(order, s.prompts_per_image)
        rows = []
        for o in objects:
            k = int(rng.integers(1, s.max_points + 1))
            negative = bool(rng.random() < s.negative_fraction)
            rows.append(sample_prompt(rng, r.masks[o], k, negative, pad_to))
        points.append(np.stack([p for p, _ in rows]))
        labels.append(np.stack([lab for _, lab in rows]))
        targets.append(r.targets[objects])
    return StepBatch(images, np.stack(points), np.stack(labels), np.stack(targets))


class EvalPrompt(NamedTuple):
    image: int
    obj: int
    num_points: int
    points: np.ndarray
    labels: np.ndarray


def eval_prompts(scenes: ShapesScenes, rng: np.random.Generator, pad_to: int) -> list[EvalPrompt]:
    """For every object of every scene, a prompt of each of :data:`EVAL_POINTS` foreground points."""
    prompts = []
    for i in range(len(scenes)):
        r = scenes[i]
        for o in range(len(r.masks)):
            for k in EVAL_POINTS:
                pts, labs = sample_prompt(rng, r.masks[o], k, False, pad_to)
                prompts.append(EvalPrompt(i, o, k, pts, labs))
    return prompts
