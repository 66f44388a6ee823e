"""Executors: ``local`` (in-process) and ``ray`` (one pool of actors per node, each loading
its model once; Ray schedules the (node, shard) tasks from their data dependencies).

Both walk the same shard plans and use the same ``NodeRunner``, so the same inputs and
seeds give the same results.
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import Callable, Iterable, Iterator

import pyarrow as pa
from tqdm import tqdm

from runtime.node_runner import NodeRunner, NodeStats
from runtime.run import RunContext, ShardPlan, node_device
from runtime.shards import Shard


class Progress:
    """One bar for shards plus one per node (rows processed or served from the cache)."""

    def __init__(self, ctx: RunContext, total_samples: int | None, enabled: bool):
        self.enabled = enabled
        self.samples = tqdm(total=total_samples, desc="samples", unit="q", position=0, disable=not enabled,
                            dynamic_ncols=True, leave=True)
        self.nodes = {
            name: tqdm(total=total_samples, desc=f"  {name}", unit="q", position=i + 1, disable=not enabled,
                       dynamic_ncols=True, leave=True)
            for i, name in enumerate(ctx.graph.nodes)
        }

    def node(self, name: str, shard: Shard) -> None:
        self.nodes[name].update(shard.num_samples)

    def shard(self, shard: Shard, cached_nodes: Iterable[str] = ()) -> None:
        for name in cached_nodes:
            self.nodes[name].update(shard.num_samples)
        self.samples.update(shard.num_samples)

    def close(self) -> None:
        for bar in [*self.nodes.values(), self.samples]:
            bar.close()


def _cached_only(plan: ShardPlan, ctx: RunContext) -> list[str]:
    return [n for n in ctx.graph.nodes if n not in plan.compute]


def run_local(ctx: RunContext, shards: Iterator[Shard], device: str, progress: Progress) -> None:
    """Run every shard in this process, node by node in topological order."""
    runners = {name: NodeRunner(node, ctx.per_image) for name, node in ctx.graph.nodes.items()}
    for shard in shards:
        plan = ctx.plan(shard)
        if plan is None:
            ctx.note_part_reused()
            progress.shard(shard, ctx.graph.nodes)
            continue
        tables: dict[str, pa.Table] = dict(plan.loaded)
        ctx.note_cached(plan)
        for name in plan.compute:
            runner = runners[name]
            runner.setup(node_device(runner.stage, device))  # models load on first use: a fully cached run loads none
            tables[name], stats = runner.run(shard, tables)
            ctx.save(plan, name, tables[name], stats)
            progress.node(name, shard)
        ctx.write_part(plan, tables)
        progress.shard(shard, _cached_only(plan, ctx))


# --- Ray ----------------------------------------------------------------------------------

def init_ray(address: str | None, quiet: bool = True) -> bool:
    """Connect to ``address`` or start an embedded local Ray; returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, configure_logging=True, logging_level="ERROR",
                  log_to_driver=not quiet)
    if address:
        ray.init(address=address, **kwargs)
    else:
        total = _memory_bytes()
        ray.init(num_cpus=os.cpu_count() or 1,
                 object_store_memory=int(min(2 * 2**30, max(256 * 2**20, total * 0.15))), **kwargs)
    return True


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


class _NodeActor:
    """Body of the Ray actor that holds one node's stage."""

    def __init__(self, node, per_image: set[str], device: str):
        self.runner = NodeRunner(node, per_image)
        self.device = device

    def run(self, shard: Shard, names: list[str], *tables: pa.Table) -> tuple[pa.Table, NodeStats]:
        self.runner.setup(self.device)
        return self.runner.run(shard, dict(zip(names, tables)))


