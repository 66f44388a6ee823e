"""The questions and captions ``runtime train fid`` trains and evaluates on (:mod:`training.fid`):
the questions of a ``shapes`` source with their images' per-patch object coverage
(:class:`QAData`), the answer a question is taught (:func:`target_answer`), and the captions of a
sample drawn by the recipe (:class:`Recipe`, :func:`draw_captions`; described in
:mod:`training.fid`'s docstring) as FiD passages (:func:`sample_passages`)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

_WORD = re.compile(r"[a-z]+")


@dataclass(kw_only=True)
class Recipe:
    """How the captions of a sample are drawn (see the module docstring); part of the settings."""

    num_captions: int = 5
    num_patches: int = 20
    max_rounds: int = 10
    uniform_fraction: float = 0.15
    spread_min: float = 0.002
    spread_max: float = 1.0
    min_overlap: float = 0.1  # shapes.captions.MIN_OVERLAP


@dataclass(frozen=True)
class QASample:
    """A question of image ``image``: ``focus [cells]`` float32 (None = no focus), ``target``
    the answer the model is taught, ``answers`` the ten human answers."""

    image: int
    question: str
    question_type: str
    answers: tuple[str, ...]
    target: str
    focus: np.ndarray | None = field(compare=False, repr=False)


def target_answer(answers: Sequence[str]) -> str:
    """The most frequent VQA-normalised answer (the first seen wins a tie); '' when none."""
    from stages.evaluation import normalize_answer

    if not answers:
        return ""
    return Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]


def named_objects(question: str, scene: dict[str, Any]) -> list[int]:
    """Indices of the scene's objects whose colour or shape (plural too) the question names."""
    words = set(_WORD.findall(question.lower()))
    words |= {w[:-1] for w in words if w.endswith("s")}
    return [i for i, o in enumerate(scene.get("objects", [])) if o["color"] in words or o["shape"] in words]


class QAData:
    """The questions of a ``shapes`` source with their images' per-patch object coverage on a
    ``grid`` x ``grid`` patch grid (the caption stage's is 24: ``training.fid.GRID``)."""

    def __init__(self, params, grid: int) -> None:
        from shapes.captions import object_coverage
        from shapes.dataset import iter_samples, render_scene
        from grids import pool_to_grid

        self.grid, self.params = grid, params
        self.scenes: list[dict[str, Any]] = []
        self.coverage: list[np.ndarray] = []
        self.samples: list[QASample] = []
        self.captions: dict[tuple, str] = {}  # (image, min_overlap, visible objects) -> caption
        index: dict[str, int] = {}
        for record in iter_samples(params):
            image_id = record["image_id"]
            if image_id not in index:
                index[image_id] = len(self.scenes)
                scene = render_scene(params.seed, int(image_id.rsplit("-", 1)[1]), params)
                scene_dict = json.loads(scene.to_json())
                if scene_dict != json.loads(record["scene"]):
                    raise RuntimeError(f"shapes image {image_id} renders differently from its source record")
                self.scenes.append(scene_dict)
                self.coverage.append(object_coverage(scene_dict, grid, masks=scene.masks))
            i = index[image_id]
            if record.get("gt_mask") is not None:
                focus = pool_to_grid(np.asarray(record["gt_mask"])[None], grid)[0].reshape(-1)
            else:
                named = named_objects(record["question"], self.scenes[i])
                focus = np.minimum(1.0, self.coverage[i][named].sum(axis=0)) if named else None
            if focus is not None and not focus.max() > 0:
                focus = None
            answers = tuple(record["answers"] or ())
            self.samples.append(QASample(i, record["question"], record.get("question_type") or "", answers,
                                         target_answer(answers),
                                         None if focus is None else focus.astype(np.float32)))

    def __len__(self) -> int:
        return len(self.samples)


def heatmap_weights(focus: np.ndarray | None, cells: int, rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    """``[cells]`` sampling weights of a question (always draws two numbers from ``rng``)."""
    uniform = rng.random() < recipe.uniform_fraction
    spread = math.exp(rng.uniform(math.log(recipe.spread_min), math.log(recipe.spread_max)))
    if focus is None or uniform:
        return np.ones(cells)
    return focus.astype(np.float64) + spread


def draw_captions(data: QAData, sample: QASample, rng: np.random.Generator, recipe: Recipe) -> list[str]:
    """The captions of ``sample`` as the ``caption`` stage would keep them (prompt stripped)."""
    from grids import sample_patch_sets
    from shapes.captions import PROMPT, caption_for_patches

    cells = data.grid * data.grid
    weights = heatmap_weights(sample.focus, cells, rng, recipe)[None]
    scene, coverage = data.scenes[sample.image], data.coverage[sample.image]
    visible = coverage >= recipe.min_overlap  # [O, cells]: the caption depends only on the visible set
    kept: list[str] = []
    for _ in range(recipe.max_rounds):
        for patches in sample_patch_sets(weights, [rng], recipe.num_captions, recipe.num_patches)[0]:
            key = (sample.image, recipe.min_overlap, visible[:, patches].any(axis=1).tobytes())
            text = data.captions.get(key)
            if text is None:
                text = data.captions[key] = caption_for_patches(
                    scene, patches, data.grid, min_overlap=recipe.min_overlap, coverage=coverage)[len(PROMPT):]
            if len(kept) < recipe.num_captions and not any(text in k for k in kept):
                kept.append(text)
        if len(kept) >= recipe.num_captions:
            break
    return kept


def sample_passages(data: QAData, sample: QASample, rng: np.random.Generator, recipe: Recipe) -> list[str]:
    """The FiD passages of a sample: one caption each (``num_captions_fid=1``), as the graphs use."""
    from models.fid_t5 import make_passages

    return make_passages(sample.question, draw_captions(data, sample, rng, recipe), 1)
