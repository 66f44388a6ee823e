"""Executors: ``local`` (shards one after another in this process) and ``ray`` (shards spread
over a pool of Ray actors, each running the whole graph on the shards it is given).

Both run the same ``ShardWork``, so the same inputs give the same results. On Ray the driver
plans which shards to run and hands each to a free worker; the worker reads the cached
inputs it needs from the store, computes the rest (uncached tensors such as decoded images
or SAM embeddings never leave it), writes its results to the store and the shard's part to the
run folder, and returns a small outcome. Nothing bigger than a shard's records passes through
the driver.

Why whole-graph workers rather than an actor per node: every node of a shard then runs in
one process (no object-store round trip per node, no 13 processes for a 13-node graph), a
shard goes to whichever worker is free, and models load once per worker. Workers are sized
from the cluster: on GPUs, one per ``gpus_per_worker`` (by default what the graph's model
stages declare, capped at one GPU: they share it); on CPUs, one per CPU up to
``MAX_CPU_WORKERS``, each with its share of threads.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from tqdm import tqdm

from runtime.errors import UsageError
from runtime.node_runner import loaded_torch
from runtime.run import RunContext
from runtime.shard_work import ShardOutcome, ShardWork
from runtime.shards import Shard

log = logging.getLogger(__name__)

MAX_CPU_WORKERS = 4       # CPU-only clusters: at most this many workers by default (each loads every model)
SHARD_ATTEMPTS = 3        # a shard whose worker is lost is tried this many times, then failed transiently
ACTOR_RESTARTS = 4        # a lost worker is restarted (when the cluster has room) this many times
BYTES_IN_FLIGHT = 0.25    # shards handed out hold at most this share of the object store
WORKER_WAIT = 600.0       # seconds to wait for a lost worker's restart when no other worker is left


class Progress:
    """Progress of a run (or a sweep of runs). On a terminal: one bar for samples plus one per
    node. Elsewhere (a log file, a cluster job): one plain line per node every
    ``PROGRESS_SECONDS`` (and at the end): samples done, rate, errors, time left."""

    def __init__(self, ctxs: list[RunContext], total_samples: int | None, enabled: bool, stream=None):
        self.total, self.enabled = total_samples, enabled
        self.stream = stream or sys.stderr
        self.plain = enabled and not self.stream.isatty()
        self.done, self.started, self.printed = 0, time.monotonic(), time.monotonic()
        self.interval = float(os.environ.get("RUNTIME_PROGRESS_SECONDS", "30"))
        prefix = len(ctxs) > 1
        self.nodes = [(f"{ctx.graph.name}/{name}" if prefix else name, node)
                      for ctx in ctxs for name, node in ctx.summary.nodes.items()]
        bars = enabled and not self.plain
        self.bars = [tqdm(total=total_samples, desc="samples", unit="q", position=0, dynamic_ncols=True,
                          leave=True, file=self.stream)] if bars else []
        if bars:
            self.bars += [tqdm(total=total_samples, desc=f"  {name}", unit="q", position=i + 1, dynamic_ncols=True,
                               leave=True, file=self.stream) for i, (name, _) in enumerate(self.nodes)]

    def shard(self, samples: int) -> None:
        self.done += samples
        for bar in self.bars:
            bar.update(samples)
        if self.plain and time.monotonic() - self.printed >= self.interval:
            self.lines()

    def lines(self) -> None:
        """One line per node: where the run stands."""
        self.printed = time.monotonic()
        elapsed = max(1e-9, self.printed - self.started)
        rate = self.done / elapsed
        total = f"/{self.total}" if self.total is not None else ""
        left = ""
        if self.total and rate > 0 and self.done < self.total:
            left = f", about {(self.total - self.done) / rate:.0f} s left"
        for name, node in self.nodes:
            print(f"[progress] {name}: {self.done}{total} samples, {rate:.1f}/s, {node.errors} errors{left}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self.bars:
            bar.close()
        if self.plain:
            self.lines()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def apply_threads(threads: int) -> None:
    """Use ``threads`` threads for torch's (and OpenMP / MKL's) CPU kernels in this process:
    set before any model library is imported, and on torch directly if it already is."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch = loaded_torch()
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_local(ctxs: list[RunContext], shards: Iterator[Shard], progress: Progress, threads: int | None = None) -> None:
    """Run every unfinished shard in this process (models load on first use), with ``threads``
    CPU threads (default: the CPUs this process may use). With several graphs (a sweep), each
    shard runs through every graph in turn, sharing the tables of nodes with the same key (the
    same work) and the set-up stages of the same identity."""
    apply_threads(threads or available_cpus())
    stage_cache: dict[str, object] = {}
    for ctx in ctxs:
        ctx.work.stage_cache = stage_cache
    for shard in shards:
        memo: dict[str, object] = {}
        for ctx in ctxs:
            if ctx.finished_part(shard) is None:
                ctx.absorb(ctx.work.run(shard, worker=worker_info(), memo=memo))
        progress.shard(shard.num_samples)