def actor_resources(ctx: RunContext, cluster_cpus: float, cluster_gpus: float, device: str) -> dict[str, dict]:
    """Replicas and per-actor CPU/GPU requests so every actor fits at once (no deadlock).

    GPU stages ask for their declared GPU fraction; when one replica of each fits several times
    into the cluster's GPUs, each gets that many replicas, and when they do not all fit, the
    fractions are scaled down together (a model's memory is its own; the fraction only places
    actors). Every actor gets an equal slice of the CPUs left after one for the driver.
    """
    use_gpu = device != "cpu" and cluster_gpus > 0
    want = {n: (nd.stage.resources.gpu if use_gpu else 0.0) for n, nd in ctx.graph.nodes.items()}
    one_each = sum(want.values())
    sets = max(1, int(cluster_gpus / one_each)) if one_each else 1
    plan: dict[str, dict] = {}
    for name, node in ctx.graph.nodes.items():
        replicas = node.replicas or (sets if want[name] else 1)
        plan[name] = {"replicas": replicas, "num_gpus": want[name]}
    asked = sum(p["num_gpus"] * p["replicas"] for p in plan.values())
    scale = min(1.0, cluster_gpus / asked) if asked else 1.0
    for p in plan.values():
        p["num_gpus"] = math.floor(p["num_gpus"] * scale * 1000) / 1000
    total_actors = sum(p["replicas"] for p in plan.values())
    cpu_each = max(0.01, min(1.0, (cluster_cpus - 1.0) / total_actors if cluster_cpus > 1 else 0.5 / total_actors))
    for p in plan.values():
        p["num_cpus"] = math.floor(cpu_each * 100) / 100
    return plan


def run_ray(ctx: RunContext, shards: Iterator[Shard], device: str, progress: Progress,
            connect: Callable[[], None]) -> None:
    """Submit each shard's (node, shard) tasks to per-node actor pools; write results as they land.

    ``connect`` starts or joins Ray; it is called only when a shard needs computing, so a run
    served entirely from finished parts starts no cluster.
    """
    import ray

    pools: dict[str, list] = {}
    window = 2
    in_flight: deque = deque()

    def start_pools() -> None:
        nonlocal window
        connect()
        resources = ray.cluster_resources()
        res = actor_resources(ctx, resources.get("CPU", 1.0), resources.get("GPU", 0.0), device)
        actor_cls = ray.remote(_NodeActor)
        # workers see the driver's settings (weights folder, debug flags), on any cluster
        env = {k: v for k, v in os.environ.items() if k.startswith(("PNPVQA_", "RUNTIME_"))}
        for name, node in ctx.graph.nodes.items():
            r = res[name]
            actor_device = "cuda" if r["num_gpus"] > 0 else "cpu"
            options = dict(num_cpus=r["num_cpus"], num_gpus=r["num_gpus"], max_concurrency=1)
            if env:
                options["runtime_env"] = {"env_vars": env}
            pools[name] = [actor_cls.options(**options).remote(node, ctx.per_image, actor_device)
                           for _ in range(r["replicas"])]
        window = max(2, 2 * max(len(p) for p in pools.values()))

    def submit(plan: ShardPlan) -> dict:
        shard_ref = ray.put(plan.shard)
        refs: dict[str, tuple] = {}
        for name in plan.load:
            refs[name] = (ray.put(plan.loaded[name]), None)
        ctx.note_cached(plan)
        for name in plan.compute:
            ups = ctx.graph.upstream(name)
            pool = pools[name]
            actor = pool[plan.shard.index % len(pool)]
            table_ref, stats_ref = actor.run.options(num_returns=2).remote(
                shard_ref, ups, *[refs[u][0] for u in ups])
            refs[name] = (table_ref, stats_ref)
        return {"plan": plan, "refs": refs, "pending": {refs[n][1]: n for n in plan.compute}}

    def drain(item: dict, block: bool) -> bool:
        """Save node results of one shard as they finish; True when the shard is complete."""
        plan = item["plan"]
        while item["pending"]:
            ready, _ = ray.wait(list(item["pending"]), num_returns=1, timeout=None if block else 0)
            if not ready:
                return False
            name = item["pending"].pop(ready[0])
            stats = ray.get(ready[0])
            table = ray.get(item["refs"][name][0])
            ctx.save(plan, name, table, stats)
            progress.node(name, plan.shard)
        tables = {n: ray.get(item["refs"][n][0]) for n in plan.final}
        ctx.write_part(plan, tables)
        progress.shard(plan.shard, _cached_only(plan, ctx))
        return True

    try:
        for shard in shards:
            plan = ctx.plan(shard)
            if plan is None:
                ctx.note_part_reused()
                progress.shard(shard, ctx.graph.nodes)
                continue
            if not pools:
                start_pools()
            in_flight.append(submit(plan))
            while in_flight and drain(in_flight[0], block=False):
                in_flight.popleft()
            while len(in_flight) >= window:
                drain(in_flight.popleft(), block=True)
        while in_flight:
            drain(in_flight.popleft(), block=True)
    finally:
        for pool in pools.values():
            for actor in pool:
                ray.kill(actor)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


__all__ = ["Progress", "run_local", "run_ray", "init_ray", "stop_ray", "actor_resources"]
