"""Answer evaluation exactly as the official scripts score it (VQAv2, OK-VQA, GQA).

VQAv2 / OK-VQA follow the official ``vqaEval.py`` (also LAVIS's
``lavis/common/vqa_tools/vqa_eval.py``), quirks included, which treats the two sides
differently:

- the prediction: newlines and tabs become spaces, it is stripped, then
  :func:`process_punctuation` and :func:`process_digit_article` (lowercase, number words to
  digits, articles dropped, contractions restored);
- the human answers: only :func:`process_punctuation`, and only when the ten answers are not
  all the same string; nothing else (no lowercasing, no stripping, no number mapping).

A prediction ``2`` against ten ``two`` therefore scores 0, as it does officially. The accuracy of
a question is the mean, over each human answer left out in turn, of
``min(1, matches among the other nine / 3)``. Reports round ``100 * mean`` to two decimals
(:func:`official_report`).

GQA follows LAVIS's ``GQATask``: exact match after :func:`process_punctuation` and
:func:`process_digit_article` on both sides (no newline or whitespace handling first).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field

from stages.base import STAGES, Batch, Input, Output, Resources, Stage, StageParams
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


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a mark touching a space (or any mark, when the text
    has a comma between digits) is deleted, otherwise it becomes a space ("black/white" ->
    "black white"); then periods not followed by a digit are removed."""
    delete_all = COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official script passes re.UNICODE (32) where sub() takes its count.
    return PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, split on whitespace, number words to
    digits, articles dropped, contractions restored, joined by single spaces."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """What the official VQA evaluation does to a *prediction* before comparing it."""
    return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float | None:
    """The official VQA accuracy of one question (module doc); None when there is no answer."""
    if not answers:
        return None
    pred = normalize_answer(prediction)
    human = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    hits = np.array([a == pred for a in human])
    others = hits.sum() - hits  # matches among the other answers, each one left out in turn
    return float(sum(min(1, float(k) / 3) for k in others)) / len(human)


def gqa_accuracy(prediction: str, answers: Sequence[str]) -> float | None:
    """GQA accuracy as LAVIS's GQATask: exact match of the processed prediction and answer."""
    if not answers:
        return None
    gqa = lambda text: process_digit_article(process_punctuation(text))  # noqa: E731
    return float(gqa(prediction) == gqa(answers[0]))


class OfficialTally:
    """The sums behind ``official_report``, added part by part (a run's results need not be in
    memory at once): the same additions in the same order, so the same figures."""

    def __init__(self, per_answer_type: bool = True):
        self.per_answer_type = per_answer_type
        self.answered, self.answered_sum, self.failed = 0, 0.0, 0
        # per table: type -> [sum of scores, scored rows, failed rows], in order of first row
        self.types: dict[str, dict[str, list]] = {"perQuestionType": {}, "perAnswerType": {}}

    def add(self, accuracies: Sequence[float | None], question_types: Sequence[str | None] | None = None,
            answer_types: Sequence[str | None] | None = None, failed: Sequence[bool] | None = None) -> None:
        for k, accuracy in enumerate(accuracies):
            scored = accuracy is not None
            if not scored and not (failed and failed[k]):
                continue  # no human answers: no question
            if scored:
                self.answered += 1
                self.answered_sum += accuracy
            else:
                self.failed += 1
            for name, types in (("perQuestionType", question_types), ("perAnswerType", answer_types)):
                if types is not None and types[k] is not None:
                    acc = self.types[name].setdefault(types[k], [0.0, 0, 0])
                    if scored:
                        acc[0] += accuracy
                        acc[1] += 1
                    else:
                        acc[2] += 1

    def report(self, digits: int = 2) -> dict[str, Any]:
        """As ``official_report``: an error row counts (scoring 0) once some row was scored."""
        def pct(total: float, count: int) -> float:
            return round(100 * float(total) / count, digits)

        with_failed = self.answered > 0
        questions = self.answered + (self.failed if with_failed else 0)
        report: dict[str, Any] = {"questions": questions,
                                  "overall": pct(self.answered_sum, questions) if questions else None,
                                  "answered": self.answered, "errors": questions - self.answered,
                                  "answered_overall": pct(self.answered_sum, self.answered) if self.answered else None}
        for name, groups in self.types.items():
            if name == "perAnswerType" and not self.per_answer_type:
                continue
            counts = {t: (total, scored + (failed if with_failed else 0)) for t, (total, scored, failed) in groups.items()}
            report[name] = {t: pct(total, n) for t, (total, n) in counts.items() if n}
        return report


def official_report(accuracies: Sequence[float | None], question_types: Sequence[str | None] | None = None,
                    answer_types: Sequence[str | None] | None = None, failed: Sequence[bool] | None = None,
                    digits: int = 2) -> dict[str, Any]:
    """The official report: ``overall``, ``perQuestionType`` and ``perAnswerType`` as
    ``round(100 * mean, 2)`` (in the given order, summed as the official code sums) over every
    question: a row with an accuracy, or a row that ``failed`` (an error row: the official
    evaluation requires an answer to every question, so one without scores 0). ``answered``
    and ``answered_overall``: the count and accuracy of the questions with an answer alone;
    ``errors``: the questions that failed. Rows neither scored nor failed (no human answers)
    are no questions. Types that are null are left out of their table."""
    tally = OfficialTally()
    tally.add(accuracies, question_types, answer_types, failed)
    report = tally.report(digits)
    for name, types in (("perQuestionType", question_types), ("perAnswerType", answer_types)):
        if types is None:
            report.pop(name)
    return report


def official_line(report: dict) -> str:
    """'72.50 over 4 questions' and, when some failed, what the answered ones alone score:
    '(errors scored 0); 96.67 accuracy over 3 of 4 questions (1 errors)'."""
    line = f"{report['overall']:.2f} over {report['questions']} questions"
    if report.get("errors"):
        line += (f" (errors scored 0); {report['answered_overall']:.2f} accuracy over {report['answered']} of "
                 f"{report['questions']} questions ({report['errors']} errors)")
    return line


class VQAEvalParams(StageParams):
    metric: Literal["vqa", "gqa"] = Field(
        "vqa", description="vqa: the official VQAv2 / OK-VQA accuracy over the human answers; gqa: exact "
        "match as LAVIS's GQATask")


@STAGES.add
class VQAEval(Stage):
    """Score a predicted answer against the human answers exactly as the official evaluation does.

    ``accuracy`` is null when a row has no answers. The run's summary and manifest carry the
    official report (overall, per question type, per answer type, rounded to two decimals).
    """

    name = "vqa_eval"
    Params = VQAEvalParams
    resources = Resources(batch_size=1024)
    INPUTS = {
        "prediction": Input(pa.string(), "predicted answer"),
        "answers": Input(pa.list_(pa.string()), "human answers (10 for VQAv2)", optional=True),
    }
    OUTPUTS = {
        "accuracy": Output(pa.float64(), "accuracy in [0, 1] (float64, as the official code computes it), "
                           "null without answers", role="accuracy"),
        "normalized": Output(pa.string(), "the prediction as the evaluation compares it"),
    }

    def process(self, batch: Batch) -> dict[str, Any]:
        score = vqa_accuracy if self.params.metric == "vqa" else gqa_accuracy
        answers, valid = optional_column(batch, "answers", [None] * len(batch))
        predictions = batch["prediction"]
        return {
            "accuracy": [score(p, a) if ok else None
                         for p, a, ok in zip(predictions, answers, valid)],
            "normalized": [normalize_answer(p) if self.params.metric == "vqa"
                           else process_digit_article(process_punctuation(p)) for p in predictions],
        }
