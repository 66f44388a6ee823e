"""Run one node's stage over one shard: wire inputs, skip failed rows, batch, isolate bad rows.

Used in-process by the local executor and inside a Ray actor by the Ray executor, so both
give the same results.
"""

from __future__ import annotations

import re
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from artifacts.columns import (
    column_to_python,
    is_fixed_tensor,
    is_variable_tensor,
    python_to_column,
)
from models import compute_clock
from runtime.graph import SOURCE, Node
from runtime.shards import Shard
from stages.base import Batch, Granularity

ERROR = "_error"
ERROR_KIND = "_error_kind"
ROW_ID = "_row_id"

# What a failed row's error says about the next attempt:
SOURCE_ERROR = "source"        # the dataset record is bad (no image, empty question): same next time
DATA_ERROR = "data"            # the stage failed on this row's data: same next time (--retry-errors)
TRANSIENT_ERROR = "transient"  # out of memory, a timeout, a lost worker: the next run retries it
TRANSIENT_TYPES = (MemoryError, TimeoutError, ConnectionError)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def clean_message(message: str) -> str:
    """An error message without memory addresses ("<_io.BytesIO object at 0x7f..>" loses the
    address), so the same data gives the same text in every run."""
    return _ADDRESS.sub("", message)


def error_kind(exc: BaseException) -> str:
    """``transient`` for failures that another attempt may not repeat, else ``data``."""
    if isinstance(exc, TRANSIENT_TYPES) or type(exc).__name__ == "OutOfMemoryError":
        return TRANSIENT_ERROR
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():  # CUDA / allocator
        return TRANSIENT_ERROR
    return DATA_ERROR


@dataclass
class NodeStats:
    rows: int = 0          # rows this node produced (samples, or images for per-image nodes)
    computed: int = 0      # rows actually processed by the stage
    errors: int = 0        # rows that failed here (not counting upstream failures)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0
    calls: int = 0         # process() calls
    model_seconds: float = 0.0  # inside model forward / backward passes (only with --profile)


def non_finite_rows(values, t: pa.DataType) -> list[int]:
    """Rows of a float tensor output (``[N, ...]`` array or list of arrays / None) holding NaN
    or infinity; none for other types (scalar statistics may be NaN on purpose)."""
    if not (is_fixed_tensor(t) or is_variable_tensor(t)):
        return []
    if isinstance(values, np.ndarray):
        if values.dtype.kind != "f":
            return []
        return np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1)).tolist()
    return [k for k, v in enumerate(values) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
            and not bool(np.isfinite(v).all())]


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0


def loaded_torch():
    """torch if some code of this process imported it, else None. Not ``sys.modules.get``: a
    stage being set up on another thread may be halfway through importing it, and ``import``
    waits for that import to finish."""
    if "torch" not in sys.modules:
        return None
    import torch

    return torch


def peak_gpu_mb() -> float:
    torch = loaded_torch()
    if torch is None or not torch.cuda.is_available():
        return 0.0
    return torch.cuda.max_memory_allocated() / 2**20


