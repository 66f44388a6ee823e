"""What a run's summary, manifest and report say about its numbers: weights trained on other
data than the run's, the record a rerun keeps, the time of each graph of a sweep."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np

from conftest import ROOT
from reports.build import _run_summary
from reports.data import Run
from runtime.graph import load_graph
from runtime.run import foreign_weights_warnings

SHAPES_WARNING = "answers from weights trained on synthetic shapes (gradcam): not meaningful on this data"


def gradcam_graph(write_graph, dataset: str, preset: str = "shapes"):
    return write_graph(f"""
        dataset: {dataset}
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
          pixels: {{stage: preprocess_image, params: {{family: blip}}, inputs: {{image: image.image}}}}
          gradcam: {{stage: itm_gradcam, params: {{preset: {preset}}},
                     inputs: {{pixels: pixels.pixels, question: source.question}}}}
        outputs: [gradcam.heatmap]
        """)


def photo_manifest(tmp_path) -> str:
    cv2.imwrite(str(tmp_path / "cat.png"), np.full((32, 32, 3), 120, np.uint8))
    (tmp_path / "m.jsonl").write_text(json.dumps({"question": "what animal is this?", "image": "cat.png"}) + "\n")
    return f"{{source: manifest, params: {{path: {tmp_path / 'm.jsonl'}}}}}"


def test_shapes_weights_on_other_data_warn_before_work_and_in_summary_and_manifest(tmp_path, write_graph):
    graph = gradcam_graph(write_graph, photo_manifest(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "runtime", "run", str(graph), "--executor", "local", "--quiet",
                           "--device", "cpu", "--output", str(tmp_path / "out"), "--cache", str(tmp_path / "c")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(SHAPES_WARNING) == 1
    assert f"  warning: {SHAPES_WARNING} (source manifest); see --weights" in proc.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [SHAPES_WARNING in w for w in manifest["warnings"]] == [True]
    assert _run_summary(Run(tmp_path / "out"), [], 0, None)["warnings"] == manifest["warnings"]  # the report's


def test_no_warning_on_shapes_data_or_without_shipped_weights(tmp_path, write_graph):
    shapes = "{source: shapes, params: {num_images: 1, questions_per_image: 1}}"
    assert foreign_weights_warnings(load_graph(gradcam_graph(write_graph, shapes))) == []
    assert foreign_weights_warnings(load_graph(gradcam_graph(write_graph, photo_manifest(tmp_path), "tiny"))) == []
    assert len(foreign_weights_warnings(load_graph(gradcam_graph(write_graph, photo_manifest(tmp_path))))) == 1


def eval_graph(tmp_path, write_graph, name: str = "g", metrics: tuple[str, ...] = ("vqa",)):
    manifest = tmp_path / "m.jsonl"
    rows = [{"sample_id": str(i), "image_id": str(i), "image_bytes": "aGk=", "question": q, "answers": [q] * 10}
            for i, q in enumerate(["yes", "2", "red"])]  # one image a question: three shards
    manifest.write_text("\n".join(json.dumps(row) for row in rows))
    nodes = "\n".join(f"  {m}: {{stage: vqa_eval, params: {{metric: {m}}}, "
                      "inputs: {prediction: source.question, answers: source.answers}}" for m in metrics)
    outputs = ", ".join(f"{m}.accuracy" for m in metrics)
    return write_graph(f"name: {name}\ndataset: {{source: manifest, params: {{path: {manifest}}}}}\n"
                       f"shard_size: 1\nnodes:\n{nodes}\noutputs: [{outputs}]\n", f"{name}.yaml")


def test_a_rerun_that_computes_nothing_keeps_the_record_of_the_run_that_did_the_work(tmp_path, write_graph):
    from runtime.api import run_graph
    from runtime.run import format_summary

    graph = eval_graph(tmp_path, write_graph)
    out = tmp_path / "out"

    def run(**options):
        summary = run_graph(graph, executor="local", output=out, cache_dir=tmp_path / "c", progress=False,
                            device="cpu", **options)
        return summary, json.loads((out / "manifest.json").read_text()), (out / "results.parquet").read_bytes()

    _, first, results = run()
    assert first["nodes"]["vqa"]["computed_shards"] == 3 and first["nodes"]["vqa"]["seconds"] > 0
    assert "reruns" not in first
    for count in (1, 2):
        summary, again, rerun_results = run()
        assert rerun_results == results
        for key in ("started", "finished", "nodes"):
            assert again[key] == first[key]
        assert again["totals"]["seconds"] == first["totals"]["seconds"]
        assert len(again["reruns"]) == count and again["reruns"][-1]["seconds"] == summary.seconds
        assert summary.nodes["vqa"].computed_shards == 0  # the printed summary is the rerun's own
        assert f"keeps the record of the run started {first['started']}" in format_summary(summary, None)
        assert len(_run_summary(Run(out), [], 0, None)["reruns"]) == count  # the report notes them
    _, forced, _ = run(force=["vqa"])  # a rerun that computes: its own record
    assert "reruns" not in forced and forced["nodes"]["vqa"]["computed_shards"] == 3


def test_each_graph_of_a_sweep_gets_its_own_share_of_the_time(tmp_path, write_graph):
    from runtime.api import run_graphs
    from runtime.run import format_summary

    alone = eval_graph(tmp_path, write_graph, "alone", ("vqa",))
    more = eval_graph(tmp_path, write_graph, "more", ("vqa", "gqa"))  # vqa: the same key, computed in `alone`
    def sweep():
        return run_graphs([alone, more], executor="local", outputs=[tmp_path / "a", tmp_path / "b"],
                          cache_dir=tmp_path / "c", progress=False, device="cpu")

    a, b = sweep()
    assert b.nodes["vqa"].computed_shards == 0 and b.nodes["vqa"].seconds == 0  # counted in `alone`
    work_a, work_b = a.nodes["vqa"].seconds, b.nodes["gqa"].seconds
    assert abs(a.seconds / a.sweep_seconds - work_a / (work_a + work_b)) < 1e-9
    assert abs(b.seconds / b.sweep_seconds - work_b / (work_a + work_b)) < 1e-9
    assert a.sweep_seconds == b.sweep_seconds  # one figure for the whole sweep
    assert f"its share of the sweep's {b.sweep_seconds:.1f} s" in format_summary(b, None)
    record = json.loads((tmp_path / "b" / "manifest.json").read_text())["totals"]
    assert (record["seconds"], record["sweep_seconds"]) == (b.seconds, b.sweep_seconds)
    sweep()  # the rerun of the sweep computes nothing: each graph keeps its record
    rerun = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert rerun["totals"]["seconds"] == b.seconds and len(rerun["reruns"]) == 1
