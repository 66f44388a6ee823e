"""Reuse across runs and graphs, --force / --no-cache, bad samples, run folder."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from artifacts.columns import column_to_python
from conftest import GRAPHS
from runtime.api import run_graph

SMALL = ["dataset.num_images=6", "shard_size=8"]


def run(tmp_path, overrides=(), graph=GRAPHS / "oracle_heatmap.yaml", out="run", **kw):
    return run_graph(graph, overrides=[*SMALL, *overrides], executor="local", output=tmp_path / out,
                     cache_dir=tmp_path / "cache", progress=False, device="cpu", **kw)


def test_second_run_computes_nothing(tmp_path, calls):
    first = run(tmp_path)
    assert sum(calls.values()) > 0
    assert all(s.computed_shards > 0 for s in first.nodes.values())
    table1 = pq.read_table(tmp_path / "run" / "results.parquet")
    calls.clear()
    second = run(tmp_path)
    assert sum(calls.values()) == 0
    assert all(s.computed_shards == 0 for s in second.nodes.values())
    assert second.shards_from_parts == second.shards
    assert pq.read_table(tmp_path / "run" / "results.parquet").equals(table1)
    # a new output folder rebuilds its results from the cache without computing anything
    calls.clear()
    third = run(tmp_path, out="other")
    assert sum(calls.values()) == 0 and third.samples == first.samples
    assert pq.read_table(tmp_path / "other" / "results.parquet").equals(table1)


def test_param_change_recomputes_node_and_descendants_only(tmp_path, calls):
    run(tmp_path)
    calls.clear()
    summary = run(tmp_path, ["patches.seed=7"])
    computed = {n for n, s in summary.nodes.items() if s.computed_shards}
    assert computed == {"patches"}
    assert set(calls) == {"sample_patches"}
    calls.clear()
    summary = run(tmp_path, ["enhance.alpha=0.25"])
    computed = {n for n, s in summary.nodes.items() if s.computed_shards}
    assert computed == {"enhance", "patches", "enhanced_metrics"}


def test_second_graph_shares_upstream_results(tmp_path, write_graph, calls):
    run(tmp_path)
    variant = write_graph(f"""
        extends: {GRAPHS / 'oracle_heatmap.yaml'}
        name: variant
        nodes:
          enhance: {{params: {{alpha: 0.8}}}}
        """)
    calls.clear()
    summary = run(tmp_path, graph=variant, out="variant")
    computed = {n for n, s in summary.nodes.items() if s.computed_shards}
    assert computed == {"enhance", "patches", "enhanced_metrics"}
    assert summary.nodes["oracle"].cached_shards == summary.shards
    assert "mask_heatmap" not in calls and "heatmap_points" not in calls


def test_force_and_no_cache(tmp_path, calls):
    run(tmp_path)
    calls.clear()
    summary = run(tmp_path, force=["points"])
    computed = {n for n, s in summary.nodes.items() if s.computed_shards}
    # the decoded image is not cached, so it is decoded again for the forced node
    assert computed == {"image", "points", "enhance", "patches", "enhanced_metrics"}
    calls.clear()
    summary = run(tmp_path, no_cache=True, out="nocache")
    assert all(s.computed_shards == summary.shards for n, s in summary.nodes.items() if n != "image") \
        and summary.nodes["image"].computed_shards == summary.shards


def test_results_and_manifest(tmp_path):
    summary = run(tmp_path)
    out = tmp_path / "run"
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == summary.samples == 6 * 4
    assert len(set(table.column("sample_id").to_pylist())) == table.num_rows
    assert {"sample_id", "image_id", "question", "status", "error", "oracle.heatmap", "patches.patches",
            "answers"} <= set(table.column_names)
    heat = table.schema.field("oracle.heatmap").type
    assert heat.extension_name == "arrow.fixed_shape_tensor" and list(heat.shape) == [24, 24]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["graph_hash"]
    assert manifest["graph"]["nodes"]["points"]["params"]["num_points"] == 5
    assert manifest["seeds"]["patches.seed"] == 0 and manifest["seeds"]["dataset.seed"] == 8000
    assert manifest["versions"]["pyarrow"] and manifest["nodes"]["points"]["rows"] == 24
    # values are real: every patch row is sorted, unique, inside the 24x24 grid
    patches, valid = column_to_python(table.column("patches.patches"))
    ok = np.array(table.column("status").to_pylist()) == "ok"
    assert patches.shape[1:] == (5, 20) and np.array_equal(valid, ok) and ok.sum() > 0
    for row in patches[ok].reshape(-1, 20):
        assert np.all(np.diff(row) > 0) and row.min() >= 0 and row.max() < 576


def test_bad_samples_become_error_rows(tmp_path, write_graph):
    import cv2

    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.full((32, 48, 3), 200, np.uint8))
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    lines = [
        {"sample_id": "ok", "image": "good.png", "question": "what is it?"},
        {"sample_id": "missing", "image": "nope.jpg", "question": "what is it?"},
        {"sample_id": "corrupt", "image": "corrupt.jpg", "question": "what is it?"},
        {"sample_id": "empty", "image": "empty.png", "question": "what is it?"},
        {"sample_id": "noquestion", "image": "good.png", "question": "  "},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    graph = write_graph(f"""
        dataset: {{source: manifest, params: {{path: {manifest}}}}}
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
          pixels: {{stage: preprocess_image, params: {{family: blip, image_size: 32}}, inputs: {{image: image.image}}}}
        outputs: [image.size]
        """)
    summary = run_graph(graph, executor="local", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                        progress=False, device="cpu")
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    rows = {r["sample_id"]: r for r in table}
    assert len(rows) == 5 and summary.errors == 4
    assert rows["ok"]["status"] == "ok" and rows["ok"]["image.size"] == [32, 48]
    for sid in ("missing", "corrupt", "empty", "noquestion"):
        assert rows[sid]["status"] == "error" and rows[sid]["error"], sid
    assert "nope.jpg" in rows["missing"]["error"]
    assert "empty question" in rows["noquestion"]["error"]


def test_threads_are_applied_before_the_models_and_recorded(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # restored after the test, as is torch's setting below
    before = torch.get_num_threads()
    try:
        run(tmp_path, threads=1)
        assert torch.get_num_threads() == 1 and __import__("os").environ["OMP_NUM_THREADS"] == "1"
        assert json.loads((tmp_path / "run" / "manifest.json").read_text())["arguments"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
