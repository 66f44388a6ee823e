"""``runtime compare`` through the command line, on hand-made run folders: the runs are compared
over the samples they share (and the samples left out are counted), the disagreement table shows
the ground truth and marks the run that was right, by the runs' accuracy column or else by exact
match, saying which; columns are found by role, whatever the nodes are called."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import ROOT


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"})


def make_run(folder: Path, name: str, answers: dict[str, str | None], accuracy: dict[str, float] | None = None,
             node: str = "answer") -> Path:
    """A finished run folder of ``name`` answering ``answers`` (sample id -> answer) with the
    ground truth of ``TRUTH``; ``accuracy`` kept under role accuracy when given."""
    ids = list(answers)
    columns = {"sample_id": ids, "question": [QUESTIONS[s] for s in ids], "image_id": [IMAGES[s] for s in ids],
               "answer_type": [ANSWER_TYPES[s] for s in ids], "question_type": [QUESTION_TYPES[s] for s in ids],
               "answers": pa.array([TRUTH[s] for s in ids], pa.list_(pa.string())),
               f"{node}.text": [answers[s] for s in ids],
               "status": ["ok" if answers[s] is not None else "error" for s in ids]}
    roles = {f"{node}.text": "answer"}
    if accuracy is not None:
        columns["score.vqa"] = [accuracy[s] for s in ids]
        roles["score.vqa"] = "accuracy"
    folder.mkdir(parents=True)
    pq.write_table(pa.table(columns), folder / "results.parquet")
    (folder / "manifest.json").write_text(json.dumps({"status": "finished", "roles": roles, "graph": {"name": name}}))
    return folder


QUESTIONS = {f"q{i}": f"question {i}?" for i in range(6)}
IMAGES = {"q0": "i0", "q1": "i0", "q2": "i1", "q3": "i1", "q4": "i2", "q5": "i2"}
ANSWER_TYPES = {"q0": "other", "q1": "number", "q2": "other", "q3": "yes/no", "q4": "other", "q5": "yes/no"}
QUESTION_TYPES = {"q0": "what is", "q1": "how many", "q2": "what color", "q3": "is the", "q4": "what is", "q5": "is the"}
TRUTH = {"q0": ["dog"] * 3, "q1": ["two", "two", "2"], "q2": ["red"], "q3": ["yes"], "q4": ["cat"], "q5": ["no"]}


def table_row(text: str, sample_id: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{sample_id} "))


def test_compare_over_the_shared_samples_shows_ground_truth_and_who_was_right(tmp_path):
    # a: six samples; b: four of them (q4, q5 left out of the comparison)
    a = make_run(tmp_path / "a", "alpha", {"q0": "dog", "q1": "2", "q2": "blue", "q3": "yes", "q4": "cat", "q5": "no"},
                 accuracy={"q0": 1.0, "q1": 0.3, "q2": 0.0, "q3": 1.0, "q4": 1.0, "q5": 0.0})
    b = make_run(tmp_path / "b", "beta", {"q0": "cat", "q1": "Two", "q2": "Red.", "q3": "yes"}, node="qa")
    done = cli("compare", str(a), str(b))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "compared on the 4 samples present in every run; left out (not in every run): [0] alpha 2 of 6" in out
    samples = next(line for line in out.splitlines() if line.startswith("samples "))
    assert samples.split()[1:] == ["4", "4"]
    accuracy = next(line for line in out.splitlines() if line.startswith("VQA accuracy"))
    assert accuracy.split()[2] == "0.5750"   # the mean of alpha's over q0-q3, not over its six samples

    assert "answers differ on 3 of 4 samples present in every run" in out
    assert "[0] alpha: its per-question accuracy (score.vqa)" in out
    assert "[1] beta: exact match against the ground-truth answers, after normalisation" in out
    assert "over the 3: [0] 1, [1] 2, none 0" in out
    q0, q1, q2 = (table_row(out, s) for s in ("q0", "q1", "q2"))
    assert "dog (3)" in q0 and "✓ dog" in q0 and "✗ cat" in q0 and q0.endswith("[0]")
    assert "two (2), 2" in q1 and "~ 2" in q1 and "✓ Two" in q1 and q1.endswith("[1]")
    assert "red " in q2 and "✗ blue" in q2 and "✓ Red." in q2 and q2.endswith("[1]")
    assert "q3 " not in out.split("answers differ")[1]   # both said yes


def line_of(text: str, start: str, after: str = "") -> list[str]:
    """The cells of the first line starting with ``start`` after the text ``after``."""
    return next(line for line in text.split(after, 1)[1].splitlines() if line.startswith(start))[len(start):].split()


def test_accuracy_by_type_and_the_difference_with_its_interval_resampling_images(tmp_path):
    a = make_run(tmp_path / "a", "alpha", {"q0": "dog", "q1": "2", "q2": "blue", "q3": "yes", "q4": "cat", "q5": "no"},
                 accuracy={"q0": 1.0, "q1": 0.3, "q2": 0.0, "q3": 1.0, "q4": 1.0, "q5": 0.0})
    b = make_run(tmp_path / "b", "beta", {"q0": "cat", "q1": "Two", "q2": "Red.", "q3": "yes"}, node="qa")
    done = cli("compare", str(a), str(b), "--resamples", "2000", "--seed", "7")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # side by side, over q0-q3: n, each run's accuracy, answers differ, [0] right, [1] right, none
    by_type = "accuracy (points) by answer type and question type"
    assert line_of(out, "overall ", by_type) == ["4", "57.50", "75.00", "3", "1", "2", "0"]
    assert line_of(out, "answer type: other ", by_type) == ["2", "50.00", "50.00", "2", "1", "1", "0"]
    assert line_of(out, "question type: how many ", by_type) == ["1", "30.00", "100.00", "1", "0", "1", "0"]
    # beta - alpha per image: i0 (q0, q1) (0 - 1) + (1 - 0.3) = -0.3, i1 (q2, q3) +1, 2 questions each: a
    # resample of two images means -0.15, +0.175 or +0.5; every sign flip of (-0.3, 1) is as extreme: p 1
    pair = "[1] beta - [0] alpha: accuracy difference in points over the 4 questions both answered"
    assert pair in out and "(2000 resamples, seed 7)" in out
    assert line_of(out, "overall ", pair) == ["4", "2", "57.50", "75.00", "+17.50", "[-15.00,", "+50.00]", "1.0000",
                                              "exact,", "all", "4", "sign", "flips"]
    assert line_of(out, "question type: what is ", pair)[4:7] == ["-100.00", "[-100.00,", "-100.00]"]
    assert cli("compare", str(a), str(b), "--resamples", "2000", "--seed", "7").stdout == out


def test_a_failed_row_is_wrong_and_runs_without_shared_samples_are_refused(tmp_path):
    a = make_run(tmp_path / "a", "alpha", {"q0": "dog", "q1": None}, accuracy={"q0": 1.0, "q1": None})
    b = make_run(tmp_path / "b", "beta", {"q0": "cat", "q1": "two"}, accuracy={"q0": 0.0, "q1": 1.0})
    out = cli("compare", str(a), str(b)).stdout
    assert "none left out" in out
    assert table_row(out, "q1").endswith("[1]") and "✗ -" in table_row(out, "q1")
    # the failed row is left out of the accuracy comparisons
    assert "over the 1 questions both answered" in out
    assert line_of(out, "overall ", "by answer type")[:3] == ["1", "100.00", "0.00"]

    other = make_run(tmp_path / "c", "gamma", {"q5": "no"})
    refused = cli("compare", str(a), str(other))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "error: the runs share no sample: alpha has 2 (q0, ...), gamma has 1 (q5, ...); compare runs of the same dataset"]


def test_help_describes_the_comparison():
    text = " ".join(cli("compare", "--help").stdout.split())
    assert "over the samples present in every run" in text and "ground-truth answers" in text


def test_without_ground_truth_the_accuracy_tables_say_none(tmp_path):
    runs = [make_run(tmp_path / n, n, {"q0": x, "q1": "2"}) for n, x in (("alpha", "dog"), ("beta", "cat"))]
    for run in runs:
        pq.write_table(pq.read_table(run / "results.parquet").drop(["answers"]), run / "results.parquet")
    out = cli("compare", *map(str, runs)).stdout
    assert "over the 0 questions every run answered: none (no such question has ground truth)" in out
    assert "over the 0 questions both answered: none (no such question has ground truth)" in out