def worker_info() -> dict:
    """Where a worker runs: host, pid, the GPUs Ray gave it and what CUDA will see."""
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info.update(node_id=ctx.get_node_id(), gpu_ids=[str(g) for g in ray.get_gpu_ids()])
    return info


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


def stop_ray() -> None:
    import ray

    _POOL.clear()  # its workers end with the connection
    if ray.is_initialized():
        ray.shutdown()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    num_cpus: float
    num_gpus: float
    threads: int


def plan_workers(ctx: RunContext, cluster_cpus: float, cluster_gpus: float, workers: int | None = None,
                 gpus_per_worker: float | None = None) -> WorkerPlan:
    """How many workers and what each asks for, so that all of them fit in the cluster at once."""
    declared = [nd.stage.resources.gpu for nd in ctx.graph.nodes.values()]
    if gpus_per_worker is None:
        gpus_per_worker = max(max(declared, default=0.0), min(1.0, sum(declared))) if ctx.device == "cuda" else 0.0
    if gpus_per_worker < 0 or (workers is not None and workers < 1):
        raise UsageError("--workers must be >= 1 and --gpus-per-worker >= 0")
    if gpus_per_worker > 0:
        fit = int(math.floor(cluster_gpus / gpus_per_worker + 1e-9))
        if fit < 1:
            raise UsageError(f"each worker asks for {gpus_per_worker:g} GPUs but the Ray cluster has {cluster_gpus:g}; "
                             "use --device cpu, a smaller --gpus-per-worker, or a cluster with GPUs")
        count = min(workers or fit, fit)
    else:
        count = workers or max(1, min(int(cluster_cpus), MAX_CPU_WORKERS))
    num_cpus = math.floor(max(cluster_cpus, 0.01) / count * 100) / 100
    return WorkerPlan(count, max(0.01, num_cpus), gpus_per_worker, max(1, int(num_cpus)))


class ShardWorker:
    """Body of the Ray actor that runs whole shards (see the module doc).

    A worker outlives a run when the driver keeps its Ray connection (an embedded Ray started
    by someone else, a long-lived driver): the next run with the same worker plan reuses it,
    and its set-up stages (loaded models) of the same identity, so a sweep of graphs sharing
    nodes loads each model once. It keeps the stages the current run's graph uses, and drops
    the others when a run with another graph arrives.
    """

    def __init__(self, threads: int, env: dict[str, str]):
        # set here rather than as a Ray runtime_env (which costs a runtime-env agent round trip
        # and a fresh process per actor): no model library is imported in this process yet
        os.environ.update(env)
        apply_threads(threads)
        self.threads = threads
        self.run_id: str | None = None
        self.works: list[ShardWork] = []
        self.stages: dict[str, object] = {}

    def info(self, probes: tuple = ()) -> dict:
        """Where this worker is, and whether it sees each ``(location, file)`` the driver wrote."""
        return {**worker_info(), "threads": self.threads, "sees": [loc.exists(rel) for loc, rel in probes]}

    def _use(self, run_id: str, work_refs: list) -> list[ShardWork]:
        if run_id != self.run_id:
            import ray

            works = ray.get(work_refs)  # in a list: Ray passes them unresolved, fetched once per worker
            if any(w.device == "cuda" and any(nd.stage.resources.gpu for nd in w.nodes.values()) for w in works):
                import torch

                if not torch.cuda.is_available():
                    raise RuntimeError(f"this worker on {socket.gethostname()} was given GPUs "
                                       f"{os.environ.get('CUDA_VISIBLE_DEVICES')} but CUDA sees none")
            keep = {w.stage_key(name) for w in works for name in w.nodes}
            self.stages = {k: v for k, v in self.stages.items() if k in keep}
            for work in works:
                work.stage_cache = self.stages
            self.close()
            self.run_id, self.works = run_id, works
        return self.works

    def run(self, run_id: str, work_refs: list, todo: list[int], shard: Shard) -> list[ShardOutcome]:
        """The shard through the graphs ``todo`` (indexes into the run's works), sharing work."""
        works = self._use(run_id, work_refs)
        memo: dict[str, object] = {}
        where = {"pid": os.getpid(), "host": socket.gethostname()}
        return [works[i].run(shard, worker=where, memo=memo) for i in todo]

    def close(self) -> None:
        for work in self.works:
            work.close()


