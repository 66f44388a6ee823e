"""The ``local`` executor (shards one after another in this process) and what both executors
share: progress, thread counts, where a worker runs. The ``ray`` executor is
``runtime.ray_executor``; both run the same ``ShardWork``, so the same inputs give the same
results.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Iterator

from tqdm import tqdm

from runtime.node_runner import loaded_torch
from runtime.run import RunContext
from runtime.shards import Shard


class Progress:
    """Progress of a run (or a sweep of runs). On a terminal: one bar for samples plus one per
    node. Elsewhere (a log file, a cluster job): one plain line per node every ``interval``
    seconds (and at the end): samples done, rate, errors, time left."""

    def __init__(self, ctxs: list[RunContext], total_samples: int | None, enabled: bool, interval: float,
                 stream=None):
        self.total, self.enabled = total_samples, enabled
        self.stream = stream or sys.stderr
        self.plain = enabled and not self.stream.isatty()
        self.done, self.started, self.printed = 0, time.monotonic(), time.monotonic()
        self.interval = interval
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
    stages: dict[str, object] = {}
    for shard in shards:
        memo: dict[str, object] = {}
        for ctx in ctxs:
            if ctx.needs(shard):
                ctx.run_here(shard, worker_info(), memo, stages)
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
