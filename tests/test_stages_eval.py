"""vqa_eval: scores identical to the official VQA evaluation (vqaEval.py), quirks included, and
LAVIS's GQA exact match; the official report's rounding."""

from __future__ import annotations

import numpy as np
import pytest

from stages.base import Batch
from stages.evaluation import (CONTRACTIONS, VQAEval, gqa_accuracy, normalize_answer, official_line,
                               official_report,
                               process_punctuation, vqa_accuracy)


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


def test_prediction_is_normalised_fully():
    assert vqa_accuracy("The dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("  Two\n", ["2"] * 10) == 1.0
    assert vqa_accuracy("yes", []) is None


@pytest.mark.parametrize("prediction, answers, official", [
    # human answers are never lowercased, stripped or mapped from number words
    ("2", ["two"] * 10, 0.0),
    ("yes", ["Yes"] * 10, 0.0),
    ("2", ["two"] * 7 + ["2"] * 3, 0.9),       # seven left-out "two": 3 matches -> 1; three "2": 2 -> 2/3
    ("dog", [" dog"] * 4 + ["dog"] * 6, 1.0),  # " dog" never matches; six "dog" do
    ("dog", [" dog"] * 8 + ["dog"] * 2, 0.6),
    # punctuation is processed on human answers only when they are not all the same string
    ("yes", ["yes."] * 10, 0.0),
    ("yes", ["yes."] * 9 + ["yes"], 1.0),
    ("red", ["red!"] * 5 + ["blue"] * 5, 0.0),  # "red!" -> "red " (a mark not touching a space becomes one)
    ("black white", ["black/white"] * 4 + ["gray"] * 6, 1.0),
    ("1000", ["1,000"] * 3 + ["10"] * 7, 0.9),
    ("the cat", ["cat"] * 10, 1.0),             # articles leave the prediction, not the answers
    ("cat", ["the cat"] * 4 + ["cat"] * 6, 1.0),
    ("cat", ["the cat"] * 8 + ["cat"] * 2, 0.6),
])
def test_scores_equal_the_official_rules(prediction, answers, official):
    assert vqa_accuracy(prediction, answers) == pytest.approx(official, abs=1e-12)


def test_human_answers_get_punctuation_processing_only():
    assert process_punctuation("Two.") == "Two" and normalize_answer("Two.") == "2"
    assert process_punctuation("red!") == "red " and process_punctuation("red !") == "red "


def test_gqa_processes_both_sides_without_whitespace_handling():
    assert gqa_accuracy("The Dog", ["dog"]) == 1.0
    assert gqa_accuracy("two", ["2"]) == 1.0 and gqa_accuracy("2", ["Two"]) == 1.0  # both sides mapped
    assert gqa_accuracy("yes!", ["yes"]) == 1.0  # "yes " -> split and joined
    assert gqa_accuracy("left side", ["left"]) == 0.0
    assert gqa_accuracy("x", []) is None


def test_official_report_rounds_as_the_official_code():
    acc = [1.0, 0.3, 0.6, None, 0.9, 0.0, 2 / 3]
    qtypes = ["what color", "how many", "how many", "how many", "is the", None, "is the"]
    atypes = ["other", "number", "number", "number", "yes/no", "yes/no", "yes/no"]
    report = official_report(acc, qtypes, atypes)
    scored = [a for a in acc if a is not None]
    assert report["questions"] == 6
    assert report["overall"] == round(100 * float(sum(scored)) / 6, 2) == 57.78
    assert report["perQuestionType"] == {"what color": 100.0, "how many": 45.0, "is the": round(100 * (0.9 + 2 / 3) / 2, 2)}
    assert report["perAnswerType"] == {"other": 100.0, "number": 45.0, "yes/no": 52.22}
    assert official_report([None]) == {"questions": 0, "overall": None, "answered": 0, "errors": 0,
                                       "answered_overall": None}


def test_official_report_scores_failed_questions_0():
    # four questions answered (1.0, 0.5, 0.0, 1.0), two failed, one row without human answers
    acc = [1.0, None, 0.5, 0.0, None, 1.0, None]
    failed = [False, True, False, False, True, False, False]
    atypes = ["yes/no", "yes/no", "number", "other", "other", "other", None]
    report = official_report(acc, None, atypes, failed=failed)
    assert (report["questions"], report["answered"], report["errors"]) == (6, 4, 2)
    assert report["overall"] == 41.67  # 2.5 / 6: the failed questions score 0, as officially
    assert report["answered_overall"] == 62.5  # 2.5 / 4
    assert report["perAnswerType"] == {"yes/no": 50.0, "number": 50.0, "other": 33.33}  # 1/2, 0.5/1, 1/3
    assert official_report([None, None], failed=[True, False])["questions"] == 0  # no answers in the data


def test_summary_line_says_how_many_questions_failed():
    report = official_report([1.0, None, 0.5, 0.0], failed=[False, True, False, False])
    assert official_line(report) == ("37.50 over 4 questions (errors scored 0); 50.00 accuracy over 3 of 4 "
                                     "questions (1 errors)")
    assert official_line(official_report([1.0, 0.5])) == "75.00 over 2 questions"


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


def test_export_in_the_official_formats(tmp_path, capsys):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.cli import main

    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.table({"sample_id": ["262148000", "262148001", "262148002"],
                             "answer.answer": ["yes", None, "2"], "status": ["ok", "error", "ok"]}),
                   run / "results.parquet")
    (run / "manifest.json").write_text(json.dumps({"roles": {"answer.answer": "answer"}}))
    assert main(["export", str(run), "--format", "vqav2"]) == 0
    assert "3 predictions (1 rows without an answer" in capsys.readouterr().out
    assert json.loads((run / "predictions_vqav2.json").read_text()) == [
        {"question_id": 262148000, "answer": "yes"}, {"question_id": 262148001, "answer": ""},
        {"question_id": 262148002, "answer": "2"}]
    assert main(["export", str(run), "--format", "gqa", "--out", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())[0] == {"questionId": "262148000", "prediction": "yes"}
    pq.write_table(pa.table({"sample_id": ["a"], "x.answer": ["1"], "y.answer": ["2"]}), run / "results.parquet")
    (run / "manifest.json").write_text(json.dumps({"roles": {"x.answer": "answer", "y.answer": "answer"}}))
    assert main(["export", str(run), "--format", "gqa"]) == 2
    assert "several answer columns (x.answer, y.answer)" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "vqav2", "--answer", "x.answer"]) == 2
    assert "integer question ids" in capsys.readouterr().err


