"""One shard's work: plan it against the store, compute what is missing, store the results,
write its results part. The same object runs in the driver (local executor) and inside Ray
workers, which read their inputs from the store and write their outputs to it themselves:
only the shard's records go in and a small :class:`ShardOutcome` comes back.

A (node, shard) result is stored under a key that changes exactly when the result could:
the node's *identity* (stage name and version, params, the code of the stage and of the
project modules it imports, the versions of the numeric libraries they import, device,
dtype, full content hash of the weights), the keys of its inputs, and what it reads of the
shard (its row ids and the source columns it is wired to: ``Shard.source_fingerprint``).
The node's name, the graph's name, batch sizes and the executor are not in it, so graphs that
share upstream nodes share their results (docs/store.md).

Planning walks up from the nodes whose rows make the results: a node is computed when its
stored result is missing, corrupt, holds rows that failed transiently (or any failed rows,
with ``retry_errors``), or is not cacheable; its inputs are then planned the same way.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from artifacts.fingerprint import fingerprint
from artifacts.location import Location
from artifacts.store import Store
from runtime.graph import SOURCE, Graph, Node, Ref
from runtime.node_runner import (DATA_ERROR, ERROR, ERROR_KIND, ROW_ID, SOURCE_ERROR, TRANSIENT_ERROR, NodeRunner,
                                 NodeStats)
from runtime.run_folder import RunFolder
from runtime.settings import RunSettings
from runtime.shards import Shard
from stages.base import Granularity

_DONE: Future = Future()
_DONE.set_result(None)

SOURCE_RESULT_COLUMNS = ("sample_id", "image_id", "question")


def node_device(stage, device: str) -> str:
    """Where a node's stage computes: the run's device for model stages, the CPU for the rest."""
    return device if stage.resources.gpu > 0 else "cpu"


class Tracker(Protocol):
    """Who hears how a shard's work goes (the run's progress, or a Ray worker's link to it)."""

    def note(self, message: str) -> None:
        """A one-off event: a model loading, or ready."""

    def rows(self, graph: str, node: str, shard: int, samples: int) -> None:
        """A batch of ``node`` finished, covering ``samples`` samples of shard ``shard``."""


def describe_model(name: str, stage) -> str:
    """A model node as the progress names it: ``gradcam (itm_gradcam, preset large)``."""
    preset = getattr(stage.params, "preset", None)
    return f"{name} ({stage.name}{f', preset {preset}' if preset else ''})"


@dataclass
class ShardPlan:
    shard: Shard
    keys: dict[str, str]
    compute: list[str]   # nodes to run, in topological order
    load: list[str]      # nodes read from the store
    part_key: str
    loaded: dict[str, pa.Table] = field(default_factory=dict)  # the stored tables of ``load``


@dataclass
class ShardOutcome:
    """What a worker reports of one shard: small, whatever the shard's tensors weigh."""

    index: int
    samples: int
    part: str                                    # the part's file name under parts/
    computed: dict[str, NodeStats] = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)  # corrupt store entries met and removed
    produced_bytes: int = 0                      # Arrow bytes of every table computed (cached or not)
    worker: dict = field(default_factory=dict)   # pid, host, GPUs of the worker that ran it


