"""The Ray executor: the local executor's results, workers sized from the cluster, placement on
(logical) GPUs, a worker killed mid-run survived."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import stages
from conftest import GRAPHS, RAY_OPTIONS
from runtime.api import run_graph
from runtime.errors import UsageError
from runtime import ray_executor
from runtime.ray_executor import KEPT_WORKERS, MAX_CPU_WORKERS, plan_workers
from runtime.graph import load_graph
from runtime.run import RunContext
from stages.heatmaps import SamplePatches

pytestmark = pytest.mark.slow

SMALL = ["dataset.num_images=6", "shard_size=8"]


def local_reference(tmp_path, graph=GRAPHS / "oracle_heatmap.yaml", overrides=SMALL):
    run_graph(graph, overrides=overrides, executor="local", output=tmp_path / "local",
              cache_dir=tmp_path / "cache_local", progress=False, device="cpu")
    return pq.read_table(tmp_path / "local" / "results.parquet")


def test_ray_and_local_give_identical_results(tmp_path, ray_session):
    want = local_reference(tmp_path)
    summary = run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=SMALL, executor="ray", output=tmp_path / "ray",
                        cache_dir=tmp_path / "cache_ray", progress=False, device="cpu")
    assert summary.samples == 24 and all(s.computed_shards == summary.shards for s in summary.nodes.values())
    assert pq.read_table(tmp_path / "ray" / "results.parquet").equals(want)
    # two workers on the two CPUs, each with one thread
    assert len(summary.workers) == 2 and {w["threads"] for w in summary.workers} == {1}
    # a second Ray run is served from the finished parts without starting any worker
    again = run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=SMALL, executor="ray", output=tmp_path / "ray",
                      cache_dir=tmp_path / "cache_ray", progress=False, device="cpu")
    assert all(s.computed_shards == 0 for s in again.nodes.values()) and again.workers == []


def test_ray_partial_cache_mixes_loaded_and_computed_nodes(tmp_path, ray_session):
    kw = dict(executor="ray", cache_dir=tmp_path / "cache", progress=False, device="cpu")
    run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=SMALL, output=tmp_path / "a", **kw)
    summary = run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=[*SMALL, "enhance.alpha=0.3"],
                        output=tmp_path / "b", **kw)
    computed = {n for n, s in summary.nodes.items() if s.computed_shards}
    assert computed == {"enhance", "patches", "enhanced_metrics"}
    want = local_reference(tmp_path, overrides=[*SMALL, "enhance.alpha=0.3"])
    assert pq.read_table(tmp_path / "b" / "results.parquet").equals(want)


def _ctx(tmp_path, graph, device):
    return RunContext(load_graph(GRAPHS / graph), tmp_path, None, set(), device=device)


def test_workers_fit_the_cluster(tmp_path):
    oracle = _ctx(tmp_path, "oracle_heatmap.yaml", "cpu")
    assert plan_workers(oracle, 2.0, 0.0) == plan_workers(oracle, 2.0, 8.0)  # no model stage: no GPU
    two = plan_workers(oracle, 2.0, 0.0)
    assert (two.count, two.num_cpus, two.num_gpus, two.threads) == (2, 1.0, 0.0, 1)
    assert plan_workers(oracle, 1.0, 0.0).count == 1
    big = plan_workers(oracle, 16.0, 0.0)
    assert big.count == MAX_CPU_WORKERS and big.threads == 16 // MAX_CPU_WORKERS
    assert plan_workers(oracle, 16.0, 0.0, workers=16).num_cpus == 1.0
    esam = _ctx(tmp_path, "esam_enhanced.yaml", "cuda")
    assert sum(nd.stage.resources.gpu for nd in esam.graph.nodes.values()) > 1  # the models share one GPU
    for gpus in (1.0, 2.0, 8.0):
        p = plan_workers(esam, 16.0, gpus)
        assert p.num_gpus == 1.0 and p.count == int(gpus) and p.count * p.num_cpus <= 16.0
    half = plan_workers(esam, 16.0, 2.0, gpus_per_worker=0.5)
    assert half.count == 4 and half.num_gpus == 0.5
    assert plan_workers(esam, 16.0, 4.0, gpus_per_worker=2).count == 2
    assert plan_workers(esam, 16.0, 8.0, workers=3).count == 3
    with pytest.raises(UsageError, match="asks for 2 GPUs but the Ray cluster has 1"):
        plan_workers(esam, 16.0, 1.0, gpus_per_worker=2)
    assert plan_workers(_ctx(tmp_path, "esam_enhanced.yaml", "cpu"), 16.0, 8.0).num_gpus == 0.0


def test_workers_see_only_their_gpus(tmp_path, own_ray):
    """Logical GPUs on this CPU machine: each worker is given its own GPU ids, and
    CUDA_VISIBLE_DEVICES says exactly those (models compute on the CPU here: --device cpu)."""
    own_ray.init(num_cpus=2, num_gpus=2, object_store_memory=256 * 2**20, **RAY_OPTIONS)
    kw = dict(overrides=SMALL, executor="ray", cache_dir=tmp_path / "cache", progress=False, device="cpu")
    one = run_graph(GRAPHS / "oracle_heatmap.yaml", output=tmp_path / "one", gpus_per_worker=1, **kw)
    ids = [w["gpu_ids"] for w in one.workers]
    assert len(ids) == 2 and sorted(i for g in ids for i in g) == ["0", "1"]
    assert all(w["cuda_visible_devices"] == ",".join(w["gpu_ids"]) for w in one.workers)
    two = run_graph(GRAPHS / "oracle_heatmap.yaml", output=tmp_path / "two", gpus_per_worker=2, **kw)
    assert [sorted(w["gpu_ids"]) for w in two.workers] == [["0", "1"]]
    assert sorted(two.workers[0]["cuda_visible_devices"].split(",")) == ["0", "1"]
    shared = run_graph(GRAPHS / "oracle_heatmap.yaml", output=tmp_path / "shared", gpus_per_worker=0.5, **kw)
    per_gpu: dict[str, int] = {}
    for w in shared.workers:
        assert len(w["gpu_ids"]) == 1
        per_gpu[w["gpu_ids"][0]] = per_gpu.get(w["gpu_ids"][0], 0) + 1
    assert sorted(per_gpu.values()) == [2, 2]  # two workers share each GPU
    want = pq.read_table(tmp_path / "one" / "results.parquet")
    assert pq.read_table(tmp_path / "shared" / "results.parquet").equals(want)


class SlowPatches(SamplePatches):
    """sample_patches with a pause, so a run lasts long enough to kill a worker in it."""

    name = "slow_patches"

    def process(self, batch):
        time.sleep(0.4)
        return super().process(batch)


@pytest.fixture
def slow_graph(write_graph, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    monkeypatch.setitem(stages.STAGES, "slow_patches", SlowPatches)
    yield write_graph(f"""
        extends: {GRAPHS / 'oracle_heatmap.yaml'}
        name: slow
        shard_size: 4
        dataset: {{params: {{num_images: 16}}}}
        nodes:
          patches: {{stage: slow_patches, params: {{num_captions: 3}}, inputs: {{heatmap: enhance.heatmap}}}}
        """)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def run_in_thread(**kw):
    result: dict = {}

    def target():
        try:
            result["summary"] = run_graph(**kw)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def wait_for_workers(out, thread, timeout=120):
    """The pids of the run's workers, once they run and a part is written."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert thread.is_alive(), "the run ended before a worker could be killed"
        try:
            workers = json.loads((out / "manifest.json").read_text()).get("workers") or []
        except (FileNotFoundError, ValueError):
            workers = []
        if workers and list((out / "parts").glob("part-*.parquet")):
            return [w["pid"] for w in workers]
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