# workers kept between runs of this driver: (Ray job, plan, settings) -> actors
_POOL: dict[str, object] = {}


def _drop_pool() -> None:
    import ray

    for actor in _POOL.get("actors", []):
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - a handle of an earlier Ray session: nothing to stop
            pass
    _POOL.clear()


def shared_storage_probes(ctx: RunContext) -> list:
    """A small file in the run folder and one in the cache, for workers to look for."""
    probes = []
    for loc in (ctx.output, ctx.work.store_location):
        if loc is not None:
            rel = f".probe-{ctx.writer_id}"
            loc.write_bytes_atomic(rel, b"can you see me?", ctx.writer_id)
            probes.append((loc, rel))
    return probes


def check_workers_see(probes: list, infos: list[dict]) -> None:
    """Refuse to run when a worker cannot see the run folder or the cache (its results would be
    written where the driver never looks)."""
    for info in infos:
        blind = [loc.display() for (loc, _), seen in zip(probes, info.pop("sees")) if not seen]
        if blind:
            raise UsageError(f"the Ray worker on {info['host']} (node {str(info.get('node_id', '?'))[:12]}) cannot "
                             f"see {' and '.join(blind)}: the run folder and the cache must be on storage every "
                             "node reaches at the same path (a shared filesystem), or a URI such as s3://... "
                             "(README, 'Running on a Ray cluster')")


