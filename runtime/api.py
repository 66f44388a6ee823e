"""``run_graph``: the one entry point the CLI, the tests and the benchmarks call."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from artifacts.location import Location
from artifacts.store import Store
from runtime.errors import GraphError, Problem, UsageError
from runtime.executors import available_cpus, run_local
from runtime.graph import Graph, load_graph
from runtime.progress import Progress
from runtime.ray_executor import RayConnection, RayRunner
from runtime.records import DatasetCheck, check_dataset
from runtime.run import RunContext, RunSummary, sweep_shares
from runtime.run_folder import RunFolder
from runtime.settings import RunSettings
from runtime.shards import iter_shards, select_samples

log = logging.getLogger(__name__)

DEFAULT_CACHE = ".runtime_cache"
EXECUTORS = ("auto", "ray", "local")
# `auto` picks Ray from this many samples on (or when joining a cluster): below it, Ray's start-up
# (about 25 s on 2 cores, bench/results/ray_engine.md) costs more than a second worker saves
AUTO_RAY_SAMPLES = 500
# records read by the dataset check are kept for the run up to this size: a small dataset is read
# once; a bigger one is read again shard by shard, so that memory does not grow with it
KEEP_RECORDS_BYTES = 16 * 2**20


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


def cuda_available() -> bool:
    """Whether models can run on CUDA here. torch is asked only when an NVIDIA driver is present
    (importing it costs seconds); without a driver, or with CUDA_VISIBLE_DEVICES empty, no."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()
            or shutil.which("nvidia-smi")):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda; got '{device}'")
    if device == "cpu":
        return "cpu"
    available = cuda_available()
    if device == "cuda" and not available:
        raise UsageError("--device cuda: no CUDA device is visible here (check CUDA_VISIBLE_DEVICES or use --device cpu)")
    return "cuda" if available else "cpu"


def choose_executor(executor: str, address: str | None, samples: int) -> str:
    """``auto``: Ray for a cluster (``address``) or a run of at least ``AUTO_RAY_SAMPLES``
    samples on a machine with more than one CPU; the local executor otherwise."""
    if executor != "auto":
        return executor
    if address:
        return "ray"
    return "ray" if samples >= AUTO_RAY_SAMPLES and (os.cpu_count() or 1) > 1 else "local"


def check_sources(graph: Graph) -> None:
    where, prefix = (graph.dataset_file, "params") if graph.dataset_file else (graph.path, "dataset.params")
    problems = [Problem(where, None, f"{prefix}.{f}", msg) for f, msg in graph.source.problems()]
    if problems:
        raise GraphError(problems)


def refuse_empty(samples: int, graph: Graph, limit: int | None) -> None:
    """Stop before any work when the dataset has no samples: the run would have no results."""
    if samples == 0:
        params = json.dumps(graph.raw["dataset"].get("params") or {})
        selected = f", so --limit {limit} selects none" if limit else ""
        raise UsageError(f"the dataset of {graph.path} ({graph.source.name}, params {params}) has no samples"
                         f"{selected}: nothing to run; check its file and params")


def dataset_check(graph: Graph, ids: set[str] | None, limit: int | None, display: Progress) -> DatasetCheck:
    """What the run needs to know of the selected samples before its first shard: read and
    checked record by record (``check_dataset``), unless the source vouches for them (its index
    has only plain, unique entries), so that a limited, resumed or extended run starts at once."""
    where = f"the dataset of {graph.path} ({graph.source.name})"
    if ids is None:
        try:
            samples = graph.source.vouched(limit)
        except ValueError as exc:
            raise UsageError(f"{where} cannot be read: {exc}") from None
        if samples is not None:
            display.note(f"dataset: {samples} records, vouched for by its question index (not read ahead)")
            return DatasetCheck(samples=samples)
    counted = [display.reading(select_samples(graph.source.iter_samples(), ids, limit))]

    def read():  # the first read is shown; another (to name duplicates) is not
        return counted.pop() if counted else select_samples(graph.source.iter_samples(), ids, limit)

    return check_dataset(read, ids, source=where, keep_bytes=KEEP_RECORDS_BYTES)


def run_graph(graph: str | Path | Graph, *, output: str | Path | Location | None = None, **options) -> RunSummary:
    """Validate ``graph`` and run it; every problem found before work raises ``GraphError``
    (options: those of :func:`run_graphs`)."""
    return run_graphs([graph], outputs=[output] if output is not None else None, **options)[0]


