"""The ``local`` executor (shards one after another in this process) and what both executors
share: thread counts, where a worker runs (their progress is ``runtime.progress``). The ``ray`` executor is
``runtime.ray_executor``; both run the same ``ShardWork``, so the same inputs give the same
results.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Iterator

from runtime.node_runner import loaded_torch
from runtime.progress import Progress
from runtime.run import RunContext
from runtime.shards import Shard


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
    stages: dict[str, object] = {}
    for shard in shards:
        memo: dict[str, object] = {}
        for ctx in ctxs:
            if ctx.needs(shard):
                ctx.run_here(shard, worker_info(), memo, stages, tracker=progress)
        progress.shard(shard.index, shard.num_samples)


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
