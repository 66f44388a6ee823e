"""Answer evaluation: the official VQA answer normalisation and accuracy (VQAv2, OK-VQA, GQA).

The tables and the punctuation rules follow the official VQA evaluation script (vqaEval.py),
including its quirks, so accuracies are comparable with published numbers.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field

from stages.base import Batch, Input, Output, Resources, Stage, StageParams
from stages.common import optional_column

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!"]
# Verbatim from the official script: "(?!<=" is a lookahead typo, kept for identical results.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    # A mark touching a space (or any text with a comma between digits) is deleted;
    # otherwise it becomes a space, so "black/white" -> "black white".
    delete_all = COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official script passes re.UNICODE (32) where sub() takes its count.
    return PERIOD_STRIP.sub("", out, count=32)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation: punctuation, number words, articles, contractions."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float | None:
    """VQA accuracy: the mean over leave-one-out subsets of ``min(1, matches / 3)``.

    Prediction and answers are normalised; None when there is no answer.
    """
    if not answers:
        return None
    pred = normalize_answer(prediction)
    hits = np.array([normalize_answer(a) == pred for a in answers])
    others = hits.sum() - hits  # matches among the other answers, each one left out in turn
    return float(np.minimum(1.0, others / 3.0).mean())


def gqa_accuracy(prediction: str, answers: Sequence[str]) -> float | None:
    """GQA accuracy: exact match of the normalised prediction with the first answer."""
    if not answers:
        return None
    return float(normalize_answer(prediction) == normalize_answer(answers[0]))


class VQAEvalParams(StageParams):
    metric: Literal["vqa", "gqa"] = Field(
        "vqa", description="vqa: VQAv2/OK-VQA soft accuracy over 10 answers; gqa: exact match")


class VQAEval(Stage):
    """Score a predicted answer against the human answers with the official VQA normalisation.

    ``accuracy`` is null when a row has no answers.
    """

    name = "vqa_eval"
    Params = VQAEvalParams
    resources = Resources(batch_size=1024)
    INPUTS = {
        "prediction": Input(pa.string(), "predicted answer"),
        "answers": Input(pa.list_(pa.string()), "human answers (10 for VQAv2)", optional=True),
    }
    OUTPUTS = {
        "accuracy": Output(pa.float32(), "accuracy in [0, 1], null without answers"),
        "normalized": Output(pa.string(), "the normalised prediction"),
    }

    def process(self, batch: Batch) -> dict[str, Any]:
        score = vqa_accuracy if self.params.metric == "vqa" else gqa_accuracy
        answers, valid = optional_column(batch, "answers", [None] * len(batch))
        predictions = batch["prediction"]
        return {
            "accuracy": [score(p, a) if ok else None
                         for p, a, ok in zip(predictions, answers, valid)],
            "normalized": [normalize_answer(p) for p in predictions],
        }