def run_graphs(
    graphs: list[str | Path | Graph],
    *,
    overrides: list[str] | None = None,
    presets: list[str] | None = None,
    overlays: list[str | Path] | None = None,
    executor: str = "auto",
    outputs: list[str | Path | Location] | None = None,
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
    threads: int | None = None,
    settings: RunSettings | None = None,
) -> list[RunSummary]:
    """Run one graph, or sweep several over one dataset in one pass: each shard goes through
    every graph in turn, a node with the same key in two graphs is computed once (uncached
    image-level work included), each model is loaded once, and each graph gets its own run
    folder as if run alone. ``settings``: debug, profile, weights... (default: this process's,
    ``RunSettings.from_environment``); ``overlays``: overlay files applied to each graph given
    by path (``--overlay``). Every problem found before work raises ``GraphError``
    or ``UsageError``."""
    settings = settings or RunSettings.from_environment()
    settings.apply_to_process()  # before any graph is loaded: its model nodes look for their weights
    graphs = [g if isinstance(g, Graph) else load_graph(g, overrides, presets=presets or (), overlays=overlays or ())
              for g in graphs]
    if not graphs:
        raise UsageError("give at least one graph")
    if executor not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}; got '{executor}'")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be a positive number of samples; got {limit}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be a positive number; got {threads}")
    for name in force or []:
        if not any(name in g.nodes for g in graphs):
            raise UsageError(f"--force {name}: no such node in {', '.join(g.path for g in graphs)}; nodes: "
                             f"{', '.join(dict.fromkeys(n for g in graphs for n in g.nodes))}")
    lead = graphs[0]
    for g in graphs[1:]:
        if (g.raw["dataset"], g.shard_size) != (lead.raw["dataset"], lead.shard_size):
            raise UsageError(f"a sweep runs its graphs over one dataset with one shard_size: {g.path} reads "
                             f"{g.raw['dataset']} (shard_size {g.shard_size}), {lead.path} reads "
                             f"{lead.raw['dataset']} (shard_size {lead.shard_size}); run them separately or "
                             "align them with --set")
    names = [g.name for g in graphs]
    if len(set(names)) != len(names):
        raise UsageError(f"the graphs of a sweep need distinct names (their run folders): {', '.join(names)}")
    if outputs is None:
        outputs = [default_output(g) for g in graphs]
    if len(outputs) != len(graphs):
        raise UsageError(f"{len(graphs)} graphs but {len(outputs)} output folders")
    for g in graphs:
        check_sources(g)
    display = Progress(progress, settings.progress_seconds)
    dataset = dataset_check(lead, ids, limit, display)
    refuse_empty(dataset.samples, lead, limit)
    executor = choose_executor(executor, address, dataset.samples * len(graphs))
    ray_connection = RayConnection(address)  # connects on first use: none for local runs
    try:
        if executor == "ray" and address and device == "auto":  # the driver may have no GPU, the cluster may
            import ray

            ray_connection.connect()
            device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        device = resolve_device(device)
        folders = [RunFolder(folder_location(o, "--output")) for o in outputs]
        store = None if no_cache else Store(folder_location(cache_dir or default_cache_dir(), "--cache"))
        args = dict(arguments or {}, executor=executor, limit=limit, device=device, no_cache=no_cache,
                    force=list(force or []), ids=sorted(ids) if ids else None, retry_errors=retry_errors,
                    workers=workers, gpus_per_worker=gpus_per_worker,
                    threads=threads or (available_cpus() if executor == "local" else "per worker: its CPU share"),
                    sweep=[g.path for g in graphs] if len(graphs) > 1 else None)
        with ExitStack() as stack:
            ctxs = []
            for g, folder in zip(graphs, folders):
                stack.enter_context(folder.lock(str((arguments or {}).get("graph", g.path)))).acquire(wait=wait)
                folder.remove_temp_files()  # of runs that died: the lock says none is live
                if no_cache:
                    folder.remove_parts()
                ctx = RunContext(g, folder, store, {n for n in force or [] if n in g.nodes}, device=device,
                                 retry_errors=retry_errors, settings=settings)
                ctx.begin(executor, device, args)
                ctxs.append(ctx)
            for warning in dict.fromkeys(w for ctx in ctxs for w in ctx.summary.warnings):  # once in a sweep
                log.warning("warning: %s", warning)
            display.start(ctxs, dataset.samples)
            shards = iter_shards(lead.source, lead.shard_size, ids=ids, limit=limit, records=dataset.records)
            try:
                if executor == "local":
                    run_local(ctxs, shards, display, threads=threads)
                else:
                    RayRunner(ctxs, display, ray_connection, settings, workers=workers, gpus_per_worker=gpus_per_worker,
                              threads=threads).run(shards)
            finally:
                display.close()
            sweep_seconds = time.time() - min(ctx.started for ctx in ctxs)  # one figure for every graph
            return [ctx.finish(executor, device, args, share, sweep_seconds)
                    for ctx, share in zip(ctxs, sweep_shares(ctxs))]
    finally:
        ray_connection.close()
