"""An overlay's nodes are plain nodes: after a graph's run, the run with the overlay computes
only the overlay's nodes (and the uncached image decoding / pixels its nodes read)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import GRAPHS
from runtime.api import run_graph
from runtime.graph import load_graph

pytestmark = pytest.mark.slow

SMALL = ["dataset.num_images=2", "caption.num_captions=1", "caption.max_rounds=1", "faithfulness.steps=2",
         "faithfulness.road_iterations=2"]


def test_overlay_run_after_the_graph_computes_only_the_overlay_nodes(tmp_path, calls):
    def run(overlays, out):
        overrides = SMALL if overlays else [o for o in SMALL if not o.startswith("faithfulness")]
        graph = load_graph(GRAPHS / "pnp_vqa.yaml", overrides, presets=["tiny"], overlays=overlays)
        return graph, run_graph(graph, executor="local", output=tmp_path / out, cache_dir=tmp_path / "cache",
                                progress=False, device="cpu")

    base, _ = run([], "base")
    calls.clear()
    graph, summary = run([GRAPHS / "overlays" / "faithfulness.yaml"], "overlay")
    computed = {n for n, s in summary.nodes.items() if s.computed_shards and graph.nodes[n].stage.cacheable}
    assert computed == {"faithfulness_gradcam"}
    assert {"itm_gradcam", "caption", "qa_fid", "sample_patches"}.isdisjoint(calls)
    assert calls["heatmap_faithfulness"] > 0
    before = pq.read_table(tmp_path / "base" / "results.parquet").to_pydict()
    after = pq.read_table(tmp_path / "overlay" / "results.parquet").to_pydict()
    assert before["answer.answer"] == after["answer.answer"] and len(after["sample_id"]) == 8
    curves = np.asarray(after["faithfulness_gradcam.deletion_curve"])
    assert curves.shape == (8, 3) and np.isfinite(curves).all()
