"""Output roles: stages declare what each output is, the manifest records the role of each kept
column, and the report, the export and the summary pick columns by role, so a plugin's heatmap is
shown exactly like the project's own (data level; tests/test_report.py opens real reports)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import GRAPHS
from stages import STAGES, Output, Role


def test_every_role_is_declared_by_a_built_in_stage():
    declared = {o.role for cls in STAGES.values() for o in cls(cls.Params()).outputs().values()}
    assert declared - {None} == set(Role) - {Role.ATTENTION}  # per-layer attention maps: for plugins


def test_an_unknown_role_is_refused_where_it_is_declared():
    assert Output(pa.string(), "x", role="answer").role is Role.ANSWER
    with pytest.raises(ValueError, match="'heat_map' is not a valid Role"):
        Output(pa.string(), "x", role="heat_map")


def test_the_manifest_records_the_role_of_each_kept_column(tmp_path):
    from runtime.api import run_graph

    run_graph(GRAPHS / "oracle_heatmap.yaml", executor="local", progress=False, device="cpu",
              overrides=["dataset.num_images=1"], output=tmp_path / "run", cache_dir=tmp_path / "cache")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["roles"] == {
        "oracle.heatmap": "heatmap", "points.points": "points", "points.scores": "point_scores",
        "enhance.heatmap": "enhanced_heatmap", "enhance.status": "status", "patches.patches": "patches",
        "metrics.pointing_game": "pointing_game", "metrics.energy_in_mask": "energy_in_mask",
        "enhanced_metrics.energy_in_mask": "energy_in_mask"}


def plugin_run(folder, roles: bool = True):
    """A finished run of examples/heatmap_plugin's graph, as far as the report reads it: GradCAM
    -> the plugin's centre prior (feeding the captions) -> metrics of the prior's heatmap."""
    from artifacts.columns import python_to_column, tensor_type

    folder.mkdir()
    n, rng = 4, np.random.default_rng(0)
    heat = lambda: python_to_column(rng.random((n, 8, 8)).astype(np.float32), tensor_type("float32", [8, 8]), n)  # noqa: E731
    pq.write_table(pa.table({
        "sample_id": [f"shapes-0-000000-q{i}" for i in range(n)], "image_id": ["shapes-0-000000"] * n,
        "question": ["what colour?"] * n, "gradcam.heatmap": heat(), "prior.heatmap": heat(),
        "answer.answer": ["red"] * n, "accuracy.accuracy": pa.array([1.0, 0.0, 1.0, 1.0]),
        "prior_quality.pointing_game": pa.array([1.0, 0.0, 0.0, 1.0], pa.float32()),
        "status": ["ok"] * n}), folder / "results.parquet")
    nodes = {"gradcam": {"stage": "itm_gradcam"}, "prior": {"stage": "center_prior", "inputs": {"heatmap": "gradcam.heatmap"}},
             "answer": {"stage": "qa_fid"}, "accuracy": {"stage": "vqa_eval"},
             "prior_quality": {"stage": "heatmap_metrics", "inputs": {"heatmap": "prior.heatmap"}}}
    manifest = {"graph": {"name": "center_prior", "nodes": nodes,
                          "dataset": {"source": "shapes", "params": {"seed": 0, "num_images": 1}}}}
    if roles:
        manifest["roles"] = {"gradcam.heatmap": "heatmap", "prior.heatmap": "heatmap", "answer.answer": "answer",
                             "accuracy.accuracy": "accuracy", "prior_quality.pointing_game": "pointing_game"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_plugin_heatmap_is_found_by_its_role_and_drawn_under_its_node_name(tmp_path):
    from reports.comparison import metric_rows
    from reports.data import Run, SourceImages
    from reports.render import render_run

    run = Run(plugin_run(tmp_path / "run"))
    assert run.roles.heatmaps == {"heatmap": "gradcam.heatmap", "prior": "prior.heatmap"}
    assert run.roles.pointing == {"prior": "prior_quality.pointing_game"}
    assert (run.roles.answer, run.roles.accuracy) == ("answer.answer", "accuracy.accuracy")
    assert {"pointing game (prior)", "heatmap entropy (heatmap)", "heatmap entropy (prior)"} <= dict(metric_rows([run])).keys()
    drawn = render_run(run, run.sample_ids[:1], SourceImages(run.dataset), folder=tmp_path / "render")
    assert set(drawn.samples[run.sample_ids[0]]) == {"heatmap", "prior"}


def test_a_run_folder_without_recorded_roles_goes_by_its_stages_declarations(tmp_path):
    from reports.data import Run

    run = Run(plugin_run(tmp_path / "run", roles=False))  # center_prior is not installed: no role for it
    assert run.roles.heatmaps == {"heatmap": "gradcam.heatmap"}
    assert (run.roles.answer, run.roles.accuracy) == ("answer.answer", "accuracy.accuracy")