class NodeRunner:
    """Holds one node's stage (set up once) and runs it on shards."""

    def __init__(self, node: Node, per_image_upstream: set[str], debug: bool = False, profile: bool = False):
        self.node = node
        self.stage = node.stage
        self.per_image_upstream = per_image_upstream  # upstream nodes with one row per image
        self.debug = debug      # --debug: print the traceback of each failing row
        self.profile = profile  # --profile: count the time inside the stage's models
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def adopt(self, stage) -> None:
        """Use an already set-up stage (a worker's model of the same identity, from an earlier run)."""
        self.stage, self._ready = stage, True

    def setup(self, device: str) -> None:
        if not self._ready:
            self.stage.setup(device)
            self._ready = True
        if self.profile:
            self._watch_models()

    def _watch_models(self) -> None:
        """--profile: count the time inside the stage's models (torch is loaded once one is set up)."""
        torch = loaded_torch()
        if torch is None:
            return
        compute_clock.enable()
        for value in vars(self.stage).values():
            if isinstance(value, torch.nn.Module):
                compute_clock.watch(value)

    # -- wiring ----------------------------------------------------------------------------
    def _row_ids(self, shard: Shard) -> list[str]:
        """Image ids for a per-image node, sample ids otherwise."""
        return shard.image_ids if self.node.granularity is Granularity.IMAGE else shard.sample_ids

    def _gather(self, shard: Shard, upstream: dict[str, pa.Table], ref_node: str, column: str,
                per_image: bool | None = None) -> pa.Array:
        """One input column aligned with this node's rows (or with the shard's images)."""
        if per_image is None:
            per_image = self.node.granularity is Granularity.IMAGE
        if ref_node == SOURCE:
            col = shard.table.column(column)
            return col.take(pa.array(shard.image_first)) if per_image else col
        col = upstream[ref_node].column(column)
        if ref_node in self.per_image_upstream and not per_image:
            return col.take(pa.array(shard.image_rows))
        return col

    # -- running ---------------------------------------------------------------------------
    def run(self, shard: Shard, upstream: dict[str, pa.Table],
            on_batch: Callable[[int], None] | None = None) -> tuple[pa.Table, NodeStats]:
        """The node's table for ``shard``; ``on_batch(samples)`` after each batch, with the
        samples its rows stand for (a per-image row stands for its image's questions)."""
        start, model_start = time.perf_counter(), compute_clock.seconds()
        stats = NodeStats()
        row_ids = self._row_ids(shard)
        n = len(row_ids)
        stats.rows = n

        # rows failed upstream (or bad in the source) keep the first error message and its kind
        per_image = self.node.granularity is Granularity.IMAGE
        errors: list[str | None] = list(shard.image_errors if per_image else shard.sample_errors)
        kinds: list[str | None] = [SOURCE_ERROR if e else None for e in errors]
        for up in sorted({r.node for r in self.node.inputs.values() if r.node != SOURCE}):
            col = self._gather(shard, upstream, up, ERROR).to_pylist()
            kind_col = self._gather(shard, upstream, up, ERROR_KIND).to_pylist()
            for i, msg in enumerate(col):
                if msg is not None and errors[i] is None:
                    errors[i], kinds[i] = msg, kind_col[i] or DATA_ERROR

        declared = self.stage.inputs()
        self._image_inputs = set() if per_image else {k for k in self.node.inputs if declared[k].per_image}
        self._image_of_row = None if per_image else shard.image_rows
        inputs = {name: self._gather(shard, upstream, ref.node, ref.column, per_image or name in self._image_inputs)
                  for name, ref in self.node.inputs.items()}
        todo = [i for i in range(n) if errors[i] is None]
        out_types = self.node.output_types
        pieces: list[tuple[list[int], dict[str, pa.Array]]] = []
        samples_of_row = np.bincount(shard.image_rows, minlength=n) if per_image and on_batch else None
        for rows in self._batches(todo):
            done_rows, outs, failures = self._process_rows(rows, inputs, row_ids, out_types)
            stats.calls += 1
            for i, (msg, kind) in failures.items():
                errors[i], kinds[i] = f"[{self.node.name}] {clean_message(msg)}", kind
                stats.errors += 1
            if done_rows:
                pieces.append((done_rows, outs))
            stats.computed += len(rows)
            if on_batch is not None:
                on_batch(len(rows) if samples_of_row is None else int(samples_of_row[rows].sum()))

        # scatter computed rows into full-length columns (null where the row failed)
        position = np.full(n, -1, dtype=np.int64)
        offset = 0
        for rows, _ in pieces:
            position[rows] = np.arange(offset, offset + len(rows))
            offset += len(rows)
        take = pa.array(np.where(position >= 0, position, 0), mask=position < 0)
        columns = {}
        for name, t in out_types.items():
            chunks = [outs[name] for _, outs in pieces]
            if chunks:
                full = pa.chunked_array(chunks, type=t).combine_chunks().take(take)
            else:
                full = pa.nulls(n, type=t) if not hasattr(t, "storage_type") else \
                    pa.ExtensionArray.from_storage(t, pa.nulls(n, type=t.storage_type))
            columns[name] = full
        columns[ERROR] = pa.array(errors, type=pa.string())
        columns[ERROR_KIND] = pa.array(kinds, type=pa.string())
        columns[ROW_ID] = pa.array(row_ids, type=pa.string())
        table = pa.table(columns)
        stats.seconds = time.perf_counter() - start
        stats.model_seconds = compute_clock.seconds() - model_start
        stats.peak_rss_mb = peak_rss_mb()
        stats.peak_gpu_mb = peak_gpu_mb()
        return table, stats

    def _batches(self, todo: list[int]) -> list[list[int]]:
        """Rows in batches of about ``batch_size``, cut only between images so that an image's
        questions share one batch (and one image encoding)."""
        size, image = self.node.batch_size_on(self.stage.device), self._image_of_row
        batches: list[list[int]] = []
        for i in todo:
            if not batches or (len(batches[-1]) >= size
                               and (image is None or image[i] != image[batches[-1][-1]])):
                batches.append([])
            batches[-1].append(i)
        return batches

    def _call(self, rows: list[int], inputs: dict[str, pa.Array], row_ids: list[str], out_types) -> tuple[dict[str, pa.Array], dict[int, str]]:
        idx = pa.array(rows, type=pa.int64())
        image_rows = None
        if self._image_inputs:
            images, image_rows = np.unique(self._image_of_row[rows], return_inverse=True)
            image_idx = pa.array(images, type=pa.int64())
        columns, validity = {}, {}
        for name, arr in inputs.items():
            columns[name], validity[name] = column_to_python(arr.take(image_idx if name in self._image_inputs else idx))
        batch = Batch(columns, validity, [row_ids[i] for i in rows], image_rows)
        raw = self.stage.process(batch)
        missing = set(out_types) - set(raw)
        if missing:
            raise RuntimeError(f"stage '{self.stage.name}' returned no column(s) {sorted(missing)}")
        for name, t in out_types.items():  # a NaN tensor is never a result (e.g. weights gone bad)
            for k in non_finite_rows(raw[name], t):
                batch.failures.setdefault(k, f"non-finite values (NaN or infinity) in its output '{name}'")
        outs = {name: python_to_column(raw[name], t, len(rows)) for name, t in out_types.items()}
        failures = {rows[i]: (msg, DATA_ERROR) for i, msg in batch.failures.items()}
        return outs, failures

    def _process_rows(self, rows, inputs, row_ids, out_types):
        """Process a batch; if it raises, retry row by row so one bad row fails alone."""
        try:
            outs, failures = self._call(rows, inputs, row_ids, out_types)
        except Exception:  # noqa: BLE001 - isolate the bad rows below
            if len(rows) == 1:
                exc = sys.exc_info()[1]
                return [], {}, {rows[0]: (f"{type(exc).__name__}: {exc}", error_kind(exc))}
            done, pieces, failures = [], [], {}
            for i in rows:
                try:
                    o, f = self._call([i], inputs, row_ids, out_types)
                except Exception as exc:  # noqa: BLE001
                    failures[i] = (f"{type(exc).__name__}: {exc}", error_kind(exc))
                    if self.debug:
                        print(f"[{self.node.name}] row {row_ids[i]}:\n{traceback.format_exc()}", file=sys.stderr)
                    continue
                failures.update(f)
                done.append(i)
                pieces.append(o)
            if not done:
                return [], {}, failures
            outs = {name: pa.concat_arrays([p[name] for p in pieces]) for name in out_types}
            return self._drop_failed(done, outs, failures)
        return self._drop_failed(rows, outs, failures)

    @staticmethod
    def _drop_failed(rows, outs, failures):
        if not failures:
            return rows, outs, failures
        keep = [k for k, i in enumerate(rows) if i not in failures]
        idx = pa.array(keep, type=pa.int64())
        return [rows[k] for k in keep], {name: a.take(idx) for name, a in outs.items()}, failures
