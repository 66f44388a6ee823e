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
