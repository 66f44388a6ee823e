"""The training-only patch probe: colour and shape classes per ViT patch from the shapes
scenes, and the probe's loss. A linear probe on the patch tokens gives a ViT trained from
scratch the dense signal that pre-training gives a published one (docs/training.md)."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from shapes.captions import object_coverage
from shapes.scene import COLORS, SHAPES

CLASSES = len(COLORS) + 1 + len(SHAPES) + 1  # background + colours, background + shapes


def build_probe(width: int):
    """The linear probe ``width -> CLASSES`` (colour logits first, then shape logits)."""
    import torch

    return torch.nn.Linear(width, CLASSES)


class PatchLabels:
    """Per-patch colour and shape classes of the dataset's images (0 = background; an object
    labels the patches its bounding box covers at least half of; the most covered wins).
    ``scenes``: one shapes scene per image (dict or its JSON; empty / None: no objects)."""

    def __init__(self, scenes, grid: int) -> None:
        self.scenes, self.grid = scenes, grid
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            colour = np.zeros(self.grid * self.grid, np.int64)
            shape = np.zeros_like(colour)
            if self.scenes[i]:
                scene = self.scenes[i]
                scene = json.loads(scene) if isinstance(scene, str) else scene
                cover = object_coverage(scene, self.grid)                          # [O, P]
                if len(cover):
                    best, frac = cover.argmax(axis=0), cover.max(axis=0)
                    on = frac >= 0.5
                    objects = scene["objects"]
                    colour[on] = [1 + list(COLORS).index(objects[o]["color"]) for o in best[on]]
                    shape[on] = [1 + SHAPES.index(objects[o]["shape"]) for o in best[on]]
            self._cache[i] = (colour, shape)
        return self._cache[i]

    def __call__(self, images: Sequence[int], device):
        """``colour``, ``shape`` ``[U, P]`` long of the images ``images``."""
        import torch

        pairs = [self._labels(int(i)) for i in images]
        return (torch.from_numpy(np.stack([c for c, _ in pairs])).to(device),
                torch.from_numpy(np.stack([h for _, h in pairs])).to(device))


def patch_label_loss(logits, colour, shape, object_weight: float = 1.0):
    """Colour + shape cross-entropy of the patch probe: logits ``[N, 7 + 5]`` (background and
    the colours, then background and the shapes), labels ``[N]`` (0 = background). Each patch
    an object labels weighs ``object_weight`` times a background patch (1: plain means)."""
    import torch.nn.functional as F

    n_colour = len(COLORS) + 1
    if object_weight == 1.0:
        return F.cross_entropy(logits[:, :n_colour], colour) + F.cross_entropy(logits[:, n_colour:], shape)
    weight = 1.0 + (object_weight - 1.0) * (colour > 0).to(logits.dtype)
    per_patch = (F.cross_entropy(logits[:, :n_colour], colour, reduction="none")
                 + F.cross_entropy(logits[:, n_colour:], shape, reduction="none"))
    return (weight * per_patch).sum() / weight.sum()