def _lost_worker_errors() -> tuple[type, ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
             "OutOfMemoryError", "ActorUnavailableError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def run_ray(ctxs: list[RunContext], shards: Iterator[Shard], progress: Progress, connect: Callable[[], None],
            workers: int | None = None, gpus_per_worker: float | None = None, threads: int | None = None) -> None:
    """Hand each unfinished shard to a free worker; collect outcomes as they come. With several
    graphs (a sweep), the worker runs the shard through each graph that still needs it.

    ``connect`` starts or joins Ray; it is called only when a shard needs computing, so a run
    served entirely from finished parts starts no cluster. A worker that dies (killed, out of
    memory, its node lost) is restarted by Ray when the cluster has room for it; its shard
    goes to another worker, up to ``SHARD_ATTEMPTS`` times, then its rows fail with a transient
    error that the next run retries.
    """
    import ray

    lead = ctxs[0]
    pool: list = []
    free: deque = deque()
    run_id, work_refs = uuid.uuid4().hex, []
    probes: dict = {}      # ref of a restarted worker's info() -> worker
    running: dict = {}     # ref -> (worker, shard, todo, bytes, attempt)
    in_flight = 0
    budget = 0
    lost = _lost_worker_errors()

    def start() -> None:
        nonlocal budget
        began = time.perf_counter()
        connect()
        res = ray.cluster_resources()
        plan = max((plan_workers(c, res.get("CPU", 1.0), res.get("GPU", 0.0), workers, gpus_per_worker)
                    for c in ctxs), key=lambda p: p.num_gpus)
        budget = int(BYTES_IN_FLIGHT * res.get("object_store_memory", 2**30))
        # workers see the driver's settings (weights folder, debug flags) and their thread share
        env = {k: v for k, v in os.environ.items() if k.startswith(("PNPVQA_", "RUNTIME_"))}
        plan = replace(plan, threads=threads or plan.threads)
        env.update(OMP_NUM_THREADS=str(plan.threads), MKL_NUM_THREADS=str(plan.threads))
        signature = repr((ray.get_runtime_context().get_job_id(), plan, sorted(env.items())))
        if _POOL.get("signature") == signature:
            pool.extend(_POOL["actors"])
        else:
            _drop_pool()
            actor = ray.remote(ShardWorker).options(
                num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_concurrency=1, max_restarts=ACTOR_RESTARTS,
                max_task_retries=0)
            pool.extend(actor.remote(plan.threads, env) for _ in range(plan.count))
            _POOL.update(signature=signature, actors=list(pool))
        work_refs.extend(ray.put(c.work) for c in ctxs)
        probes = [p for c in ctxs for p in shared_storage_probes(c)]
        try:
            infos = ray.get([w.info.remote(tuple(probes)) for w in pool])
        finally:
            for loc, rel in probes:
                loc.delete(rel)
        check_workers_see(probes, infos)
        for c in ctxs:
            c.summary.startup_seconds = time.perf_counter() - began
            c.note_workers([{**i, "num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus} for i in infos])
        free.extend(pool)

    def submit(worker, shard: Shard, todo: list[int], size: int, attempt: int) -> None:
        nonlocal in_flight
        running[worker.run.remote(run_id, work_refs, todo, shard)] = (worker, shard, todo, size, attempt)
        in_flight += size
        lead.summary.driver_bytes += size

    retry: deque = deque()

    def collect() -> None:
        """Wait for one finished shard or one restarted worker and deal with it."""
        nonlocal in_flight
        ready, _ = ray.wait([*running, *probes], num_returns=1, timeout=None if running else WORKER_WAIT)
        if not ready:
            raise RuntimeError(f"no Ray worker came back within {WORKER_WAIT:.0f} s after workers were lost "
                               "(their nodes may be gone and the cluster too small to restart them); run the "
                               "same command again to resume")
        ref = ready[0]
        if ref in probes:
            worker = probes.pop(ref)
            try:
                ray.get(ref)
                free.append(worker)  # back after a restart
            except lost:
                pool.remove(worker)  # out of restarts
            return
        worker, shard, todo, size, attempt = running.pop(ref)
        in_flight -= size
        try:
            outcomes = ray.get(ref)
        except lost as exc:
            log.warning("warning: a worker was lost running shard %d (%s); %s", shard.index,
                        type(exc).__name__, "trying it again" if attempt < SHARD_ATTEMPTS else "giving up on it")
            probes[worker.info.remote()] = worker  # returns once Ray has restarted it
            if attempt < SHARD_ATTEMPTS:
                retry.append((shard, todo, attempt + 1))
            else:
                for i in todo:
                    ctxs[i].absorb(ctxs[i].work.write_failed_part(
                        shard, f"[runtime] the worker was lost {attempt} times ({type(exc).__name__}); "
                        "run again to retry these rows"))
                progress.shard(shard.num_samples)
            return
        for i, outcome in zip(todo, outcomes):
            ctxs[i].absorb(outcome)
        lead.summary.driver_bytes += outcome_bytes(outcomes)
        progress.shard(shard.num_samples)
        free.append(worker)

    def dispatch(shard: Shard, todo: list[int], attempt: int) -> None:
        size = shard_bytes(shard)
        while running and (not free or in_flight + size > budget):  # backpressure by bytes
            collect()
        while not free:
            if not pool:
                raise RuntimeError("every Ray worker was lost and none could be restarted")
            collect()
        submit(free.popleft(), shard, todo, size, attempt)

    finished = False
    try:
        for shard in shards:
            todo = [i for i, c in enumerate(ctxs) if c.finished_part(shard) is None]
            if not todo:
                progress.shard(shard.num_samples)
                continue
            if not pool:
                start()
            dispatch(shard, todo, 1)
            while retry:
                dispatch(*retry.popleft())
        while running or retry:
            while retry:
                dispatch(*retry.popleft())
            if running:
                collect()
        for ref in [w.close.remote() for w in free]:  # flush the live workers' index segments
            try:
                ray.get(ref, timeout=60)
            except (*lost, ray.exceptions.GetTimeoutError):
                pass
        finished = not running and len(free) == len(pool)
    finally:
        if pool and not finished:  # interrupted, or workers lost: start afresh next time
            _drop_pool()


def shard_bytes(shard: Shard) -> int:
    """What handing a shard to a worker ships: its pickled records (image bytes, if embedded)."""
    return len(pickle.dumps(shard, protocol=5))


def outcome_bytes(outcomes: list[ShardOutcome]) -> int:
    return len(pickle.dumps(outcomes, protocol=5))


__all__ = ["Progress", "run_local", "run_ray", "init_ray", "stop_ray", "plan_workers", "WorkerPlan"]
