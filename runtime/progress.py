"""What a run shows while it works, on stderr: the dataset being read, models loading, then
samples and per-node rows as batches finish.

On a terminal: a counter while the dataset is read, then one bar for samples plus one per node,
with one-off events (a model loading, Ray workers starting) printed above the bars. Elsewhere (a
log file, a cluster job): the same events as ``[progress]`` lines, and one line for the whole
run every ``interval`` seconds while it changes, plus a last one at the end when something
changed since. ``enabled=False`` (``--quiet``) shows nothing.

The bars of the samples count whole shards (a sample is done when its shard is written); the
bars of the nodes move as batches finish (``rows``) and are set to the exact count when their
shard finishes, so the totals at the end are exact whatever reports were late or missing.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from tqdm import tqdm

READ_STEP = 4096  # records between two looks at the clock while the dataset is read


class Progress:
    """The progress of one run or sweep, shown on ``stream`` (stderr) as the module doc says."""

    def __init__(self, enabled: bool, interval: float, stream=None):
        self.enabled, self.interval = enabled, interval
        self.stream = stream or sys.stderr
        self.plain = enabled and not self.stream.isatty()
        self.bars = enabled and not self.plain
        self.ctxs: list = []
        self.total: int | None = None
        self.done = 0
        self.confirmed: dict[str, int] = {}            # per node bar: samples of its finished shards
        self.partial: dict[tuple[str, int], int] = {}  # (node bar, shard running): samples its batches covered
        self.latest: dict[int, tuple[str, int]] = {}   # shard running: the node bar that last moved, its samples
        self.finished_shards: set[int] = set()
        self.sample_bar, self.node_bars = None, {}
        self.started = self.printed = time.monotonic()
        self.printed_state: tuple | None = None

    # -- before the work ---------------------------------------------------------------------
    def reading(self, records: Iterable[dict]) -> Iterator[dict]:
        """``records``, counted as they pass (the dataset being read and checked)."""
        if not self.enabled:
            yield from records
            return
        began = last = time.monotonic()
        counter = tqdm(desc="reading dataset", unit=" records", leave=False, file=self.stream) if self.bars else None
        count = 0
        try:
            for record in records:
                count += 1
                if count % READ_STEP == 0:
                    if counter is not None:
                        counter.update(READ_STEP)
                    elif time.monotonic() - last >= self.interval:
                        last = time.monotonic()
                        self.note(f"reading dataset: {count} records, {last - began:.0f} s")
                yield record
        finally:
            if counter is not None:
                counter.close()
        self.note(f"dataset: {count} records read in {time.monotonic() - began:.1f} s")

    def note(self, message: str) -> None:
        """A one-off event (a model loading, workers starting); may come from another thread."""
        if self.bars:
            tqdm.write(message, file=self.stream)
        elif self.plain:
            self._write(f"[progress] {message}")

    # -- the work ------------------------------------------------------------------------------
    def start(self, ctxs: list, total_samples: int) -> None:
        """The work begins: ``ctxs`` (one per graph of a sweep) over ``total_samples`` samples."""
        self.ctxs, self.total = ctxs, total_samples
        self.started = self.printed = time.monotonic()
        names = [self.bar_name(ctx.graph.name, node) for ctx in ctxs for node in ctx.summary.nodes]
        self.confirmed = dict.fromkeys(names, 0)
        if self.bars:
            self.sample_bar = tqdm(total=total_samples, desc="samples", unit="q", position=0, dynamic_ncols=True,
                                   leave=True, file=self.stream)
            self.node_bars = {name: tqdm(total=total_samples, desc=f"  {name}", unit="q", position=i + 1,
                                         dynamic_ncols=True, leave=True, file=self.stream)
                              for i, name in enumerate(names)}

    def bar_name(self, graph: str, node: str) -> str:
        return f"{graph}/{node}" if len(self.ctxs) > 1 else node

    def rows(self, graph: str, node: str, shard: int, samples: int) -> None:
        """A batch of ``node`` (of ``graph``) finished, covering ``samples`` samples of ``shard``."""
        if not self.enabled or shard in self.finished_shards:  # a late report: the shard is counted
            return
        name = self.bar_name(graph, node)
        self.partial[name, shard] = self.partial.get((name, shard), 0) + samples
        self.latest[shard] = name, self.partial[name, shard]
        self._show(name)
        self._tick()

    def shard(self, index: int, samples: int) -> None:
        """Shard ``index`` is finished in every graph: its samples are done in every node."""
        if not self.enabled:
            return
        self.finished_shards.add(index)
        self.latest.pop(index, None)
        self.done += samples
        for name in self.confirmed:
            self.confirmed[name] += samples
            self.partial.pop((name, index), None)
            self._show(name)
        if self.sample_bar is not None:
            self.sample_bar.update(samples)
        self._tick()

    def _show(self, name: str) -> None:
        bar = self.node_bars.get(name)
        if bar is not None:
            bar.update(self.confirmed[name] + self._running(name) - bar.n)

    def _running(self, name: str) -> int:
        return sum(n for (node, _), n in self.partial.items() if node == name)

    def _tick(self) -> None:
        if self.plain and time.monotonic() - self.printed >= self.interval:
            self.line()

    def _state(self) -> tuple:
        return self.done, self._errors(), tuple(sorted(self.latest.items()))

    def _errors(self) -> int:
        return sum(s.errors for ctx in self.ctxs for s in ctx.summary.nodes.values())

    def line(self) -> None:
        """One line for the whole run, unless nothing changed since the last one."""
        self.printed = time.monotonic()
        state = self._state()
        if state == self.printed_state:
            return
        self.printed_state = state
        rate = self.done / max(1e-9, self.printed - self.started)
        left = ""
        if self.total and rate > 0 and self.done < self.total:
            left = f", about {(self.total - self.done) / rate:.0f} s left"
        now = "".join(f"; shard {shard}: {name} at {n} samples" for shard, (name, n) in sorted(self.latest.items()))
        self._write(f"[progress] {self.done}/{self.total} samples, {rate:.1f}/s, {self._errors()} errors{left}{now}")

    def _write(self, line: str) -> None:
        """One line in one write: a model's set-up thread may write beside the main thread."""
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        for bar in [self.sample_bar, *self.node_bars.values()]:
            if bar is not None:
                bar.close()
        if self.plain and self.ctxs:
            self.line()
