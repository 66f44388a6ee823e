"""Synthetic scenes for the ``shapes`` dataset: flat-coloured shapes on a light background.

Every object is drawn by filling its exact mask (OpenCV, no anti-aliasing), so the mask of
an object is exactly the set of pixels that carry its colour. Objects never overlap and each
has a distinct (shape, colour) pair. All randomness comes from the generator passed in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {  # RGB, far apart from each other and from pale tones
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
PALE_TONES = ((236, 236, 236), (245, 240, 225), (225, 235, 245), (235, 245, 230), (245, 230, 235))
TEXTURES = ("noise", "stripes", "checker")
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.12, 0.25  # object extent relative to the image side
PLACEMENT_TRIES = 1000


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``center`` is ``[x, y]``; ``bbox`` is ``[x0, y0, x1, y1]`` of its
    mask with exclusive ends; ``size`` is the side of the square the shape is drawn in."""

    shape: str
    color: str
    center: tuple[int, int]
    size: int
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """``image`` is ``uint8 [S, S, 3]`` RGB; ``masks[i]`` is the ``uint8 [S, S]`` 0/1 mask of
    ``objects[i]``; ``background`` is ``"plain"`` or a texture name."""

    image: np.ndarray
    objects: list[SceneObject]
    masks: list[np.ndarray]
    background: str

    def to_json(self) -> str:
        return json.dumps({
            "image_size": int(self.image.shape[0]),
            "background": self.background,
            "objects": [asdict(o) for o in self.objects],
        })


def draw_scene(
    rng: np.random.Generator, image_size: int, min_shapes: int, max_shapes: int,
    textured_fraction: float,
) -> Scene:
    """Draw ``min_shapes..max_shapes`` non-overlapping objects on a plain or textured background."""
    textured = rng.random() < textured_fraction
    background = str(rng.choice(TEXTURES)) if textured else "plain"
    image = _background(rng, image_size, background)
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    count = int(rng.integers(min_shapes, max_shapes + 1))
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=count, replace=False)]
    placed: list[tuple[float, float, float]] = []  # (x, y, bounding radius)
    objects, masks = [], []
    for shape, color in chosen:
        low, high = round(MIN_SIZE_FRACTION * image_size), round(MAX_SIZE_FRACTION * image_size)
        size = int(rng.integers(low, high + 1))
        center = _place(rng, image_size, size, placed)
        mask = np.zeros((image_size, image_size), np.uint8)
        _fill(mask, shape, center, size)
        image[mask.astype(bool)] = COLORS[color]
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SceneObject(shape, color, center, size, bbox))
        masks.append(mask)
    return Scene(image, objects, masks, background)


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    tone = np.array(PALE_TONES[int(rng.integers(len(PALE_TONES)))], np.int16)
    if kind == "plain":
        return np.broadcast_to(tone, (size, size, 3)).astype(np.uint8)
    if kind == "noise":
        noise = rng.integers(-18, 19, size=(size, size, 1), dtype=np.int16)
        return np.clip(tone + noise, 190, 255).astype(np.uint8)
    other = np.clip(tone - 22, 190, 255)
    period = int(rng.integers(max(4, size // 32), max(5, size // 8) + 1))
    ys, xs = np.mgrid[:size, :size]
    if kind == "stripes":
        direction = int(rng.integers(3))  # horizontal, vertical, diagonal
        coord = (ys, xs, xs + ys)[direction]
        second = (coord // period) % 2 == 1
    else:  # checker
        second = ((ys // period) + (xs // period)) % 2 == 1
    return np.where(second[..., None], other, tone).astype(np.uint8)


def _place(
    rng: np.random.Generator, image_size: int, size: int, placed: list[tuple[float, float, float]],
) -> tuple[int, int]:
    """A centre that keeps the object inside the image and clear of the placed ones."""
    half = size // 2
    radius = half * np.sqrt(2.0)  # circumradius of the square the shape is drawn in
    gap = max(2, image_size // 64)
    low, high = half + gap, image_size - 1 - half - gap
    for _ in range(PLACEMENT_TRIES):
        x, y = (int(v) for v in rng.integers(low, high + 1, size=2))
        if all(np.hypot(x - px, y - py) >= radius + pr + gap for px, py, pr in placed):
            placed.append((x, y, radius))
            return x, y
    raise RuntimeError(f"could not place {len(placed) + 1} shapes in a {image_size}px image")


def _fill(mask: np.ndarray, shape: str, center: tuple[int, int], size: int) -> None:
    """Set the pixels of ``shape`` in ``mask`` to 1 (8-connected, no anti-aliasing)."""
    x, y = center
    h = size // 2
    if shape == "circle":
        cv2.circle(mask, (x, y), h, 1, thickness=-1, lineType=cv2.LINE_8)
        return
    corners = {
        "square": [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)],
        "triangle": [(x, y - h), (x + h, y + h), (x - h, y + h)],
        "diamond": [(x, y - h), (x + h, y), (x, y + h), (x - h, y)],
    }[shape]
    cv2.fillPoly(mask, [np.array(corners, np.int32)], 1, lineType=cv2.LINE_8)
