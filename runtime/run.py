"""One run of a graph: shard plans, cache keys, run folder (parts, results, manifest), summary.

Each (node, shard) result is keyed by stage name + version + params + weights fingerprint +
the keys of its inputs + the shard's content fingerprint. A node is computed for a shard only
when its result is needed and not cached; non-cacheable nodes (decoded images, big tensors)
are recomputed in memory when a node that needs them runs.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artifacts.columns import is_fixed_tensor, is_variable_tensor
from artifacts.fingerprint import fingerprint
from artifacts.store import Store, write_table_atomic
from runtime.graph import SOURCE, Graph
from runtime.node_runner import ERROR, NodeStats
from runtime.shards import Shard
from stages.base import Granularity

RESULTS = "results.parquet"
MANIFEST = "manifest.json"


@dataclass
class ShardPlan:
    shard: Shard
    keys: dict[str, str]
    compute: list[str]   # nodes to run, in topological order
    load: list[str]      # nodes read from the cache
    final: list[str]     # nodes whose rows make the results (kept outputs + sinks)
    part_path: Path


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
    output: Path
    samples: int = 0
    errors: int = 0
    shards: int = 0
    shards_from_parts: int = 0
    seconds: float = 0.0
    nodes: dict[str, NodeSummary] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)


class RunContext:
    """State shared by the executors for one run."""

    def __init__(self, graph: Graph, output: Path, store: Store | None, force: set[str]):
        self.graph = graph
        self.output = output
        self.parts = output / "parts"
        self.store = store
        self.force = set(force)
        for name in list(force):
            self.force |= graph.descendants(name)
        self.weights = {name: node.stage.weights_fingerprint() for name, node in graph.nodes.items()}
        self.per_image = {n for n, nd in graph.nodes.items() if nd.granularity is Granularity.IMAGE}
        consumers = {up for n in graph.nodes for up in graph.upstream(n)}
        kept = {r.node for r in graph.outputs if r.node != SOURCE}
        self.final = [n for n in graph.nodes if n in kept or n not in consumers]
        self.summary = RunSummary(output, nodes={n: NodeSummary(nd.stage.name) for n, nd in graph.nodes.items()})
        self.started = time.time()
        self.part_files: list[Path] = []

    # -- planning --------------------------------------------------------------------------
    def keys(self, shard: Shard) -> dict[str, str]:
        keys: dict[str, str] = {}
        for name, node in self.graph.nodes.items():
            wired = {inp: [SOURCE if r.node == SOURCE else keys[r.node], r.column] for inp, r in node.inputs.items()}
            keys[name] = fingerprint(node.stage.name, node.stage.version, node.stage.params.model_dump(mode="json"),
                                     self.weights[name], wired, node.granularity.value, shard.fingerprint)
        return keys

    def cached(self, name: str, key: str) -> bool:
        node = self.graph.nodes[name]
        return (self.store is not None and node.stage.cacheable and name not in self.force
                and self.store.has(node.stage.name, key))

    def plan(self, shard: Shard) -> ShardPlan | None:
        """What to compute and load for ``shard``; None when its results part already exists."""
        keys = self.keys(shard)
        part_key = fingerprint(shard.fingerprint, [keys[n] for n in self.final], [str(r) for r in self.graph.outputs])
        part = self.parts / f"part-{shard.index:06d}-{part_key[:16]}.parquet"
        self.part_files.append(part)
        if part.exists() and not self.force and self.store is not None:
            return None
        compute, load, seen = set(), set(), set()
        stack = list(self.final)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if self.cached(name, keys[name]):
                load.add(name)
                continue
            compute.add(name)
            stack.extend(self.graph.upstream(name))
        order = list(self.graph.nodes)
        return ShardPlan(shard, keys, [n for n in order if n in compute], [n for n in order if n in load],
                         self.final, part)

    # -- bookkeeping -----------------------------------------------------------------------
    def load(self, plan: ShardPlan, name: str) -> pa.Table:
        node = self.graph.nodes[name]
        return self.store.read(node.stage.name, plan.keys[name])

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
            meta = {"node": name, "graph": self.graph.name, "version": node.stage.version,
                    "params": node.stage.params.model_dump(mode="json"), "shard": plan.shard.index,
                    "rows": table.num_rows}
            self.store.write(node.stage.name, plan.keys[name], table, meta)

    def note_cached(self, plan: ShardPlan) -> None:
        for name in plan.load:
            s = self.summary.nodes[name]
            s.cached_shards += 1

    def note_part_reused(self) -> None:
        self.summary.shards_from_parts += 1
        for s in self.summary.nodes.values():
            s.cached_shards += 1

    def write_part(self, plan: ShardPlan, tables: dict[str, pa.Table]) -> None:
        """Join the kept columns of one shard, one row per sample, and write it atomically."""
        shard = plan.shard
        cols: dict[str, pa.Array] = {
            "sample_id": shard.table.column("sample_id"),
            "image_id": shard.table.column("image_id"),
            "question": shard.table.column("question"),
        }
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
        for name in plan.final:
            for i, msg in enumerate(per_sample(name, ERROR).to_pylist()):
                if msg is not None and errors[i] is None:
                    errors[i] = msg
        cols["status"] = pa.array(["error" if e else "ok" for e in errors], type=pa.string())
        cols["error"] = pa.array(errors, type=pa.string())
        write_table_atomic(plan.part_path, pa.table(cols))

    # -- finishing -------------------------------------------------------------------------
    def finish(self, executor: str, device: str, args: dict) -> RunSummary:
        """Concatenate the parts into results.parquet, drop stale parts, write the manifest."""
        expected = set(self.part_files)
        for stale in self.parts.glob("part-*.parquet"):
            if stale not in expected:
                stale.unlink()
        summary = self.summary
        summary.shards = len(self.part_files)
        tmp = self.output / f".{RESULTS}.tmp"
        writer = None
        means: dict[str, list[float]] = {}
        try:
            for part in self.part_files:
                table = pq.read_table(part)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
                summary.samples += table.num_rows
                status = table.column("status")
                bad = pc.equal(status, "error")
                summary.errors += pc.sum(bad).as_py() or 0
                if len(summary.error_examples) < 5:
                    for sid, msg in zip(table.filter(bad).column("sample_id").to_pylist(),
                                        table.filter(bad).column("error").to_pylist()):
                        if len(summary.error_examples) < 5:
                            summary.error_examples.append(f"{sid}: {msg}")
                for name in table.column_names:
                    t = table.schema.field(name).type
                    if "." in name and (pa.types.is_floating(t) or pa.types.is_integer(t)) \
                            and not (is_fixed_tensor(t) or is_variable_tensor(t)):
                        col = table.column(name)
                        acc = means.setdefault(name, [0.0, 0])
                        acc[0] += pc.sum(col).as_py() or 0.0
                        acc[1] += len(col) - col.null_count
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            tmp.replace(self.output / RESULTS)
        summary.metrics = {k: v[0] / v[1] for k, v in means.items() if v[1]}
        summary.seconds = time.time() - self.started
        self.write_manifest("finished", executor, device, args)
        return summary

    def write_manifest(self, status: str, executor: str, device: str, args: dict) -> None:
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
            "seeds": seeds,
            "totals": {k: v for k, v in asdict(self.summary).items() if k not in ("nodes", "output")},
            "nodes": {n: asdict(s) for n, s in self.summary.nodes.items()},
            "cache": str(self.store.root) if self.store else None,
        }
        self.output.mkdir(parents=True, exist_ok=True)
        tmp = self.output / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        tmp.replace(self.output / MANIFEST)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("pnpvqa-runtime", "numpy", "pyarrow", "ray", "torch", "transformers", "timm", "pydantic"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


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
    for k, v in summary.metrics.items():
        lines.append(f"  mean {k}: {v:.4f}")
    for ex in summary.error_examples:
        lines.append(f"  error: {ex}")
    lines.append(f"results: {summary.output / RESULTS}")
    return "\n".join(lines)