def test_run_summary_and_manifest_carry_the_official_report(tmp_path, write_graph):
    import json

    from runtime.api import run_graph
    from runtime.run import format_summary

    rows = [("2", ["two"] * 7 + ["2"] * 3, "how many"), ("yes", ["yes"] * 10, "is the"),
            ("Two", ["two"] * 10, "how many"), ("red", ["red."] * 9 + ["blue"], "what color")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"sample_id": str(i), "image_bytes": "aGk=", "question": q,
                                              "answers": a, "question_type": t}) for i, (q, a, t) in enumerate(rows)))
    graph = write_graph(f"""
        dataset: {{source: manifest, params: {{path: {manifest}}}}}
        nodes:
          acc: {{stage: vqa_eval, inputs: {{prediction: source.question, answers: source.answers}}}}
        outputs: [acc.accuracy, source.question_type]
        """)
    summary = run_graph(graph, executor="local", output=tmp_path / "out", cache_dir=tmp_path / "c",
                        progress=False, device="cpu")
    # the prediction is the question here: 0.9, 1.0, 0.0 ("Two" -> "2" against ten "two"), 1.0
    want = {"metric": "vqa", "questions": 4, "overall": round(100 * 2.9 / 4, 2), "answered": 4, "errors": 0,
            "answered_overall": 72.5,
            "perQuestionType": {"how many": 45.0, "is the": 100.0, "what color": 100.0}, "perAnswerType": {}}
    assert summary.evaluation == {"acc": want}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["evaluation"] == {"acc": want}
    assert "VQA accuracy (acc, official): 72.50 over 4 questions" in format_summary(summary, None)


def test_cli_reports_errors_scored_0_and_the_answered_accuracy(tmp_path, write_graph):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    rows = [{"question": "yes", "answers": ["yes"] * 10, "answer_type": "yes/no"},
            {"question": "no", "answers": 7, "answer_type": "yes/no"},  # malformed: this question fails
            {"question": "2", "answers": ["2"] * 10, "answer_type": "number"},
            {"question": "red", "answers": ["blue"] * 10, "answer_type": "other"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"sample_id": str(i), "image_bytes": "aGk=", **r})
                                  for i, r in enumerate(rows)))
    graph = write_graph(f"""
        dataset: {{source: manifest, params: {{path: {manifest}}}}}
        nodes:
          acc: {{stage: vqa_eval, inputs: {{prediction: source.question, answers: source.answers}}}}
        outputs: [acc.accuracy, source.answer_type]
        """)
    proc = subprocess.run([sys.executable, "-m", "runtime", "run", str(graph), "--executor", "local", "--quiet",
                           "--device", "cpu", "--output", str(tmp_path / "out"), "--cache", str(tmp_path / "c")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # official: (1 + 0 + 1 + 0) / 4 = 50.00; the 3 answered alone: 2 / 3 = 66.67
    assert ("VQA accuracy (acc, official): 50.00 over 4 questions (errors scored 0); 66.67 accuracy over 3 of 4 "
            "questions (1 errors); per answer type: number 100.00, other 0.00, yes/no 50.00") in proc.stdout
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())["evaluation"]["acc"]
    assert (record["overall"], record["answered_overall"], record["questions"], record["answered"],
            record["errors"]) == (50.0, 66.67, 4, 3, 1)
    assert record["perAnswerType"] == {"yes/no": 50.0, "number": 100.0, "other": 0.0}


def test_official_tally_added_part_by_part_equals_the_report_of_the_whole():
    """A run tallies its results part by part (nothing of them kept): the figures must be the
    report of all rows at once, to the last digit."""
    from stages.evaluation import OfficialTally

    rng = np.random.default_rng(3)
    n = 997
    acc = [None if r < 0.2 else float(v) for r, v in zip(rng.random(n), rng.choice([0, 0.3, 0.6, 0.9, 1.0], n))]
    qtypes = [None if r < 0.1 else f"q{k}" for r, k in zip(rng.random(n), rng.integers(0, 7, n))]
    atypes = [["yes/no", "number", "other", None][k] for k in rng.integers(0, 4, n)]
    failed = list(rng.random(n) < 0.15)
    for per_answer_type in (True, False):
        tally = OfficialTally(per_answer_type=per_answer_type)
        for start in range(0, n, 64):
            part = slice(start, start + 64)
            tally.add(acc[part], qtypes[part], atypes[part], failed[part])
        whole = official_report(acc, qtypes, atypes if per_answer_type else None, failed=failed)
        assert tally.report() == whole
    no_answers = OfficialTally()
    no_answers.add([None, None], ["a", "b"], [None, None], [True, False])
    assert no_answers.report() == official_report([None, None], ["a", "b"], [None, None], failed=[True, False])
