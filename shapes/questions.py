"""Questions with well-defined answers about a ``shapes`` scene, and VQAv2-style human answers.

Question types: ``color`` ("what color is the circle?"), ``shape`` ("what shape is the red
object?"), ``count`` ("how many squares are there?"), ``position`` ("what color is the
leftmost shape?") and ``exists`` ("is there a blue diamond?"). A question is only asked when
its answer is unambiguous; ``referred`` names the objects the answer is about (their union is
the ground-truth mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from shapes.scene import COLORS, SHAPES, Scene, SceneObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITION_MARGIN = 0.08  # minimal centre gap, relative to the image side, between first and second
NUM_ANSWERS = 10
MIN_EXACT_ANSWERS = 4  # >= 4 of 10 exact answers: VQA accuracy of the true answer is 1.0
MAX_WRONG_ANSWERS = 3


@dataclass(frozen=True)
class Question:
    question_type: str
    text: str
    answer: str
    answer_type: str  # VQAv2 answer types: "yes/no", "number", "other"
    referred: tuple[int, ...]  # indices into scene.objects


def ask_questions(rng: np.random.Generator, scene: Scene, count: int) -> list[Question]:
    """Up to ``count`` distinct questions: a question type uniformly among those that still
    have candidates, then a candidate of that type (``exists``: "yes" or "no" first;
    ``count``: a present or an absent shape first)."""
    pools = _candidates(scene)
    chosen: list[Question] = []
    while len(chosen) < count:
        types = [t for t, groups in pools.items() if any(groups)]
        if not types:
            break
        groups = [g for g in pools[types[int(rng.integers(len(types)))]] if g]
        group = groups[int(rng.integers(len(groups)))]
        chosen.append(group.pop(int(rng.integers(len(group)))))
    return chosen


def human_answers(rng: np.random.Generator, answer: str) -> list[str]:
    """Ten answers as VQAv2 annotators give them: mostly ``answer``, some variants that the
    official evaluation maps back to it, a few plausible wrong ones; at least four exact copies."""
    wrong = min(int(rng.binomial(NUM_ANSWERS, 0.1)), MAX_WRONG_ANSWERS)
    variant = min(int(rng.binomial(NUM_ANSWERS - wrong, 0.2)), NUM_ANSWERS - wrong - MIN_EXACT_ANSWERS)
    spellings, alternatives = _variants(answer), _wrong_answers(answer)
    answers = [answer] * (NUM_ANSWERS - wrong - variant)
    answers += [spellings[int(rng.integers(len(spellings)))] for _ in range(variant)]
    answers += [alternatives[int(rng.integers(len(alternatives)))] for _ in range(wrong)]
    return [answers[i] for i in rng.permutation(NUM_ANSWERS)]


def _candidates(scene: Scene) -> dict[str, list[list[Question]]]:
    """Every askable question, by type; each type holds one or more groups."""
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    color_qs = [
        Question("color", f"what color is the {s}?", objs[shapes.index(s)].color, "other",
                 (shapes.index(s),))
        for s in SHAPES if shapes.count(s) == 1
    ]
    shape_qs = [
        Question("shape", f"what shape is the {c} object?", objs[colors.index(c)].shape, "other",
                 (colors.index(c),))
        for c in COLORS if colors.count(c) == 1
    ]
    count_qs = [
        Question("count", f"how many {s}s are there?", str(shapes.count(s)), "number",
                 tuple(i for i, o in enumerate(objs) if o.shape == s))
        for s in SHAPES
    ]
    count_present = [q for q in count_qs if q.answer != "0"]
    count_absent = [q for q in count_qs if q.answer == "0"]
    present = {(o.shape, o.color) for o in objs}
    exists_yes = [
        Question("exists", f"is there a {o.color} {o.shape}?", "yes", "yes/no", (i,))
        for i, o in enumerate(objs)
    ]
    exists_no = [  # absent pairs that share a shape or a colour with the scene
        Question("exists", f"is there a {c} {s}?", "no", "yes/no", ())
        for s in SHAPES for c in COLORS
        if (s, c) not in present and (s in shapes or c in colors)
    ]
    return {
        "color": [color_qs],
        "shape": [shape_qs],
        "count": [count_present, count_absent],
        "position": [_position_questions(scene)],
        "exists": [exists_yes, exists_no],
    }


def _position_questions(scene: Scene) -> list[Question]:
    size = scene.image.shape[0]
    # (text, order key on centres, extreme bbox edge that must also be strictly first, attribute)
    specs: list[tuple[str, Callable[[SceneObject], float], Callable[[SceneObject], float], str]] = [
        ("what color is the leftmost shape?", lambda o: o.center[0], lambda o: o.bbox[0], "color"),
        ("what color is the rightmost shape?", lambda o: -o.center[0], lambda o: -o.bbox[2], "color"),
        ("what shape is at the top?", lambda o: o.center[1], lambda o: o.bbox[1], "shape"),
        ("what shape is at the bottom?", lambda o: -o.center[1], lambda o: -o.bbox[3], "shape"),
    ]
    questions = []
    for text, centre_key, edge_key, attribute in specs:
        order = sorted(range(len(scene.objects)), key=lambda i: centre_key(scene.objects[i]))
        first, rest = scene.objects[order[0]], [scene.objects[i] for i in order[1:]]
        clear = all(
            centre_key(o) - centre_key(first) >= POSITION_MARGIN * size
            and edge_key(o) > edge_key(first)
            for o in rest
        )
        if clear:
            questions.append(Question("position", text, getattr(first, attribute), "other", (order[0],)))
    return questions


def _variants(answer: str) -> list[str]:
    """Other ways annotators typed ``answer`` that the official VQA evaluation still maps back
    to it: it only runs its punctuation rule on human answers (no lowercasing, no number words),
    and that rule drops a trailing period. (The lists keep their former lengths, two for
    numbers and three or four otherwise, so the random draws and every scene stay the same.)"""
    if answer.isdigit():
        return [f"{answer}.", f"{answer}."]
    return [f"{answer}."] * (4 if answer in SHAPES else 3)


def _wrong_answers(answer: str) -> list[str]:
    """Plausible wrong answers of the same kind."""
    if answer in COLORS:
        return [c for c in COLORS if c != answer]
    if answer in SHAPES:
        return [s for s in SHAPES if s != answer]
    if answer.isdigit():
        n = int(answer)
        return [str(n + 1)] if n == 0 else [str(n - 1), str(n + 1)]
    return ["no" if answer == "yes" else "yes"]
