"""Sweeps: several graphs over one dataset in one pass; nodes with the same key computed once
(uncached image-level work included), each graph's run folder as if run alone."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import GRAPHS, assert_tables_close
from runtime.api import run_graph, run_graphs
from runtime.errors import UsageError

pytestmark = pytest.mark.slow

SMALL = ["dataset.num_images=4", "shard_size=8"]
PAIR = [GRAPHS / "pnp_vqa.yaml", GRAPHS / "esam_enhanced.yaml"]


def test_a_sweep_computes_shared_nodes_once_and_gives_the_runs_alone(tmp_path, calls):
    kw = dict(overrides=SMALL, presets=["tiny"], progress=False, device="cpu", executor="local")
    summaries = run_graphs(PAIR, outputs=[tmp_path / "sweep" / "pnp", tmp_path / "sweep" / "esam"],
                           cache_dir=tmp_path / "cache", **kw)
    swept = dict(calls)
    pnp, esam = summaries
    # the esam graph's image, pixels and GradCAM are the pnp graph's: computed once, in memory
    for node in ("image", "pixels", "gradcam"):
        assert pnp.nodes[node].computed_shards == pnp.shards and esam.nodes[node].computed_shards == 0, node
    alone = {}
    for path, name in zip(PAIR, ("pnp", "esam")):
        calls.clear()
        run_graph(path, output=tmp_path / "alone" / name, cache_dir=tmp_path / f"cache_{name}", **kw)
        alone[name] = dict(calls)
        a = pq.read_table(tmp_path / "alone" / name / "results.parquet")
        b = pq.read_table(tmp_path / "sweep" / name / "results.parquet")
        assert a.equals(b), name
    # the shared stages ran as often in the sweep as in one graph alone
    for stage in ("load_image", "preprocess_image", "itm_gradcam"):
        assert swept[stage] == alone["pnp"][stage] == alone["esam"][stage], stage
    manifest = json.loads((tmp_path / "sweep" / "esam" / "manifest.json").read_text())
    assert manifest["arguments"]["sweep"] == [str(p) for p in PAIR] and manifest["status"] == "finished"


def test_a_sweep_on_ray_equals_the_local_one(tmp_path, ray_session):
    # local: this process's CPUs as threads; Ray: each worker its CPU share (1 here). Other thread
    # counts reduce floats in another order: equal within the stated tolerance (docs/store.md)
    kw = dict(overrides=SMALL, presets=["tiny"], progress=False, device="cpu")
    run_graphs(PAIR, executor="local", outputs=[tmp_path / "l1", tmp_path / "l2"], cache_dir=tmp_path / "lc", **kw)
    summaries = run_graphs(PAIR, executor="ray", outputs=[tmp_path / "r1", tmp_path / "r2"],
                           cache_dir=tmp_path / "rc", **kw)
    assert summaries[1].nodes["gradcam"].computed_shards == 0 and summaries[0].workers
    for a, b in (("l1", "r1"), ("l2", "r2")):
        assert_tables_close(pq.read_table(tmp_path / a / "results.parquet"), pq.read_table(tmp_path / b / "results.parquet"))


def test_equal_thread_counts_give_bit_equal_results_on_either_executor(tmp_path, ray_session):
    kw = dict(overrides=SMALL, presets=["tiny"], progress=False, device="cpu", threads=1)
    run_graphs(PAIR, executor="local", outputs=[tmp_path / "l1", tmp_path / "l2"], cache_dir=tmp_path / "lc", **kw)
    run_graphs(PAIR, executor="ray", outputs=[tmp_path / "r1", tmp_path / "r2"], cache_dir=tmp_path / "rc", **kw)
    for a, b in (("l1", "r1"), ("l2", "r2")):
        assert pq.read_table(tmp_path / a / "results.parquet").equals(pq.read_table(tmp_path / b / "results.parquet"))


def test_a_result_cached_on_ray_is_served_to_a_local_run(tmp_path, ray_session, calls):
    # neither the executor nor the thread count is part of a key: the local run (other threads)
    # computes nothing and gives the Ray run's results, bit for bit
    kw = dict(overrides=SMALL, presets=["tiny"], progress=False, device="cpu", cache_dir=tmp_path / "cache")
    run_graph(PAIR[1], executor="ray", output=tmp_path / "ray", threads=1, **kw)
    summary = run_graph(PAIR[1], executor="local", output=tmp_path / "local", threads=2, **kw)
    assert sum(calls.values()) == 0 and all(n.computed_shards == 0 for n in summary.nodes.values())
    assert pq.read_table(tmp_path / "local" / "results.parquet").equals(pq.read_table(tmp_path / "ray" / "results.parquet"))


def test_a_sweep_needs_one_dataset_and_distinct_names(tmp_path):
    with pytest.raises(UsageError, match="one dataset with one shard_size"):
        run_graphs([PAIR[0], GRAPHS / "oracle_heatmap.yaml"], executor="local", progress=False, device="cpu",
                   outputs=[tmp_path / "a", tmp_path / "b"], cache_dir=tmp_path / "c")
    with pytest.raises(UsageError, match="distinct names"):
        run_graphs([PAIR[0], PAIR[0]], presets=["tiny"], executor="local", progress=False, device="cpu",
                   outputs=[tmp_path / "a", tmp_path / "b"], cache_dir=tmp_path / "c")
