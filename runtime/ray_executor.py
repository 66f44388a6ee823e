"""The ``ray`` executor: shards spread over a pool of Ray actors, each running the whole graph
on the shards it is given.

The driver plans which shards to run and hands each to a free worker; the worker reads the
cached inputs it needs from the store, computes the rest (uncached tensors such as decoded
images or SAM embeddings never leave it), writes its results to the store and the shard's part
to the run folder, and returns a small outcome. Nothing bigger than a shard's records passes
through the driver.

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
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterator

from artifacts.location import Probe
from runtime.errors import UsageError
from runtime.executors import apply_threads, worker_info
from runtime.progress import Progress
from runtime.run import RunContext
from runtime.settings import RunSettings
from runtime.shard_work import ShardOutcome, ShardWork
from runtime.shards import Shard
from runtime.worker_code import check_same_code, identities, stage_classes

log = logging.getLogger(__name__)

MAX_CPU_WORKERS = 4       # CPU-only clusters: at most this many workers by default (each loads every model)
SHARD_ATTEMPTS = 3        # a shard whose worker is lost is tried this many times, then failed transiently
ACTOR_RESTARTS = 4        # a lost worker is restarted (when the cluster has room) this many times
BYTES_IN_FLIGHT = 0.25    # shards handed out hold at most this share of the object store
WORKER_WAIT = 600.0       # seconds to wait for a lost worker's restart when no other worker is left
POLL_SECONDS = 1.0        # how often workers send their batch counts, and the driver picks them up


def init_ray(address: str | None) -> bool:
    """Connect to ``address`` or start an embedded local Ray; returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, configure_logging=True, logging_level="ERROR",
                  log_to_driver=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        total = _memory_bytes()
        ray.init(num_cpus=os.cpu_count() or 1,
                 object_store_memory=int(min(2 * 2**30, max(256 * 2**20, total * 0.15))), **kwargs)
    return True


def stop_ray() -> None:
    import ray

    KEPT_WORKERS.forget()  # its workers end with the connection
    if ray.is_initialized():
        ray.shutdown()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


class RayConnection:
    """Ray for one run: started (embedded) or joined (``address``) on first use, so a run served
    entirely from finished parts starts none; stopped at the end only if this run started it."""

    def __init__(self, address: str | None):
        self.address = address
        self.connected = False
        self.started = False

    def connect(self) -> None:
        if not self.connected:
            self.started = init_ray(self.address)
            self.connected = True

    def close(self) -> None:
        if self.started:
            stop_ray()


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


class ProgressBoard:
    """Body of a small Ray actor where workers leave their progress (models loading, batches
    done) and the driver picks it up while it waits for shards."""

    def __init__(self):
        self.notes: list[str] = []
        self.counts: dict[tuple[str, str, int], int] = {}

    def note(self, message: str) -> None:
        self.notes.append(message)

    def add(self, counts: dict[tuple[str, str, int], int]) -> None:
        for key, samples in counts.items():
            self.counts[key] = self.counts.get(key, 0) + samples

    def take(self) -> tuple[list[str], dict[tuple[str, str, int], int]]:
        """What was left since the last call."""
        taken = self.notes, self.counts
        self.notes, self.counts = [], {}
        return taken


class BoardReporter:
    """A worker's ``Tracker``: notes go to the board at once, batch counts at most every
    ``POLL_SECONDS`` (a batch costs no remote call)."""

    def __init__(self, board):
        self.board = board
        self.counts: dict[tuple[str, str, int], int] = {}
        self.sent = time.monotonic()

    def note(self, message: str) -> None:
        self.board.note.remote(f"[worker {os.getpid()}] {message}")

    def rows(self, graph: str, node: str, shard: int, samples: int) -> None:
        key = (graph, node, shard)
        self.counts[key] = self.counts.get(key, 0) + samples
        if time.monotonic() - self.sent >= POLL_SECONDS:
            self.board.add.remote(self.counts)
            self.counts, self.sent = {}, time.monotonic()


