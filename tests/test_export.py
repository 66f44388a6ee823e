"""``runtime export`` through the command line, on hand-made run folders: the answer column must
hold strings, the format must fit the run's dataset, a run of part of the dataset is exported
with a warning naming how many of its questions it covers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import runtime_cli as cli

IDS = ["262148000", "262148001", "262148002"]


def assert_refused(proc: subprocess.CompletedProcess, *named: str) -> None:
    """Exit 2 with one error line naming ``named``, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for text in named:
        assert text in proc.stderr, proc.stderr


def vqav2_files(folder: Path, questions: int) -> dict:
    """A VQAv2 questions file of ``questions`` questions and an image folder: the params of a
    vqav2 dataset."""
    (folder / "images").mkdir(parents=True)
    (folder / "q.json").write_text(json.dumps({"questions": [
        {"question_id": 262148000 + i, "image_id": 262148, "question": f"q{i}?"} for i in range(questions)]}))
    return {"questions": str(folder / "q.json"), "images": str(folder / "images")}


def make_run(folder: Path, dataset: dict, arguments: dict | None = None) -> Path:
    """A finished run folder: an answer, captions and accuracy per question of ``IDS``."""
    folder.mkdir(parents=True)
    pq.write_table(pa.table({
        "sample_id": IDS, "question": ["q0?", "q1?", "q2?"],
        "caption.captions": pa.array([["a dog", "a cat"], ["a red car"], None], pa.list_(pa.string())),
        "answer.answer": ["dog", None, "2"], "accuracy.accuracy": [1.0, None, 0.3],
        "status": ["ok", "error", "ok"]}), folder / "results.parquet")
    roles = {"caption.captions": "captions", "answer.answer": "answer", "accuracy.accuracy": "accuracy"}
    (folder / "manifest.json").write_text(json.dumps({
        "status": "finished", "roles": roles, "graph": {"name": "pnp_vqa", "dataset": dataset},
        "arguments": {"limit": None, "ids": None, **(arguments or {})}}))
    return folder


def test_an_answer_column_that_is_not_of_strings_is_refused(tmp_path):
    run = make_run(tmp_path / "run", {"source": "vqav2", "params": vqav2_files(tmp_path, 3)})
    refused = cli("export", str(run), "--format", "vqav2", "--answer", "caption.captions")
    assert_refused(refused, "--answer caption.captions", "list<", "columns that fit: answer.answer")
    assert not list(run.glob("predictions_*"))

    done = cli("export", str(run), "--format", "vqav2")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "3 predictions (1 rows without an answer written as '')" in done.stdout
    assert json.loads((run / "predictions_vqav2.json").read_text()) == [
        {"question_id": 262148000, "answer": "dog"}, {"question_id": 262148001, "answer": ""},
        {"question_id": 262148002, "answer": "2"}]


def test_a_format_for_another_dataset_is_refused(tmp_path):
    vqav2 = make_run(tmp_path / "vqav2", {"source": "vqav2", "params": vqav2_files(tmp_path / "v", 3)})
    assert_refused(cli("export", str(vqav2), "--format", "gqa"), "--format gqa", "'vqav2'", "vqav2 or okvqa")
    assert cli("export", str(vqav2), "--format", "okvqa").returncode == 0

    gqa = make_run(tmp_path / "gqa", {"source": "gqa", "params": {"questions": "gone.json", "images": "gone"}})
    assert_refused(cli("export", str(gqa), "--format", "vqav2"), "--format vqav2", "'gqa'", "use --format gqa")
    assert cli("export", str(gqa), "--format", "gqa").returncode == 0
    assert json.loads((gqa / "predictions_gqa.json").read_text())[0] == {"questionId": "262148000", "prediction": "dog"}

    # your own data (a manifest source) may be exported in any format
    own = make_run(tmp_path / "own", {"source": "manifest", "params": {"path": "m.jsonl"}})
    assert cli("export", str(own), "--format", "gqa").returncode == 0


def test_a_run_of_part_of_the_dataset_is_exported_with_a_warning(tmp_path):
    limited = make_run(tmp_path / "limited", {"source": "vqav2", "params": vqav2_files(tmp_path, 5)}, {"limit": 3})
    done = cli("export", str(limited), "--format", "vqav2")
    assert done.returncode == 0 and (limited / "predictions_vqav2.json").is_file()
    assert done.stderr.startswith("warning: the run covers 3 of the 5 questions of its dataset (--limit 3)")

    # a --limit above the dataset's size: the whole dataset, no warning
    whole = make_run(tmp_path / "whole", {"source": "vqav2", "params": vqav2_files(tmp_path / "w", 3)}, {"limit": 10})
    done = cli("export", str(whole), "--format", "vqav2")
    assert done.returncode == 0 and done.stderr == "", done.stderr

    # the dataset gone (moved, another machine): the warning without the total
    gone = make_run(tmp_path / "gone", {"source": "vqav2", "params": {"questions": "nope.json", "images": "nope"}},
                    {"ids": IDS})
    done = cli("export", str(gone), "--format", "vqav2")
    assert done.returncode == 0
    assert done.stderr.startswith("warning: the run covers 3 questions, part of its dataset (--ids, 3 ids)")