def test_a_killed_worker_is_restarted_and_its_shard_retried(tmp_path, slow_graph, ray_session, caplog):
    want = local_reference(tmp_path, graph=slow_graph, overrides=[])
    out = tmp_path / "ray"
    thread, result = run_in_thread(graph=slow_graph, executor="ray", output=out, cache_dir=tmp_path / "cache",
                                   progress=False, device="cpu")
    pids = wait_for_workers(out, thread)
    os.kill(pids[0], signal.SIGKILL)  # as the out-of-memory killer would
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.errors == 0 and "worker was lost" in caplog.text
    assert pq.read_table(out / "results.parquet").equals(want)


def test_every_worker_lost_fails_the_shards_left_transiently_and_keeps_the_finished(tmp_path, slow_graph, ray_session,
                                                                                    monkeypatch, caplog):
    want = local_reference(tmp_path, graph=slow_graph, overrides=[])
    KEPT_WORKERS.drop()  # workers kept from earlier tests may restart: these must not
    monkeypatch.setattr(ray_executor, "ACTOR_RESTARTS", 0)  # a cluster with no room to restart them
    out = tmp_path / "ray"
    kw = dict(graph=slow_graph, executor="ray", output=out, cache_dir=tmp_path / "cache", progress=False, device="cpu")
    thread, result = run_in_thread(**kw)
    for pid in wait_for_workers(out, thread):
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert "every Ray worker was lost" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    rows = pq.read_table(out / "results.parquet")
    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    summary = result["summary"]
    assert ok.num_rows > 0 and summary.transient_errors == rows.num_rows - ok.num_rows > 0
    assert ok.equals(want.filter(pc.is_in(want.column("sample_id"), ok.column("sample_id"))))
    again = run_graph(**kw)  # the next run computes the failed shards only
    assert again.shards_from_parts > 0 and again.errors == 0
    assert pq.read_table(out / "results.parquet").equals(want)