class ShardWork:
    """Everything needed to run shards of one graph, picklable (no open files, no models, no
    dataset source): built once by the driver and sent to every worker."""

    def __init__(self, graph: Graph, identities: dict[str, dict], store: Location | None, folder: RunFolder,
                 force: set[str], retry_errors: bool, device: str, settings: RunSettings):
        self.graph_name = graph.name
        self.nodes: dict[str, Node] = graph.nodes
        self.outputs: list[Ref] = graph.outputs
        self.identities = identities
        self.store_location = store
        self.folder = folder
        self.settings = settings
        self.force = set(force)
        self.retry_errors = retry_errors
        self.device = device
        self.upstream = {name: graph.upstream(name) for name in graph.nodes}
        self.per_image = {n for n, nd in graph.nodes.items() if nd.granularity is Granularity.IMAGE}
        consumers = {up for ups in self.upstream.values() for up in ups}
        kept = {r.node for r in graph.outputs if r.node != SOURCE}
        self.final = [n for n in graph.nodes if n in kept or n not in consumers]
        self._store: Store | None = None
        self._runners: dict[str, NodeRunner] | None = None
        self.stage_cache: dict[str, object] | None = None  # identity -> set-up stage, kept by a worker

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_runners": None, "stage_cache": None}

    def stage_key(self, name: str) -> str:
        """What makes a set-up stage reusable by another node (of this graph or another): its
        identity (stage, params, code, weights, device, dtype)."""
        return fingerprint(self.identities[name])

    @property
    def store(self) -> Store | None:
        if self._store is None and self.store_location is not None:
            self._store = Store(self.store_location)
        return self._store

    @property
    def runners(self) -> dict[str, NodeRunner]:
        """One runner per node, each setting up its stage (loading its model) on first use; a
        stage of the same identity already set up in this process (``stage_cache``) is reused."""
        if self._runners is None:
            self._runners = {}
            for name, node in self.nodes.items():
                runner = NodeRunner(node, self.per_image, debug=self.settings.debug,
                                    profile=self.settings.profile)
                cached = None if self.stage_cache is None else self.stage_cache.get(self.stage_key(name))
                if cached is not None:
                    runner.adopt(cached)
                self._runners[name] = runner
        return self._runners

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # -- keys ---------------------------------------------------------------------------------
    def keys(self, shard: Shard) -> dict[str, str]:
        keys: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        for name, node in self.nodes.items():
            wired = {inp: [SOURCE if r.node == SOURCE else keys[r.node], r.column] for inp, r in node.inputs.items()}
            read = tuple(sorted({r.column for r in node.inputs.values() if r.node == SOURCE}))
            what = (read, node.granularity is Granularity.IMAGE)
            if what not in seen:
                seen[what] = shard.source_fingerprint(*what)
            keys[name] = fingerprint(self.identities[name], wired, seen[what])
        return keys

    def part_key(self, shard: Shard, keys: dict[str, str]) -> str:
        source_cols = set(SOURCE_RESULT_COLUMNS) | {r.column for r in self.outputs if r.node == SOURCE}
        return fingerprint(shard.ordered_fingerprint(source_cols), [keys[n] for n in self.final],
                           [str(r) for r in self.outputs])

    def stale(self, kinds: list[str | None]) -> bool:
        """Whether rows with these error kinds make a stored result (or a part) stale."""
        if TRANSIENT_ERROR in kinds:
            return True
        return self.retry_errors and DATA_ERROR in kinds

    # -- planning --------------------------------------------------------------------------
    def plan(self, shard: Shard, memo: dict[str, pa.Table] | None = None) -> ShardPlan:
        """What to compute and load for ``shard``, reading (and so checking) what it loads.
        ``memo``: tables of this shard computed or loaded by another graph of a sweep, by key."""
        keys = self.keys(shard)
        compute, loaded, seen = set(), {}, set()
        stack = list(self.final)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            table = memo.get(keys[name]) if memo is not None and name not in self.force else None
            if table is None:
                table = self._load(name, keys[name], shard)
            if table is not None:
                loaded[name] = table
                continue
            compute.add(name)
            stack.extend(self.upstream[name])
        order = list(self.nodes)
        return ShardPlan(shard, keys, [n for n in order if n in compute], [n for n in order if n in loaded],
                         self.part_key(shard, keys), loaded)

    def _load(self, name: str, key: str, shard: Shard) -> pa.Table | None:
        """The node's checked stored table, in the shard's row order; None when it must be computed."""
        node = self.nodes[name]
        if self.store is None or not node.stage.cacheable or name in self.force:
            return None
        table = self.store.read(node.stage.name, key)
        if table is None:
            return None
        needed = {*node.output_types, ERROR, ERROR_KIND, ROW_ID}
        if not needed <= set(table.column_names) or self.stale(table.column(ERROR_KIND).to_pylist()):
            return None
        want = shard.image_ids if node.granularity is Granularity.IMAGE else shard.sample_ids
        have = table.column(ROW_ID).to_pylist()
        if have != want:  # same rows in another order (the key does not depend on the order)
            position = {rid: i for i, rid in enumerate(have)}
            if len(position) != len(have) or sorted(have) != sorted(want):
                return None
            table = table.take(pa.array([position[r] for r in want], type=pa.int64()))
        return table

    # -- running ---------------------------------------------------------------------------
    def run(self, shard: Shard, worker: dict | None = None, memo: dict[str, pa.Table] | None = None,
            tracker: Tracker | None = None) -> ShardOutcome:
        """Plan, compute, store and write the part of one shard. ``memo`` (a sweep): tables by
        key shared with the other graphs running this shard; filled with this graph's.
        ``tracker``: told of models loading and of each batch done."""
        discarded_before = len(self.store.discarded) if self.store is not None else 0
        plan = self.plan(shard, memo)
        tables: dict[str, pa.Table] = dict(plan.loaded)
        outcome = ShardOutcome(shard.index, shard.num_samples, "", loaded=list(plan.load), worker=worker or {})
        ready = self._set_up_ahead(plan.compute, tracker)
        for name in plan.compute:
            runner = self.runners[name]
            ready[name].result()  # set up (models loaded) beside the data work of the nodes before it
            if self.stage_cache is not None:
                self.stage_cache[self.stage_key(name)] = runner.stage
            on_batch = None if tracker is None else \
                (lambda samples, node=name: tracker.rows(self.graph_name, node, shard.index, samples))
            tables[name], stats = runner.run(shard, tables, on_batch)
            outcome.computed[name] = stats
            outcome.produced_bytes += tables[name].nbytes
            self._save(plan, name, tables[name])
        outcome.part = self.write_part(plan, tables)
        if memo is not None:
            memo.update({plan.keys[name]: table for name, table in tables.items()})
        if self.store is not None:
            outcome.discarded = self.store.discarded[discarded_before:]
        return outcome

    def _set_up_ahead(self, names: list[str], tracker: Tracker | None = None) -> dict[str, Future]:
        """Set up the stages of ``names`` in order on a background thread, so that the first
        shard's image decoding runs while the models load (the second and later shards find
        them ready). An error surfaces where the node runs, as if set up there."""
        todo = [n for n in names if not self.runners[n].ready]
        if not todo:
            return {n: _DONE for n in names}
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="setup")
        futures = {n: pool.submit(self._set_up, n, tracker) for n in todo}
        pool.shutdown(wait=False)
        return {n: futures.get(n, _DONE) for n in names}

    def _set_up(self, name: str, tracker: Tracker | None) -> None:
        """Set up one node's stage; a model's loading (seconds to minutes) is told to ``tracker``."""
        runner = self.runners[name]
        device = node_device(runner.stage, self.device)
        if tracker is None or runner.stage.resources.gpu == 0:  # no model: set up at once
            runner.setup(device)
            return
        what, began = describe_model(name, runner.stage), time.perf_counter()
        tracker.note(f"loading model {what} on {device}...")
        runner.setup(device)
        tracker.note(f"model {what} ready in {time.perf_counter() - began:.1f} s")

    def _save(self, plan: ShardPlan, name: str, table: pa.Table) -> None:
        node = self.nodes[name]
        if self.store is None or not node.stage.cacheable:
            return
        kinds = table.column(ERROR_KIND).to_pylist()
        meta = {"node": name, "graph": self.graph_name, "shard": plan.shard.index,
                "errors": sum(k is not None for k in kinds), "transient_errors": kinds.count(TRANSIENT_ERROR)}
        self.store.write(node.stage.name, plan.keys[name], table, meta, described=self.identities[name])

    def write_part(self, plan: ShardPlan, tables: dict[str, pa.Table]) -> str:
        """Join the kept columns of one shard, one row per sample, and write it atomically."""
        shard = plan.shard
        take_images = pa.array(shard.image_rows)

        def per_sample(name: str, column: str):
            col = tables[name].column(column)
            return col.take(take_images) if name in self.per_image else col

        errors: list[str | None] = list(shard.sample_errors)
        kinds: list[str | None] = [SOURCE_ERROR if e else None for e in errors]
        for name in self.final:
            messages = per_sample(name, ERROR).to_pylist()
            node_kinds = per_sample(name, ERROR_KIND).to_pylist()
            for i, msg in enumerate(messages):
                if msg is not None and errors[i] is None:
                    errors[i], kinds[i] = msg, node_kinds[i] or DATA_ERROR
        columns = {str(r): per_sample(r.node, r.column) for r in self.outputs if r.node != SOURCE}
        return self._write_part_table(shard, plan.part_key, columns, errors, kinds)

    def write_failed_part(self, shard: Shard, message: str) -> ShardOutcome:
        """The part of a shard no worker could finish (lost workers, retries exhausted): every row
        fails with a transient error, so the next run computes it again."""
        keys = self.keys(shard)
        columns = {}
        for r in self.outputs:
            if r.node != SOURCE:
                t = self.nodes[r.node].output_types[r.column]
                columns[str(r)] = pa.ExtensionArray.from_storage(t, pa.nulls(shard.num_samples, t.storage_type)) \
                    if hasattr(t, "storage_type") else pa.nulls(shard.num_samples, t)
        errors = [e or message for e in shard.sample_errors]
        kinds = [SOURCE_ERROR if e else TRANSIENT_ERROR for e in shard.sample_errors]
        part = self._write_part_table(shard, self.part_key(shard, keys), columns, errors, kinds)
        return ShardOutcome(shard.index, shard.num_samples, part)

    def _write_part_table(self, shard: Shard, part_key: str, node_columns: dict[str, pa.Array],
                          errors: list[str | None], kinds: list[str | None]) -> str:
        cols: dict[str, pa.Array] = {c: shard.table.column(c) for c in SOURCE_RESULT_COLUMNS}
        for ref in self.outputs:
            cols[ref.column if ref.node == SOURCE else str(ref)] = \
                shard.table.column(ref.column) if ref.node == SOURCE else node_columns[str(ref)]
        cols["status"] = pa.array(["error" if e else "ok" for e in errors], type=pa.string())
        cols["error"] = pa.array(errors, type=pa.string())
        cols["error_kind"] = pa.array(kinds, type=pa.string())
        return self.folder.write_part(part_key, pa.table(cols))
