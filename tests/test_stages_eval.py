"""vqa_eval: the official answer normalisation and the leave-one-out VQA accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from stages.base import Batch
from stages.evaluation import CONTRACTIONS, VQAEval, normalize_answer, vqa_accuracy


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"),
    ("ten dogs", "10 dogs"),
    ("none", "0"),
    ("The dog", "dog"),
    ("a an the cat", "cat"),
    ("yes.", "yes"),
    ("3.5", "3.5"),          # a period before a digit stays
    ("it's", "it's"),        # apostrophes are not punctuation
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("whats that", "what's that"),
    ("black/white", "black white"),   # a mark between letters becomes a space
    ("hot - dog", "hot dog"),         # a mark touching a space is deleted
    ("1,000", "1000"),                # a comma between digits deletes every mark
    ("yes!", "yes"),
    ("  Red\tand\nblue  ", "red and blue"),
    ("(left)", "left"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["yall'd've"] == "y'all'd've" and CONTRACTIONS["somebody'd"] == "somebodyd"


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),   # 9 subsets with it: 1/3; 1 without: 0
    (2, 0.6),   # 8 subsets with both: 2/3; 2 with one: 1/3 -> (8 * 2/3 + 2 * 1/3) / 10
    (3, 0.9),   # 7 subsets with 3: 1; 3 with 2: 2/3
    (4, 1.0),
    (10, 1.0),
])
def test_leave_one_out_accuracy(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_accuracy_normalises_both_sides():
    assert vqa_accuracy("The dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("yes", []) is None


def make_batch(predictions, answers, valid) -> Batch:
    return Batch(columns={"prediction": predictions, "answers": answers},
                 validity={"prediction": np.ones(len(predictions), bool),
                           "answers": np.array(valid)},
                 row_ids=[f"q{i}" for i in range(len(predictions))])


def test_stage_vqa_metric():
    batch = make_batch(["Two", "yes", "no"], [["2"] * 2 + ["3"] * 8, None, []], [True, False, True])
    out = VQAEval(VQAEval.Params()).process(batch)
    assert out["accuracy"][0] == pytest.approx(0.6)
    assert out["accuracy"][1:] == [None, None]
    assert out["normalized"] == ["2", "yes", "no"]


def test_stage_gqa_exact_match():
    batch = make_batch(["The Dog", "cat", "two"], [["dog"], ["dog"], ["2", "3"]], [True] * 3)
    out = VQAEval(VQAEval.Params(metric="gqa")).process(batch)
    assert out["accuracy"] == [1.0, 0.0, 1.0]


def test_stage_without_answers_column():
    batch = Batch(columns={"prediction": ["A cat"]}, validity={"prediction": np.ones(1, bool)},
                  row_ids=["q"])
    assert VQAEval(VQAEval.Params()).process(batch) == {"accuracy": [None], "normalized": ["cat"]}
