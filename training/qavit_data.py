"""The shapes questions ``runtime train qavit`` trains and evaluates on (:mod:`training.qavit`):
image ``i`` of the ``shapes`` source and its questions rendered on demand exactly as the source
yields them (:func:`render_image`), so a large ``--num-images`` costs nothing up front; the
images of a step (:func:`draw_step`); a batch of questions with their pixels (preprocessed as
``preprocess_image`` family ``clip`` does), answers and referred cells (:func:`make_batch`);
the held-out set (:func:`eval_set`)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple, Sequence

import numpy as np


def _answers() -> tuple[str, ...]:
    from shapes.scene import COLORS, SHAPES

    return (*COLORS, *SHAPES, "0", "1", "2", "3", "4", "yes", "no")


ANSWERS = _answers()  # every answer of a shapes question (at most 4 objects: counts 0-4)


class Rendered(NamedTuple):
    """One shapes image as the source yields it: ``image uint8 [S, S, 3]``, its questions
    (``shapes.questions.Question``) and the ``gt_mask`` of each (``None`` when
    the question refers to no object)."""

    image: np.ndarray
    questions: list
    masks: list
    scene: dict | None = None


def shapes_params(seed: int, num_images: int, questions_per_image: int, extra: dict[str, Any]):
    from shapes.dataset import ShapesParams

    return ShapesParams(**{**extra, "seed": seed, "num_images": num_images, "questions_per_image": questions_per_image})


def render_image(params, index: int) -> Rendered:
    """Image ``index`` of the shapes source ``params`` and its questions, exactly as
    ``ShapesSource.iter_samples`` yields them (same generator, same order of draws)."""
    from shapes.questions import ask_questions
    from shapes.scene import draw_scene

    rng = np.random.default_rng([params.seed, index])
    scene = draw_scene(rng, params.image_size, params.min_shapes, params.max_shapes, params.textured_fraction)
    questions = ask_questions(rng, scene, params.questions_per_image)
    masks = [np.maximum.reduce([scene.masks[i] for i in q.referred]) if q.referred else None for q in questions]
    return Rendered(scene.image, questions, masks, json.loads(scene.to_json()))


def clip_pixels(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """``preprocess_image`` family ``clip`` at ``size``: PIL bicubic resize to a square, [0, 1],
    CLIP mean / std -> ``[B, 3, S, S]`` float32 (the same float32 operations as the stage)."""
    from PIL import Image

    from models.qavit.config import CLIP_MEAN, CLIP_STD

    resized = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                        for im in images])
    x = resized.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class Batch(NamedTuple):
    """Rows = questions. ``pixels [U, 3, S, S]`` of the unique images, ``image_rows [B]``,
    ``questions``, ``types``, ``answers [B]`` (indices into :data:`ANSWERS`), ``cells [B, P]``
    (fraction of each model-grid cell the referred objects cover; zeros when none),
    ``grounded [B]`` (the question refers to objects), ``masks`` (the ``gt_mask`` of each row),
    ``scenes`` (the scene of each unique image)."""

    pixels: np.ndarray
    image_rows: np.ndarray
    questions: list[str]
    types: list[str]
    answers: np.ndarray
    cells: np.ndarray
    grounded: np.ndarray
    masks: list
    scenes: list


def make_batch(rendered: Sequence[Rendered], image_size: int, grid: int) -> Batch:
    from grids import pool_to_grid

    rows, questions, types, answers, cells, grounded, masks = [], [], [], [], [], [], []
    for u, r in enumerate(rendered):
        for q, mask in zip(r.questions, r.masks):
            rows.append(u)
            questions.append(q.text)
            types.append(q.question_type)
            answers.append(ANSWERS.index(q.answer))
            grounded.append(mask is not None)
            cells.append(np.zeros(grid * grid, np.float32) if mask is None
                         else pool_to_grid(mask[None], grid).reshape(-1))
            masks.append(mask)
    return Batch(clip_pixels([r.image for r in rendered], image_size), np.asarray(rows, np.int64), questions, types,
                 np.asarray(answers, np.int64), np.stack(cells).astype(np.float32), np.asarray(grounded, bool), masks,
                 [r.scene for r in rendered])


def draw_step(params, rng: np.random.Generator, images: int) -> list[int]:
    """The image indices of a step: ``images`` distinct indices (with repeats only when the source
    has fewer) from ``rng`` (the loop's ``default_rng([seed, step])``)."""
    return [int(i) for i in rng.choice(params.num_images, size=images, replace=params.num_images < images)]


class EvalSet(NamedTuple):
    params: Any
    rendered: list[Rendered]


def eval_set(seed: int, num_images: int, questions_per_image: int = 4, extra: dict[str, Any] | None = None) -> EvalSet:
    params = shapes_params(seed, num_images, questions_per_image, extra or {})
    return EvalSet(params, [render_image(params, i) for i in range(num_images)])
