"""``run_graph``: the one entry point the CLI, the tests and the benchmarks call."""

from __future__ import annotations

import os
from pathlib import Path

from artifacts.location import Location
from artifacts.store import Store
from runtime.errors import GraphError, Problem, UsageError
from runtime.executors import Progress, init_ray, run_local, run_ray, stop_ray
from runtime.graph import Graph, load_graph
from runtime.run import RunContext, RunSummary
from runtime.shard_work import PARTS
from runtime.run_lock import RunLock
from runtime.records import check_dataset
from runtime.shards import iter_shards, select_samples

DEFAULT_CACHE = ".runtime_cache"
EXECUTORS = ("auto", "ray", "local")
# `auto` picks Ray from this many samples on (or when joining a cluster): below it, Ray's start-up
# (about 25 s on 2 cores, bench/results/ray_engine.md) costs more than a second worker saves
AUTO_RAY_SAMPLES = 500


def default_cache_dir() -> Path:
    return Path(os.environ.get("RUNTIME_CACHE_DIR", DEFAULT_CACHE))


def default_output(graph: Graph) -> Path:
    return Path("runs") / graph.name


def folder_location(where: str | Path | Location, option: str) -> Location:
    """A folder given on the command line (path or URI), refused when it is a file."""
    try:
        loc = where if isinstance(where, Location) else Location(where)
    except ValueError as exc:
        raise UsageError(f"{option} {where}: {exc}") from None
    if loc.is_file():
        raise UsageError(f"{option} {where}: this is a file; {option} takes a folder (it is created if missing)")
    return loc


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda; got '{device}'")
    if device == "cpu":
        return "cpu"
    import torch  # only to ask whether a GPU is there

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here (check CUDA_VISIBLE_DEVICES or use --device cpu)")
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_executor(executor: str, address: str | None, samples: int) -> str:
    """``auto``: Ray for a cluster (``address``) or a run of at least ``AUTO_RAY_SAMPLES``
    samples on a machine with more than one CPU; the local executor otherwise."""
    if executor != "auto":
        return executor
    if address:
        return "ray"
    return "ray" if samples >= AUTO_RAY_SAMPLES and (os.cpu_count() or 1) > 1 else "local"


def check_sources(graph: Graph) -> None:
    problems = [Problem(graph.path, None, f"dataset.params.{f}", msg) for f, msg in graph.source.problems()]
    if problems:
        raise GraphError(problems)


def run_graph(
    graph: str | Path | Graph,
    *,
    overrides: list[str] | None = None,
    presets: list[str] | None = None,
    executor: str = "auto",
    output: str | Path | Location | None = None,
    cache_dir: str | Path | Location | None = None,
    no_cache: bool = False,
    force: list[str] | None = None,
    limit: int | None = None,
    ids: set[str] | None = None,
    device: str = "auto",
    address: str | None = None,
    progress: bool = True,
    arguments: dict | None = None,
    retry_errors: bool = False,
    wait: bool = False,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
) -> RunSummary:
    """Validate ``graph`` and run it; every problem found before work raises ``GraphError``."""
    if not isinstance(graph, Graph):
        graph = load_graph(graph, overrides, presets=presets or ())
    if executor not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}; got '{executor}'")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be a positive number of samples; got {limit}")
    for name in force or []:
        if name not in graph.nodes:
            raise UsageError(f"--force {name}: no such node in {graph.path}; nodes: {', '.join(graph.nodes)}")
    check_sources(graph)
    dataset = check_dataset(select_samples(graph.source.iter_samples(), ids, limit), ids,
                            source=f"the dataset of {graph.path} ({graph.source.name})")
    executor = choose_executor(executor, address, dataset.samples)
    started: list[bool] = []

    def connect() -> None:
        if not started:
            started.append(init_ray(address))

    try:
        if executor == "ray" and address and device == "auto":  # the driver may have no GPU, the cluster may
            import ray

            connect()
            device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        device = resolve_device(device)
        out = folder_location(output or default_output(graph), "--output")
        store = None if no_cache else Store(folder_location(cache_dir or default_cache_dir(), "--cache"))
        args = dict(arguments or {}, executor=executor, limit=limit, device=device, no_cache=no_cache,
                    force=list(force or []), ids=sorted(ids) if ids else None, retry_errors=retry_errors,
                    workers=workers, gpus_per_worker=gpus_per_worker)
        with RunLock(out, command=str((arguments or {}).get("graph", graph.path))) as lock:
            lock.acquire(wait=wait)
            ctx = RunContext(graph, out, store, set(force or []), device=device, retry_errors=retry_errors)
            ctx.clean_output()
            if no_cache:
                out.delete_dir(PARTS)
            ctx.write_manifest("running", executor, device, args)
            bars = Progress(ctx, dataset.samples, progress)
            shards = iter_shards(graph.source, graph.shard_size, ids=ids, limit=limit)
            try:
                if executor == "local":
                    run_local(ctx, shards, bars)
                else:
                    run_ray(ctx, shards, bars, connect, workers=workers, gpus_per_worker=gpus_per_worker)
            finally:
                bars.close()
            return ctx.finish(executor, device, args)
    finally:
        if any(started):
            stop_ray()