class ShardWorker:
    """Body of the Ray actor that runs whole shards (see the module doc).

    A worker outlives a run when the driver keeps its Ray connection (an embedded Ray started
    by someone else, a long-lived driver): the next run with the same worker plan and settings
    reuses it, and its set-up stages (loaded models) of the same identity, so a sweep of graphs
    sharing nodes loads each model once. It keeps the stages the current run's graph uses, and
    drops the others when a run with another graph arrives.
    """

    def __init__(self, threads: int, settings: RunSettings):
        # set here rather than as a Ray runtime_env (which costs a runtime-env agent round trip
        # and a fresh process per actor): no model library is imported in this process yet
        settings.apply_to_process()
        apply_threads(threads)
        self.threads = threads
        self.run_id: str | None = None
        self.works: list[ShardWork] = []
        self.stages: dict[str, object] = {}
        self.reporter: BoardReporter | None = None

    def info(self, probes: tuple[Probe, ...] = (), classes: tuple[type, ...] = ()) -> dict:
        """Where this worker is, whether it sees each probe the driver placed, and its code
        identity of each stage class (runtime/worker_code.py)."""
        return {**worker_info(), "threads": self.threads, "sees": [p.seen() for p in probes],
                "code": identities(classes)}

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

    def run(self, run_id: str, work_refs: list, todo: list[int], shard: Shard, board=None) -> list[ShardOutcome]:
        """The shard through the graphs ``todo`` (indexes into the run's works), sharing work;
        its progress goes to ``board`` (a ``ProgressBoard`` actor) when there is one."""
        works = self._use(run_id, work_refs)
        memo: dict[str, object] = {}
        where = {"pid": os.getpid(), "host": socket.gethostname()}
        return [works[i].run(shard, worker=where, memo=memo, tracker=self._reporter(board)) for i in todo]

    def _reporter(self, board) -> BoardReporter | None:
        """The run's reporter to ``board``, kept from shard to shard: its counts go out every
        ``POLL_SECONDS`` however short the shards."""
        if board is None:
            return None
        if self.reporter is None or self.reporter.board != board:
            self.reporter = BoardReporter(board)
        return self.reporter

    def close(self) -> None:
        for work in self.works:
            work.close()