def test_workers_that_cannot_see_the_run_folder_stop_the_run(tmp_path):
    """Every worker looks for a file the driver wrote in the run folder and the cache; one that
    cannot see them (a folder local to the driver's machine) stops the run before any shard."""
    from artifacts.location import Location
    from runtime.ray_executor import check_workers_see, storage_probes

    ctx = RunContext(load_graph(GRAPHS / "oracle_heatmap.yaml"), tmp_path / "out", None, set())
    probes = storage_probes([ctx])
    assert [p.seen() for p in probes] == [True]  # no cache: the run folder only
    check_workers_see(probes, [{"host": "a", "sees": [True]}])
    with pytest.raises(UsageError, match=f"worker on b .* cannot see {tmp_path / 'out'}: .*shared filesystem"):
        check_workers_see(probes, [{"host": "a", "sees": [True]}, {"host": "b", "node_id": "n2", "sees": [False]}])
    assert isinstance(probes[0].loc, Location)


def test_ray_progress_moves_as_batches_finish_and_ends_exact(tmp_path, ray_session, slow_graph, capsys):
    from runtime.settings import RunSettings

    summary = run_graph(slow_graph, overrides=["dataset.num_images=8", "shard_size=16", "patches.batch_size=1"],
                        executor="ray", output=tmp_path / "o", cache_dir=tmp_path / "cache", device="cpu",
                        progress=True, settings=RunSettings(progress_seconds=0.0))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[progress]")]
    assert any(line.endswith("Ray workers...") for line in lines) and any("Ray workers up in" in line for line in lines)
    counts = [line for line in lines if " samples, " in line]
    total = summary.samples
    # a worker's batches show before its shard is done (patches: 4 batches of 0.4 s a shard)
    assert any(f"/{total} samples" in line and "shard " in line for line in counts), lines
    assert counts[-1].startswith(f"[progress] {total}/{total} samples") and sum(f" {total}/{total}" in c for c in counts) == 1
