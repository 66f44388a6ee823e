"""Captions of the shapes scenes: which objects a set of patches shows, and the caption that
names them (what the captioner is trained to say, and what the FiD T5 is trained to read)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from grids import pool_to_grid
from shapes.scene import COLORS, SHAPES

PROMPT = "a picture of "
MIN_OVERLAP = 0.1  # share of a patch an object must cover to count as visible in it


def object_coverage(scene: Mapping[str, Any] | str, grid: int, image_size: int | None = None,
                    masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """``[O, grid * grid]`` float: the share of each patch (row-major, CLS excluded) covered by
    each object of ``scene`` (exact area; from ``masks`` when given, else from the bboxes)."""
    scene = json.loads(scene) if isinstance(scene, str) else scene
    objects = scene.get("objects", [])
    size = int(image_size if image_size is not None else scene["image_size"])
    if not objects:
        return np.zeros((0, grid * grid), np.float32)
    if masks is not None:
        stack = np.stack([np.asarray(m) != 0 for m in masks])
        if stack.shape != (len(objects), size, size):
            raise ValueError(f"masks must be [{len(objects)}, {size}, {size}], got {stack.shape}")
    else:
        stack = np.zeros((len(objects), size, size), bool)
        for i, o in enumerate(objects):
            x0, y0, x1, y1 = (int(v) for v in o["bbox"])
            stack[i, max(0, y0):min(size, y1), max(0, x0):min(size, x1)] = True
    return pool_to_grid(stack, grid).reshape(len(objects), grid * grid)


def visible_objects(scene: Mapping[str, Any] | str, patch_indices: Sequence[int], grid: int,
                    image_size: int | None = None, *, masks: Sequence[np.ndarray] | None = None,
                    min_overlap: float = MIN_OVERLAP, coverage: np.ndarray | None = None) -> list[tuple[str, str]]:
    """``(color, shape)`` of the objects covering at least ``min_overlap`` of some patch of
    ``patch_indices``, left to right (by centre x, then y, then name)."""
    scene = json.loads(scene) if isinstance(scene, str) else scene
    objects = scene.get("objects", [])
    if coverage is None:
        coverage = object_coverage(scene, grid, image_size, masks)
    index = np.asarray(list(patch_indices), dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= grid * grid):
        raise ValueError(f"patch indices must be in [0, {grid * grid}), got {index.min()}..{index.max()}")
    seen = [i for i in range(len(objects)) if index.size and float(coverage[i, index].max()) >= min_overlap]
    seen.sort(key=lambda i: (objects[i]["center"][0], objects[i]["center"][1], objects[i]["color"],
                             objects[i]["shape"]))
    return [(str(objects[i]["color"]), str(objects[i]["shape"])) for i in seen]


def caption_for_patches(scene: Mapping[str, Any] | str, patch_indices: Sequence[int], grid: int,
                        image_size: int | None = None, *, masks: Sequence[np.ndarray] | None = None,
                        min_overlap: float = MIN_OVERLAP, coverage: np.ndarray | None = None) -> str:
    """The target caption of a patch subset: the objects visible in it, left to right.

    ``scene``: the shapes scene (dict or its JSON: ``image_size``, ``background``, ``objects``
    with ``shape``, ``color``, ``center [x, y]``, ``bbox [x0, y0, x1, y1]`` exclusive ends);
    ``patch_indices``: cells of the ``grid x grid`` patch grid, row-major (the ViT token index
    minus 1); ``image_size``: side of the scene's pixel frame (default ``scene["image_size"]``).
    Patch ``(r, c)`` spans pixels ``[c, c + 1) * image_size / grid`` horizontally, likewise
    vertically. An object is visible when its mask (``masks``, one ``[S, S]`` array per object)
    or, without masks, its bbox covers at least ``min_overlap`` of one sampled patch. Objects
    are ordered by centre x (then y). Returns ``"a picture of a red circle and an orange square"``,
    or ``"a picture of a plain background"`` / ``"a picture of a textured background"`` when
    no object is visible (textured = any background other than ``plain``). Pure function.
    """
    scene = json.loads(scene) if isinstance(scene, str) else scene
    seen = visible_objects(scene, patch_indices, grid, image_size, masks=masks, min_overlap=min_overlap,
                           coverage=coverage)
    if seen:
        return PROMPT + " and ".join(f"{_article(color)} {color} {shape}" for color, shape in seen)
    plain = scene.get("background", "plain") == "plain"
    return PROMPT + ("a plain background" if plain else "a textured background")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def mentioned_objects(text: str) -> list[tuple[str, str]]:
    """``(color, shape)`` pairs named in a caption (a colour word directly before a shape word)."""
    words = text.lower().replace(",", " ").split()
    return [(w, n) for w, n in zip(words, words[1:]) if w in COLORS and n in SHAPES]