class KeptWorkers:
    """The workers of this driver's last run, kept for the next one when it has the same Ray
    job, worker plan and settings (their loaded models with them)."""

    def __init__(self):
        self.signature: str | None = None
        self.actors: list = []

    def for_plan(self, plan: WorkerPlan, settings: RunSettings) -> list:
        """The workers for ``plan``: the kept ones when they fit, else new ones (the old stopped)."""
        import ray

        signature = repr((ray.get_runtime_context().get_job_id(), plan, settings))
        if signature != self.signature:
            self.drop()
            actor = ray.remote(ShardWorker).options(
                num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_concurrency=1, max_restarts=ACTOR_RESTARTS,
                max_task_retries=0)
            self.actors = [actor.remote(plan.threads, settings) for _ in range(plan.count)]
            self.signature = signature
        return list(self.actors)

    def drop(self) -> None:
        """Stop the kept workers (interrupted or lost ones: the next run starts afresh)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - a handle of an earlier Ray session: nothing to stop
                pass
        self.forget()

    def forget(self) -> None:
        """Let go of the workers without stopping them (they end with the Ray connection)."""
        self.signature, self.actors = None, []


KEPT_WORKERS = KeptWorkers()


def storage_probes(ctxs: list[RunContext]) -> list[Probe]:
    """A small file in each run folder and one in the cache, for workers to look for."""
    probes = [Probe.place(c.folder.loc, c.folder.writer_id) for c in ctxs]
    store = ctxs[0].store
    if store is not None:
        probes.append(Probe.place(store.loc, store.writer_id))
    return probes


def check_workers_see(probes: list[Probe], infos: list[dict]) -> None:
    """Refuse to run when a worker cannot see a run folder or the cache (its results would be
    written where the driver never looks)."""
    for info in infos:
        blind = [p.loc.display() for p, seen in zip(probes, info.pop("sees")) if not seen]
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


@dataclass
class Assignment:
    """A shard handed to a worker: the graphs of the sweep it runs (``todo``), the bytes it
    ships, and which attempt this is."""

    worker: object
    shard: Shard
    todo: list[int]
    size: int
    attempt: int


class RayRunner:
    """Hands each unfinished shard to a free worker and collects outcomes as they come. With
    several graphs (a sweep), the worker runs the shard through each graph that still needs it.

    Workers start when the first shard needs computing. A worker that dies (killed, out of
    memory, its node lost) is restarted by Ray when the cluster has room for it; its shard goes
    to another worker, up to ``SHARD_ATTEMPTS`` times, then its rows fail with a transient error
    that the next run retries. When every worker is lost for good, the shards left fail the same
    way: the run still finishes, with the parts it has.
    """

    def __init__(self, ctxs: list[RunContext], progress: Progress, ray_connection: RayConnection,
                 settings: RunSettings, workers: int | None = None, gpus_per_worker: float | None = None,
                 threads: int | None = None):
        import ray  # here, not at the top: importing it takes seconds that local runs never spend

        self.ray = ray
        self.ctxs = ctxs
        self.lead = ctxs[0]              # counts the bytes the driver ships, for the whole sweep
        self.progress = progress
        self.connection = ray_connection
        self.settings = settings
        self.workers, self.gpus_per_worker, self.threads = workers, gpus_per_worker, threads  # as asked
        self.run_id = uuid.uuid4().hex
        self.work_refs: list = []        # each graph's ShardWork, in the object store
        self.started = False             # whether the workers were started (the pool may since be empty)
        self.pool: list = []             # the workers (lost ones out of restarts removed)
        self.free: deque = deque()       # workers with nothing to do
        self.restarting: dict = {}       # ref of a lost worker's info() (ready once restarted) -> worker
        self.running: dict = {}          # ref of a worker's run() -> Assignment
        self.retries: deque = deque()    # (shard, todo, attempt) to hand out again
        self.board = None                # the ProgressBoard actor, when progress is shown
        self.bytes_in_flight = 0
        self.byte_budget = 0
        self.lost = _lost_worker_errors()

    def run(self, shards: Iterator[Shard]) -> None:
        """Every shard that a graph of the sweep still needs, through the workers."""
        finished = False
        try:
            for shard in shards:
                todo = [i for i, c in enumerate(self.ctxs) if c.needs(shard)]
                if not todo:
                    self.progress.shard(shard.index, shard.num_samples)
                    continue
                if not self.started:
                    self.start_workers()
                self.hand_out(shard, todo, 1)
                self.hand_out_retries()
            while self.running or self.retries:
                self.hand_out_retries()
                if self.running:
                    self.collect_one()
            self.flush_workers()
            finished = not self.running and len(self.free) == len(self.pool) == len(KEPT_WORKERS.actors)
        finally:
            if self.board is not None:
                self.ray.kill(self.board)
            if self.started and not finished:  # interrupted, or workers lost: start afresh next time
                KEPT_WORKERS.drop()

    def start_workers(self) -> None:
        """Start (or reuse) the workers, send them the graphs' work, check they see the storage."""
        ray = self.ray
        self.started = True
        began = time.perf_counter()
        self.progress.note("starting Ray workers...")
        self.connection.connect()
        if self.progress.enabled:
            self.board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
        res = ray.cluster_resources()
        plan = max((plan_workers(c, res.get("CPU", 1.0), res.get("GPU", 0.0), self.workers, self.gpus_per_worker)
                    for c in self.ctxs), key=lambda p: p.num_gpus)
        plan = replace(plan, threads=self.threads or plan.threads)
        self.byte_budget = int(BYTES_IN_FLIGHT * res.get("object_store_memory", 2**30))
        self.pool.extend(KEPT_WORKERS.for_plan(plan, self.settings))
        self.work_refs = [ray.put(c.work) for c in self.ctxs]
        probes = storage_probes(self.ctxs)
        classes = stage_classes(c.graph for c in self.ctxs)
        try:
            infos = ray.get([w.info.remote(tuple(probes), classes) for w in self.pool])
        finally:
            for probe in probes:
                probe.remove()
        check_workers_see(probes, infos)
        check_same_code(classes, infos)
        for c in self.ctxs:
            c.note_workers([{**i, "num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus} for i in infos],
                           time.perf_counter() - began)
        self.progress.note(f"{len(self.pool)} Ray workers up in {time.perf_counter() - began:.1f} s")
        self.free.extend(self.pool)

    def hand_out(self, shard: Shard, todo: list[int], attempt: int) -> None:
        """Give ``shard`` to a free worker, once the shards in flight leave room for its bytes;
        fail it when no worker is left."""
        size = shard_bytes(shard)
        while self.running and (not self.free or self.bytes_in_flight + size > self.byte_budget):
            self.collect_one()
        while not self.free:
            if not self.pool:
                self.give_up(shard, todo, "every Ray worker was lost and none could be restarted")
                return
            self.collect_one()
        worker = self.free.popleft()
        self.running[worker.run.remote(self.run_id, self.work_refs, todo, shard, self.board)] = \
            Assignment(worker, shard, todo, size, attempt)
        self.bytes_in_flight += size
        self.lead.note_driver_bytes(size)

    def hand_out_retries(self) -> None:
        while self.retries:
            self.hand_out(*self.retries.popleft())

    def collect_one(self) -> None:
        """Wait for one finished shard or one restarted worker and deal with it."""
        ready = self.wait_one(None if self.running else WORKER_WAIT)
        if not ready:
            self.workers_gone()
            return
        if ready[0] in self.restarting:
            self.worker_back(ready[0])
        else:
            self.shard_back(ready[0])

    def wait_one(self, timeout: float | None) -> list:
        """Wait up to ``timeout`` seconds (None: for ever) for a shard or a restarted worker,
        picking up the workers' progress every ``POLL_SECONDS`` meanwhile."""
        refs = [*self.running, *self.restarting]
        if self.board is None:
            return self.ray.wait(refs, num_returns=1, timeout=timeout)[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = POLL_SECONDS if deadline is None else max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=step)
            if self.board is not None:  # gone if its actor was lost
                self.pick_up_progress()
            if ready or (deadline is not None and time.monotonic() >= deadline):
                return ready

    def pick_up_progress(self) -> None:
        """Show what the workers left on the board since the last look."""
        try:
            notes, counts = self.ray.get(self.board.take.remote())
        except self.lost:  # the board's node went away: shards still count as they finish
            log.warning("warning: the Ray progress actor was lost; progress now moves per shard")
            self.board = None
            return
        for message in notes:
            self.progress.note(message)
        for (graph, node, shard), samples in counts.items():
            self.progress.rows(graph, node, shard, samples)

    def workers_gone(self) -> None:
        """No lost worker came back within ``WORKER_WAIT`` (their nodes may be gone and the
        cluster too small to restart them): they count as lost for good."""
        log.warning("warning: no Ray worker came back within %.0f s after workers were lost", WORKER_WAIT)
        for worker in self.restarting.values():
            self.drop_worker(worker)
        self.restarting.clear()

    def drop_worker(self, worker) -> None:
        """A worker lost for good (out of restarts, or not back in time)."""
        self.pool.remove(worker)
        if not self.pool:
            log.warning("warning: every Ray worker was lost and none could be restarted; the shards left fail "
                        "with a transient error: run the same command again to retry them")

    def worker_back(self, ref) -> None:
        """A lost worker answered again (restarted), or ran out of restarts."""
        worker = self.restarting.pop(ref)
        try:
            self.ray.get(ref)
            self.free.append(worker)
        except self.lost:
            self.drop_worker(worker)

    def shard_back(self, ref) -> None:
        """A worker finished a shard (its outcomes are added) or was lost running it."""
        job = self.running.pop(ref)
        self.bytes_in_flight -= job.size
        try:
            outcomes = self.ray.get(ref)
        except self.lost as exc:
            self.worker_lost(job, exc)
            return
        for i, outcome in zip(job.todo, outcomes):
            self.ctxs[i].absorb(outcome)
        self.lead.note_driver_bytes(outcome_bytes(outcomes))
        self.progress.shard(job.shard.index, job.shard.num_samples)
        self.free.append(job.worker)

    def worker_lost(self, job: Assignment, exc: Exception) -> None:
        """Wait for Ray to restart the worker; try its shard again, or give up on it."""
        log.warning("warning: a worker was lost running shard %d (%s); %s", job.shard.index, type(exc).__name__,
                    "trying it again" if job.attempt < SHARD_ATTEMPTS else "giving up on it")
        self.restarting[job.worker.info.remote()] = job.worker  # returns once Ray has restarted it
        if job.attempt < SHARD_ATTEMPTS:
            self.retries.append((job.shard, job.todo, job.attempt + 1))
            return
        self.give_up(job.shard, job.todo, f"the worker was lost {job.attempt} times ({type(exc).__name__})")

    def give_up(self, shard: Shard, todo: list[int], why: str) -> None:
        """Fail ``shard``'s rows in the graphs ``todo`` with a transient error (the next run retries them)."""
        for i in todo:
            self.ctxs[i].fail(shard, f"[runtime] {why}; run again to retry these rows")
        self.progress.shard(shard.index, shard.num_samples)

    def flush_workers(self) -> None:
        """Have the live workers write their store index segments."""
        for ref in [w.close.remote() for w in self.free]:
            try:
                self.ray.get(ref, timeout=60)
            except (*self.lost, self.ray.exceptions.GetTimeoutError):
                pass


def shard_bytes(shard: Shard) -> int:
    """What handing a shard to a worker ships: its pickled records (image bytes, if embedded)."""
    return len(pickle.dumps(shard, protocol=5))


def outcome_bytes(outcomes: list[ShardOutcome]) -> int:
    return len(pickle.dumps(outcomes, protocol=5))
