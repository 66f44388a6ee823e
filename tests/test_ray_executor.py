"""The Ray executor gives the local executor's results; actor requests never oversubscribe."""

from __future__ import annotations

import pyarrow.parquet as pq

from conftest import GRAPHS
from runtime.api import run_graph
from runtime.executors import actor_resources
from runtime.graph import load_graph
from runtime.run import RunContext

SMALL = ["dataset.num_images=6", "shard_size=8"]


def test_ray_and_local_give_identical_results(tmp_path, ray_session):
    results = {}
    for executor in ("local", "ray"):
        summary = run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=SMALL, executor=executor,
                            output=tmp_path / executor, cache_dir=tmp_path / f"cache_{executor}",
                            progress=False, device="cpu")
        assert summary.samples == 24 and all(s.computed_shards == summary.shards for s in summary.nodes.values())
        results[executor] = pq.read_table(tmp_path / executor / "results.parquet")
    assert results["ray"].equals(results["local"])
    # a second Ray run is served from the cache (and from the finished parts)
    again = run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=SMALL, executor="ray", output=tmp_path / "ray",
                      cache_dir=tmp_path / "cache_ray", progress=False, device="cpu")
    assert all(s.computed_shards == 0 for s in again.nodes.values())


def test_ray_partial_cache_mixes_loaded_and_computed_nodes(tmp_path, ray_session):
    kw = dict(executor="ray", cache_dir=tmp_path / "cache", progress=False, device="cpu")
    run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=SMALL, output=tmp_path / "a", **kw)
    summary = run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=[*SMALL, "enhance.alpha=0.3"],
                        output=tmp_path / "b", **kw)
    computed = {n for n, s in summary.nodes.items() if s.computed_shards}
    assert computed == {"enhance", "patches", "enhanced_metrics"}
    local = run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=[*SMALL, "enhance.alpha=0.3"], executor="local",
                      output=tmp_path / "c", cache_dir=tmp_path / "cache_local", progress=False, device="cpu")
    assert local.samples == summary.samples
    assert pq.read_table(tmp_path / "b" / "results.parquet").equals(pq.read_table(tmp_path / "c" / "results.parquet"))


def test_actor_requests_fit_two_cpus(tmp_path):
    g = load_graph(GRAPHS / "oracle_heatmap.yaml")
    ctx = RunContext(g, tmp_path, None, set())
    res = actor_resources(ctx, cluster_cpus=2.0, cluster_gpus=0.0, device="cpu")
    total = sum(r["num_cpus"] * r["replicas"] for r in res.values())
    assert total <= 1.0 and all(r["num_gpus"] == 0 for r in res.values())
    # on a 1-CPU cluster too
    res = actor_resources(ctx, cluster_cpus=1.0, cluster_gpus=0.0, device="cpu")
    assert sum(r["num_cpus"] * r["replicas"] for r in res.values()) <= 1.0


def test_gpu_requests_fit_the_cluster(tmp_path):
    g = load_graph(GRAPHS / "esam_enhanced.yaml")
    ctx = RunContext(g, tmp_path, None, set())
    declared = {n: nd.stage.resources.gpu for n, nd in g.nodes.items()}
    assert sum(declared.values()) > 1  # the model stages together ask for more than one GPU
    for gpus in (1.0, 2.0, 8.0):
        res = actor_resources(ctx, cluster_cpus=16.0, cluster_gpus=gpus, device="cuda")
        assert sum(r["num_gpus"] * r["replicas"] for r in res.values()) <= gpus + 1e-9
        assert all(r["num_gpus"] > 0 for n, r in res.items() if declared[n] > 0)
        assert sum(r["num_cpus"] * r["replicas"] for r in res.values()) <= 15.0
    eight = actor_resources(ctx, cluster_cpus=16.0, cluster_gpus=8.0, device="cuda")
    assert eight["gradcam"]["replicas"] >= 2 and eight["image"]["replicas"] == 1
    # --device cpu on a GPU cluster asks for no GPU
    assert all(r["num_gpus"] == 0 for r in actor_resources(ctx, 16.0, 8.0, "cpu").values())
