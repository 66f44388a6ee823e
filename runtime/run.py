"""One run of a graph: shard plans, cache keys, run folder (parts, results, manifest), summary.

A (node, shard) result is stored under a key that changes exactly when the result could:
the node's *identity* (stage name and version, params, the code of the stage and of the
project modules it imports, the versions of the numeric libraries they import, device,
dtype, full content hash of the weights: :meth:`RunContext.identity`), the keys of its inputs,
and what it reads of the shard (its row ids and the source columns it is wired to:
``Shard.source_fingerprint``). The node's name, the graph's name, batch sizes and replicas
are not in it, so graphs that share upstream nodes share their results.

Planning a shard reads (and so checks) the cached results it needs, walking up from the
nodes whose rows make the results: a node is computed when its result is missing, corrupt,
holds rows that failed transiently (or any failed rows, with ``retry_errors``), or is not
cacheable; its inputs are then planned the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artifacts.columns import is_fixed_tensor, is_variable_tensor
from artifacts.fingerprint import fingerprint
from artifacts.location import Location, new_writer_id
from artifacts.store import Store, check_bytes, parse_table, table_bytes
from runtime.code_identity import code_identity
from runtime.graph import SOURCE, Graph
from runtime.node_runner import (DATA_ERROR, ERROR, ERROR_KIND, ROW_ID, SOURCE_ERROR, TRANSIENT_ERROR,
                                 NodeStats)
from runtime.shards import Shard
from stages.base import Granularity

log = logging.getLogger(__name__)

RESULTS = "results.parquet"
MANIFEST = "manifest.json"
PARTS = "parts"
PART_RE = re.compile(r"^part-(?P<key>[0-9a-f]{32})\.(?P<sha>[0-9a-f]{64})\.parquet$")
SOURCE_RESULT_COLUMNS = ("sample_id", "image_id", "question")


class RunError(Exception):
    """The run cannot finish as asked (a results part went bad under it)."""


@dataclass
class ShardPlan:
    shard: Shard
    keys: dict[str, str]
    compute: list[str]   # nodes to run, in topological order
    load: list[str]      # nodes read from the cache
    final: list[str]     # nodes whose rows make the results (kept outputs + sinks)
    part_key: str
    loaded: dict[str, pa.Table] = field(default_factory=dict)  # the cached tables of ``load``


@dataclass
class NodeSummary:
    stage: str
    rows: int = 0
    computed_shards: int = 0
    cached_shards: int = 0
    errors: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0
    calls: int = 0


@dataclass
class RunSummary:
    output: Path | str
    samples: int = 0
    errors: int = 0
    transient_errors: int = 0
    shards: int = 0
    shards_from_parts: int = 0
    seconds: float = 0.0
    nodes: dict[str, NodeSummary] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    corrupt_discarded: int = 0

    @property
    def results(self) -> Path | str:
        return self.output / RESULTS if isinstance(self.output, Path) else f"{self.output.rstrip('/')}/{RESULTS}"


def node_device(stage, device: str) -> str:
    """Where a node's stage computes: the run's device for model stages, the CPU for the rest."""
    return device if stage.resources.gpu > 0 else "cpu"


class RunContext:
    """State shared by the executors for one run."""

    def __init__(self, graph: Graph, output: Location | str | Path, store: Store | None, force: set[str],
                 device: str = "cpu", retry_errors: bool = False):
        self.graph = graph
        self.output = output if isinstance(output, Location) else Location(output)
        self.store = store
        self.device = device
        self.retry_errors = retry_errors
        self.force = set(force)
        for name in list(force):
            self.force |= graph.descendants(name)
        self.weights = {name: node.stage.weights_fingerprint() for name, node in graph.nodes.items()}
        self.per_image = {n for n, nd in graph.nodes.items() if nd.granularity is Granularity.IMAGE}
        consumers = {up for n in graph.nodes for up in graph.upstream(n)}
        kept = {r.node for r in graph.outputs if r.node != SOURCE}
        self.final = [n for n in graph.nodes if n in kept or n not in consumers]
        self._identity = {name: self._node_identity(name) for name in graph.nodes}
        self.summary = RunSummary(self.output.local_path() or self.output.display(),
                                  nodes={n: NodeSummary(nd.stage.name) for n, nd in graph.nodes.items()})
        self.started = time.time()
        self.writer_id = new_writer_id()
        self.part_files: list[str | None] = []  # per shard index: the part's name under parts/
        self._existing_parts = self._list_parts()

    # -- identity and keys -------------------------------------------------------------------
    def _node_identity(self, name: str) -> dict:
        stage = self.graph.nodes[name].stage
        code = code_identity(type(stage))
        return {"stage": stage.name, "version": stage.version, "params": stage.params.model_dump(mode="json"),
                "code": code.code, "libraries": dict(code.libraries), "device": node_device(stage, self.device),
                "dtype": stage.compute_dtype(), "weights": self.weights[name],
                "granularity": stage.granularity.value}

    def identity(self, name: str) -> dict:
        """Everything but the inputs that a node's cache key is made of (see the module doc)."""
        return self._identity[name]

    def keys(self, shard: Shard) -> dict[str, str]:
        keys: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        for name, node in self.graph.nodes.items():
            wired = {inp: [SOURCE if r.node == SOURCE else keys[r.node], r.column] for inp, r in node.inputs.items()}
            read = tuple(sorted({r.column for r in node.inputs.values() if r.node == SOURCE}))
            what = (read, node.granularity is Granularity.IMAGE)
            if what not in seen:
                seen[what] = shard.source_fingerprint(*what)
            keys[name] = fingerprint(self._identity[name], wired, seen[what])
        return keys

    def part_key(self, shard: Shard, keys: dict[str, str]) -> str:
        source_cols = set(SOURCE_RESULT_COLUMNS) | {r.column for r in self.graph.outputs if r.node == SOURCE}
        return fingerprint(shard.ordered_fingerprint(source_cols), [keys[n] for n in self.final],
                           [str(r) for r in self.graph.outputs])

    # -- planning --------------------------------------------------------------------------
    def plan(self, shard: Shard) -> ShardPlan | None:
        """What to compute and load for ``shard``; None when its results part already exists."""
        keys = self.keys(shard)
        part_key = self.part_key(shard, keys)
        while len(self.part_files) <= shard.index:
            self.part_files.append(None)
        if self.store is not None and not self.force:
            name = self._usable_part(part_key)
            if name is not None:
                self.part_files[shard.index] = name
                return None
        compute, loaded, seen = set(), {}, set()
        stack = list(self.final)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            table = self._load(name, keys[name], shard)
            if table is not None:
                loaded[name] = table
                continue
            compute.add(name)
            stack.extend(self.graph.upstream(name))
        order = list(self.graph.nodes)
        return ShardPlan(shard, keys, [n for n in order if n in compute], [n for n in order if n in loaded],
                         self.final, part_key, loaded)

    def _retry(self, kinds: list[str | None]) -> bool:
        """Whether rows with these error kinds make a stored result (or part) stale."""
        if TRANSIENT_ERROR in kinds:
            return True
        return self.retry_errors and DATA_ERROR in kinds

    def _load(self, name: str, key: str, shard: Shard) -> pa.Table | None:
        """The node's checked cached table, in the shard's row order; None when it must be computed."""
        node = self.graph.nodes[name]
        if self.store is None or not node.stage.cacheable or name in self.force:
            return None
        table = self.store.read(node.stage.name, key)
        if table is None:
            return None
        needed = {*node.output_types, ERROR, ERROR_KIND, ROW_ID}
        if not needed <= set(table.column_names) or self._retry(table.column(ERROR_KIND).to_pylist()):
            return None
        want = shard.image_ids if node.granularity is Granularity.IMAGE else shard.sample_ids
        have = table.column(ROW_ID).to_pylist()
        if have != want:  # same rows in another order (the key does not depend on the order)
            position = {rid: i for i, rid in enumerate(have)}
            if len(position) != len(have) or sorted(have) != sorted(want):
                return None
            table = table.take(pa.array([position[r] for r in want], type=pa.int64()))
        return table

    # -- parts ------------------------------------------------------------------------------
    def _list_parts(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for f in self.output.list(PARTS):
            m = PART_RE.match(f.name)
            if m:
                found.setdefault(m["key"], []).append(f.name)
        return found

    def _usable_part(self, part_key: str) -> str | None:
        """The name of a good finished part for ``part_key`` (checked whole), or None."""
        for name in self._existing_parts.get(part_key, []):
            rel = f"{PARTS}/{name}"
            try:
                data = self.output.read_bytes(rel)
            except FileNotFoundError:
                continue
            problem = check_bytes(data, PART_RE.match(name)["sha"])
            if problem is not None:
                log.warning("warning: results part %s is corrupt (%s); removed, recomputing its shard",
                            self.output.display(rel), problem)
                self.summary.corrupt_discarded += 1
                self.output.delete(rel)
                continue
            if self._retry(parse_table(data, ["error_kind"]).column("error_kind").to_pylist()):
                continue
            return name
        return None

    # -- bookkeeping -----------------------------------------------------------------------
    def save(self, plan: ShardPlan, name: str, table: pa.Table, stats: NodeStats) -> None:
        node = self.graph.nodes[name]
        s = self.summary.nodes[name]
        s.computed_shards += 1
        s.rows += stats.rows
        s.errors += stats.errors
        s.seconds += stats.seconds
        s.calls += stats.calls
        s.peak_rss_mb = max(s.peak_rss_mb, stats.peak_rss_mb)
        s.peak_gpu_mb = max(s.peak_gpu_mb, stats.peak_gpu_mb)
        if self.store is not None and node.stage.cacheable:
            kinds = table.column(ERROR_KIND).to_pylist()
            meta = {"node": name, "graph": self.graph.name, "shard": plan.shard.index,
                    "errors": sum(k is not None for k in kinds), "transient_errors": kinds.count(TRANSIENT_ERROR)}
            self.store.write(node.stage.name, plan.keys[name], table, meta, described=self._identity[name])

    def note_cached(self, plan: ShardPlan) -> None:
        for name in plan.load:
            self.summary.nodes[name].cached_shards += 1

    def note_part_reused(self) -> None:
        self.summary.shards_from_parts += 1
        for s in self.summary.nodes.values():
            s.cached_shards += 1

    def write_part(self, plan: ShardPlan, tables: dict[str, pa.Table]) -> None:
        """Join the kept columns of one shard, one row per sample, and write it atomically."""
        shard = plan.shard
        cols: dict[str, pa.Array] = {c: shard.table.column(c) for c in SOURCE_RESULT_COLUMNS}
        take_images = pa.array(shard.image_rows)

        def per_sample(name: str, column: str):
            col = tables[name].column(column)
            return col.take(take_images) if name in self.per_image else col

        for ref in self.graph.outputs:
            if ref.node == SOURCE:
                cols[ref.column] = shard.table.column(ref.column)
            else:
                cols[str(ref)] = per_sample(ref.node, ref.column)
        errors: list[str | None] = list(shard.sample_errors)
        kinds: list[str | None] = [SOURCE_ERROR if e else None for e in errors]
        for name in plan.final:
            messages = per_sample(name, ERROR).to_pylist()
            node_kinds = per_sample(name, ERROR_KIND).to_pylist()
            for i, msg in enumerate(messages):
                if msg is not None and errors[i] is None:
                    errors[i], kinds[i] = msg, node_kinds[i] or DATA_ERROR
        cols["status"] = pa.array(["error" if e else "ok" for e in errors], type=pa.string())
        cols["error"] = pa.array(errors, type=pa.string())
        cols["error_kind"] = pa.array(kinds, type=pa.string())
        data = table_bytes(pa.table(cols))
        name = f"part-{plan.part_key}.{hashlib.sha256(data).hexdigest()}.parquet"
        self.output.write_bytes_atomic(f"{PARTS}/{name}", data, self.writer_id)
        self.part_files[shard.index] = name

    # -- finishing -------------------------------------------------------------------------
    def clean_output(self) -> int:
        """Remove temporary files left in the run folder by runs that died (the caller holds the
        folder's lock, so no live run writes there). Returns how many were removed."""
        removed = 0
        for folder in ("", PARTS):
            for f in self.output.list(folder):
                if f.name.startswith(".") and ".tmp-" in f.name:
                    removed += self.output.delete(f"{folder}/{f.name}" if folder else f.name)
        return removed

    def finish(self, executor: str, device: str, args: dict) -> RunSummary:
        """Concatenate the parts into results.parquet, drop stale parts, write the manifest."""
        expected = set(filter(None, self.part_files))
        for f in self.output.list(PARTS):  # other versions of the graph, older layouts
            if f.name.startswith("part-") and f.name not in expected:
                self.output.delete(f"{PARTS}/{f.name}")
        summary = self.summary
        summary.shards = len(self.part_files)
        if self.store is not None:
            summary.corrupt_discarded += len(self.store.discarded)
        means: dict[str, list[float]] = {}
        results = None
        parts = [name for name in self.part_files if name]
        if parts:  # streamed part by part: memory stays flat however many samples
            with self.output.atomic_writer(RESULTS, self.writer_id) as sink:
                writer = None
                for name in parts:
                    table = self._read_part(name)
                    if writer is None:
                        writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
                    writer.write_table(table)
                    self._summarise(table, means)
                writer.close()
            results = {"file": RESULTS, "rows": summary.samples, "bytes": sink.size,
                       "sha256": sink.sha256.hexdigest()}
        summary.metrics = {k: v[0] / v[1] for k, v in means.items() if v[1]}
        summary.seconds = time.time() - self.started
        self.write_manifest("finished", executor, device, args, results)
        return summary

    def _read_part(self, name: str) -> pa.Table:
        rel = f"{PARTS}/{name}"
        data = self.output.read_bytes(rel)
        problem = check_bytes(data, PART_RE.match(name)["sha"])
        if problem is not None:
            self.output.delete(rel)
            raise RunError(f"results part {self.output.display(rel)} went bad during the run ({problem}); "
                           "it was removed: run the same command again to recompute it")
        return parse_table(data)

    def _summarise(self, table: pa.Table, means: dict[str, list[float]]) -> None:
        """Add one part's rows to the summary: counts, error examples, sums of numeric columns."""
        summary = self.summary
        summary.samples += table.num_rows
        bad = pc.equal(table.column("status"), "error")
        summary.errors += pc.sum(bad).as_py() or 0
        summary.transient_errors += pc.sum(pc.equal(table.column("error_kind"), TRANSIENT_ERROR)).as_py() or 0
        if len(summary.error_examples) < 5:
            failed = table.filter(bad)
            for sid, msg in zip(failed.column("sample_id").to_pylist(), failed.column("error").to_pylist()):
                if len(summary.error_examples) < 5:
                    summary.error_examples.append(f"{sid}: {msg}")
        for col_name in table.column_names:
            t = table.schema.field(col_name).type
            if "." in col_name and (pa.types.is_floating(t) or pa.types.is_integer(t)) \
                    and not (is_fixed_tensor(t) or is_variable_tensor(t)):
                col = table.column(col_name)
                acc = means.setdefault(col_name, [0.0, 0])
                acc[0] += pc.sum(col).as_py() or 0.0
                acc[1] += len(col) - col.null_count

    def write_manifest(self, status: str, executor: str, device: str, args: dict, results: dict | None = None) -> None:
        seeds = {f"{n}.{k}": v for n, nd in self.graph.nodes.items()
                 for k, v in nd.stage.params.model_dump(mode="json").items() if "seed" in k}
        seeds.update({f"dataset.{k}": v for k, v in self.graph.raw["dataset"]["params"].items() if "seed" in k})
        manifest = {
            "status": status,
            "graph_file": self.graph.path,
            "graph_hash": self.graph.hash,
            "graph": self.graph.raw,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S") if status == "finished" else None,
            "executor": executor,
            "device": device,
            "arguments": args,
            "versions": package_versions(),
            "weights": self.weights,
            "identity": self._identity,
            "seeds": seeds,
            "results": results,
            "parts": [name for name in self.part_files if name],
            "totals": {k: v for k, v in asdict(self.summary).items() if k not in ("nodes", "output")},
            "nodes": {n: asdict(s) for n, s in self.summary.nodes.items()},
            "cache": self.store.root if self.store else None,
            "cache_discarded": self.store.discarded if self.store else [],
        }
        self.output.write_bytes_atomic(MANIFEST, json.dumps(manifest, indent=2, default=str).encode(),
                                       self.writer_id)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("pnpvqa-runtime", "numpy", "pyarrow", "ray", "torch", "transformers", "timm", "pydantic"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_results(output: Location | str | Path) -> pa.Table:
    """A run folder's results table (local folder or URI)."""
    loc = output if isinstance(output, Location) else Location(output)
    return pq.read_table(pa.BufferReader(loc.read_bytes(RESULTS)))


def format_summary(summary: RunSummary, graph: Graph) -> str:
    """The table printed at the end of a run."""
    head = f"{'node':<18} {'stage':<18} {'rows':>7} {'run':>5} {'cached':>6} {'errors':>6} {'time s':>8} {'peak RSS MB':>11}"
    gpu = any(s.peak_gpu_mb for s in summary.nodes.values())
    if gpu:
        head += f" {'GPU MB':>8}"
    lines = [head, "-" * len(head)]
    for name, s in summary.nodes.items():
        line = (f"{name:<18} {s.stage:<18} {s.rows:>7} {s.computed_shards:>5} {s.cached_shards:>6} {s.errors:>6} "
                f"{s.seconds:>8.2f} {s.peak_rss_mb:>11.0f}")
        if gpu:
            line += f" {s.peak_gpu_mb:>8.0f}"
        lines.append(line)
    lines.append("-" * len(head))
    lines.append(f"{summary.samples} samples in {summary.shards} shards ({summary.shards_from_parts} already done), "
                 f"{summary.errors} errors, {summary.seconds:.1f} s")
    if summary.transient_errors:
        lines.append(f"  {summary.transient_errors} rows failed in ways another attempt may not repeat "
                     "(out of memory, timeout, lost worker): run the same command again to retry them")
    if summary.corrupt_discarded:
        lines.append(f"  {summary.corrupt_discarded} corrupt cache entries or parts were found, removed and recomputed")
    for k, v in summary.metrics.items():
        lines.append(f"  mean {k}: {v:.4f}")
    for ex in summary.error_examples:
        lines.append(f"  error: {ex}")
    lines.append(f"results: {summary.results}")
    return "\n".join(lines)
