"""(image, question) pairs for ITM training: positives and hard negatives.

Positive: a sample's own question on its own image, when it mentions (colour / shape words)
only things the scene has. A question about something the scene lacks ("is there a blue
diamond?" -> no; "how many squares are there?" -> 0) does not describe its image and reads
exactly like a swap negative; a question without colour or shape words ("what shape is at
the top?") fits every image, is never a negative, and would let the ITM learn that such
questions always match without looking at the image (a text-only shortcut a 4-layer ITM took
within 500 steps). Without scene facts (other sources) every sample is a positive. Negatives,
one per positive:

- swap: a colour or shape word of the question replaced so that the mentioned thing is absent
  from the scene (needs the ``scene`` JSON of the ``shapes`` source). Only questions whose own
  mention is present in the scene are swapped ("what color is the circle?" with a circle in the
  scene -> "what color is the square?" with no square); a question about something absent
  ("is there a blue diamond?" -> no) gets an other-image negative instead.
- other image: the question of a sample of another image whose answer differs and which
  mentions something this scene lacks (so it does not describe this image either; a question
  without colour or shape words, "what color is the leftmost shape?", fits every image).

Everything is drawn from the ``numpy`` generator passed in, so a step's pairs depend only on
that generator's seed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from shapes.scene import COLORS, SHAPES

OTHER_IMAGE_TRIES = 64
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class SceneFacts:
    """What a ``shapes`` scene holds: its shapes, colours and (shape, colour) pairs."""

    shapes: frozenset[str]
    colors: frozenset[str]
    pairs: frozenset[tuple[str, str]]

    @classmethod
    def from_json(cls, text: str | None) -> "SceneFacts | None":
        if not text:
            return None
        objects = json.loads(text).get("objects", [])
        pairs = frozenset((str(o["shape"]), str(o["color"])) for o in objects)
        return cls(frozenset(s for s, _ in pairs), frozenset(c for _, c in pairs), pairs)


@dataclass(frozen=True)
class Sample:
    """One training sample: ``image`` indexes the dataset's distinct images; ``cells`` (when
    the source has ground-truth masks and a grid was asked for) is the ``[g*g]`` float32
    fraction of each patch-grid cell covered by the objects the answer refers to."""

    image: int
    question: str
    answer: str
    scene: SceneFacts | None
    cells: np.ndarray | None = field(default=None, compare=False, repr=False)


def majority_answer(answers: Sequence[str] | None) -> str:
    """The most frequent answer (first seen wins a tie), lower-cased; '' when unknown."""
    if not answers:
        return ""
    return Counter(a.strip().lower() for a in answers).most_common(1)[0][0]  # ties: first seen


def _mentions(question: str) -> list[tuple[int, int, str, str]]:
    """``(start, end, kind, value)`` of each colour / shape word (plurals included)."""
    out = []
    for m in _WORD.finditer(question.lower()):
        word = m.group()
        if word in COLORS:
            out.append((m.start(), m.end(), "color", word))
        elif word in SHAPES or (word.endswith("s") and word[:-1] in SHAPES):
            out.append((m.start(), m.end(), "shape", word if word in SHAPES else word[:-1]))
    return out


def mentions_present(question: str, scene: SceneFacts | None) -> bool | None:
    """Whether what the question mentions is in the scene: ``True`` (all of it; a colour and a
    shape together as one object), ``False`` (something is absent), ``None`` (no colour or
    shape word, or no scene facts)."""
    if scene is None:
        return None
    mentions = _mentions(question)
    color = next((m[3] for m in mentions if m[2] == "color"), None)
    shape = next((m[3] for m in mentions if m[2] == "shape"), None)
    if color is None and shape is None:
        return None
    if color and shape:
        return (shape, color) in scene.pairs
    return shape in scene.shapes if shape else color in scene.colors


def is_positive(sample: Sample) -> bool:
    """Whether the sample's question describes its image (see the module docstring): with scene
    facts, only questions whose colour / shape words are all in the scene."""
    return sample.scene is None or mentions_present(sample.question, sample.scene) is True


def positive_indices(samples: Sequence[Sample]) -> list[int]:
    return [i for i, sample in enumerate(samples) if is_positive(sample)]


def swap_candidates(question: str, scene: SceneFacts | None) -> list[str]:
    """Every question made by replacing one colour or shape word so that what it mentions is
    absent from ``scene``; empty when the question mentions nothing or something absent."""
    if scene is None:
        return []
    mentions = _mentions(question)
    color = next((m for m in mentions if m[2] == "color"), None)
    shape = next((m for m in mentions if m[2] == "shape"), None)
    if color is None and shape is None:
        return []
    if color and shape:
        present = (shape[3], color[3]) in scene.pairs
    else:
        present = shape[3] in scene.shapes if shape else color[3] in scene.colors
    if not present:
        return []
    out = []
    for word in ([color] if color else []) + ([shape] if shape else []):
        start, end, kind, value = word
        options = COLORS if kind == "color" else SHAPES
        for other in options:
            if other == value:
                continue
            if color and shape:
                absent = ((shape[3], other) if kind == "color" else (other, color[3])) not in scene.pairs
            else:
                absent = other not in (scene.colors if kind == "color" else scene.shapes)
            if absent:
                plural = question[start:end].lower() != value
                text = other + ("s" if plural else "")
                out.append(question[:start] + text + question[end:])
    return out


def other_image_negative(index: int, samples: Sequence[Sample], rng: np.random.Generator) -> str:
    """The question of a random sample of another image whose answer differs (any other
    image's question when none is found in a few tries)."""
    me = samples[index]
    fallback = None
    for _ in range(OTHER_IMAGE_TRIES):
        other = samples[int(rng.integers(len(samples)))]
        if other.image == me.image:
            continue
        describes_me = me.scene is not None and mentions_present(other.question, me.scene) is not False
        if other.answer != me.answer and not describes_me:
            return other.question
        fallback = fallback or other.question
    if fallback is not None:
        return fallback
    for other in samples:  # tiny datasets: a deterministic scan
        if other.image != me.image:
            return other.question
    raise ValueError("other-image negatives need at least two images in the training data")


@dataclass(frozen=True)
class PairBatch:
    """``2B`` pairs: ``images[k]`` (dataset image index), ``questions[k]``, ``labels[k]`` (1 =
    match); positives first (``indices``: their samples), then their negatives in the same
    order; ``kinds`` of negatives."""

    indices: list[int]  # the positives' sample indices
    images: list[int]
    questions: list[str]
    labels: list[int]
    kinds: list[str]


def _pick_by_image(samples: Sequence[Sample], positives: Sequence[int], batch_size: int, per_image: int,
                   rng: np.random.Generator) -> np.ndarray:
    by_image: dict[int, list[int]] = {}
    for i in positives:
        by_image.setdefault(samples[i].image, []).append(i)
    images = sorted(by_image)
    count = min(len(images), -(-batch_size // per_image))
    picked: list[int] = []
    for image in rng.choice(len(images), size=count, replace=False):
        members = by_image[images[int(image)]]
        take = min(per_image, len(members), batch_size - len(picked))
        picked += [members[int(j)] for j in rng.choice(len(members), size=take, replace=False)]
    return np.asarray(picked)


def draw_pairs(samples: Sequence[Sample], batch_size: int, rng: np.random.Generator,
               swap_fraction: float = 0.5, per_image: int = 1, positives: Sequence[int] | None = None) -> PairBatch:
    """``batch_size`` positives (without replacement) and one negative each. ``per_image > 1``:
    ``ceil(batch_size / per_image)`` distinct images and up to ``per_image`` questions of each
    (every pair of a positive uses its image, so a step encodes fewer images). ``positives``:
    :func:`positive_indices` of ``samples``, when the caller keeps them between calls."""
    if positives is None:
        positives = positive_indices(samples)
    if per_image > 1:
        picked = _pick_by_image(samples, positives, batch_size, per_image, rng)
    else:
        picked = np.asarray(positives)[rng.choice(len(positives), size=min(batch_size, len(positives)),
                                                  replace=False)]
    negatives, kinds = [], []
    for i in picked:
        swaps = swap_candidates(samples[i].question, samples[i].scene)
        if swaps and rng.random() < swap_fraction:
            negatives.append(swaps[int(rng.integers(len(swaps)))])
            kinds.append("swap")
        else:
            negatives.append(other_image_negative(int(i), samples, rng))
            kinds.append("other_image")
    images = [samples[i].image for i in picked]
    return PairBatch(indices=[int(i) for i in picked], images=images + images,
                     questions=[samples[i].question for i in picked] + negatives, labels=[1] * len(picked) + [0] * len(picked), kinds=kinds)


def pair_rows(fused, rows):
    """``fused [U, 1+P, C]`` -> ``[R, 1+P, C]`` with row ``r = fused[rows[r]]``, as a one-hot
    matmul: the values are exact copies, and the backward pass (a sum per image) is
    deterministic, unlike the backward of ``fused[rows]`` (``index_put_`` with accumulation,
    whose multi-threaded CPU kernel adds the repeated rows in a varying order)."""
    import torch.nn.functional as F

    onehot = F.one_hot(rows, fused.shape[0]).to(fused.dtype)                 # [R, U]
    return (onehot @ fused.flatten(1)).view(rows.shape[0], *fused.shape[1:])
