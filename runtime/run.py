"""One run of a graph, on the driver: which shards are finished, the summary and the
manifest. The work of a shard is ``runtime.shard_work.ShardWork``; the files of the run
folder are ``runtime.run_folder.RunFolder``'s.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from artifacts.columns import is_fixed_tensor, is_variable_tensor
from artifacts.location import Location
from artifacts.store import Store
from runtime.code_identity import code_identity
from runtime.graph import Graph
from runtime.node_runner import TRANSIENT_ERROR
from runtime.run_folder import RESULTS, CorruptPart, RunFolder
from runtime.settings import RunSettings
from runtime.shard_work import ShardOutcome, ShardWork, Tracker, node_device
from runtime.shards import Shard
from stages.base import Role
from stages.evaluation import OfficialTally, official_line

log = logging.getLogger(__name__)


class RunError(Exception):
    """The run cannot finish as asked (a results part went bad under it)."""


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
    model_seconds: float = 0.0  # inside model forward / backward passes (only with --profile)


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
    evaluation: dict[str, dict] = field(default_factory=dict)  # per vqa_eval node: the official report
    error_examples: list[str] = field(default_factory=list)
    corrupt_discarded: int = 0
    produced_bytes: int = 0   # Arrow bytes of every table computed by the stages
    driver_bytes: int = 0     # bytes the driver sent to or received from workers (Ray)
    startup_seconds: float = 0.0  # Ray: from connecting to every worker being up
    workers: list[dict] = field(default_factory=list)
    random_weights: bool = False  # --random-weights: the models are untrained (not a total)
    warnings: list[str] = field(default_factory=list)  # said before work, kept in the manifest (not totals)
    sweep_seconds: float | None = None  # a graph of a sweep: the whole sweep's time (``seconds``: its share)
    record_of: str | None = None  # computed nothing: when the run whose record the manifest keeps started

    @property
    def results(self) -> Path | str:
        return self.output / RESULTS if isinstance(self.output, Path) else f"{self.output.rstrip('/')}/{RESULTS}"


def foreign_weights_warnings(graph: Graph) -> list[str]:
    """One line per kind of data that model nodes' weights were trained on when it is not the
    data of the graph's source (the shipped weights, trained on synthetic shapes, answer about
    other images with shapes words)."""
    nodes: dict[str, list[str]] = {}
    for name, node in graph.nodes.items():
        data = node.stage.trained_on()
        if data is not None and data != graph.source.data:
            nodes.setdefault(data, []).append(name)
    return [f"answers from weights trained on synthetic {data} ({', '.join(names)}): not meaningful on this data "
            f"(source {graph.source.name}); see --weights" for data, names in nodes.items()]


# the summary's fields that the manifest keeps elsewhere, or that are no totals
NOT_TOTALS = ("nodes", "output", "workers", "evaluation", "random_weights", "warnings", "record_of")
# what the record of the run that did the work is made of: a rerun that computes nothing keeps them
WORK_FIELDS = ("started", "finished", "executor", "device", "arguments", "workers", "nodes")
WORK_TOTALS = ("seconds", "sweep_seconds", "startup_seconds", "driver_bytes", "produced_bytes")


def keep_work_record(manifest: dict, earlier: dict) -> dict:
    """The manifest of a rerun that computed nothing with the record of the run that did the
    work (``earlier``): its start, end, executor, node times and totals of time; this rerun
    and those before it noted in ``reruns``."""
    rerun = {"started": manifest["started"], "finished": manifest["finished"], "executor": manifest["executor"],
             "seconds": manifest["totals"]["seconds"]}
    totals = {**manifest["totals"], **{k: v for k, v in earlier["totals"].items() if k in WORK_TOTALS}}
    return {**manifest, **{k: earlier[k] for k in WORK_FIELDS if k in earlier}, "totals": totals,
            "reruns": [*earlier.get("reruns", []), rerun]}


def sweep_shares(ctxs: list[RunContext]) -> list[float]:
    """Each graph's share of a sweep's time: the compute time of the nodes it computed over that
    of all graphs (a node shared by several graphs is computed once, by the first graph that
    needs it in a shard, and counts there); equal shares when nothing was computed."""
    work = [sum(s.seconds for s in ctx.summary.nodes.values()) for ctx in ctxs]
    total = sum(work)
    return [w / total if total else 1 / len(ctxs) for w in work]


def node_identity(graph: Graph, name: str, device: str, weights: str | None) -> dict:
    """Everything but the inputs that a node's cache key is made of (docs/store.md)."""
    stage = graph.nodes[name].stage
    code = code_identity(type(stage))
    return {"stage": stage.name, "version": stage.version, "params": stage.params.model_dump(mode="json"),
            "code": code.code, "libraries": dict(code.libraries), "device": node_device(stage, device),
            "dtype": stage.compute_dtype(), "weights": weights, "granularity": stage.granularity.value}


class RunContext:
    """The driver's side of one run: which shards are finished, the summary, the run folder."""

    def __init__(self, graph: Graph, output: RunFolder | Location | str | Path, store: Store | None, force: set[str],
                 device: str = "cpu", retry_errors: bool = False, settings: RunSettings = RunSettings()):
        self.graph = graph
        self.folder = output if isinstance(output, RunFolder) else RunFolder(output)
        self.store = store
        self.device = device
        self.settings = settings
        forced = set(force)
        for name in force:
            forced |= graph.descendants(name)
        self.weights = {name: node.stage.weights_fingerprint() for name, node in graph.nodes.items()}
        self.identities = {name: node_identity(graph, name, device, self.weights[name]) for name in graph.nodes}
        # what executors hand to workers: picklable, and all a worker needs to run a shard
        self.work = ShardWork(graph, self.identities, store.loc if store is not None else None, self.folder,
                              forced, retry_errors, device, settings)
        self.summary = RunSummary(self.folder.loc.local_path() or self.folder.display(),
                                  nodes={n: NodeSummary(nd.stage.name) for n, nd in graph.nodes.items()},
                                  random_weights=settings.random_weights,
                                  warnings=foreign_weights_warnings(graph))
        self.started = time.time()
        self.part_files: list[str | None] = []  # per shard index: the part's name under parts/
        self._existing_parts = self.folder.parts_by_key()
        self._running_manifest: tuple | None = None
        self._earlier: dict = {}  # the folder's manifest before this run began

    # -- which shards are finished -----------------------------------------------------------
    def keys(self, shard: Shard) -> dict[str, str]:
        return self.work.keys(shard)

    def needs(self, shard: Shard) -> bool:
        """Whether ``shard`` must be computed: no good finished part of it (checked whole) is in
        the run folder. Only with a store: without one nothing is reused."""
        while len(self.part_files) <= shard.index:
            self.part_files.append(None)
        if self.store is None or self.work.force:
            return True
        part_key = self.work.part_key(shard, self.work.keys(shard))
        for name in self._existing_parts.get(part_key, []):
            try:
                kinds = self.folder.read_part(name, ["error_kind"]).column("error_kind").to_pylist()
            except FileNotFoundError:
                continue
            except CorruptPart as bad:
                log.warning("warning: results part %s is corrupt (%s); removed, recomputing its shard",
                            bad.where, bad.problem)
                self.summary.corrupt_discarded += 1
                continue
            if self.work.stale(kinds):
                continue
            self.part_files[shard.index] = name
            self.summary.shards_from_parts += 1
            for s in self.summary.nodes.values():
                s.cached_shards += 1
            return False
        return True

    # -- running and bookkeeping ---------------------------------------------------------------
    def run_here(self, shard: Shard, worker: dict, memo: dict, stages: dict, tracker: Tracker | None = None) -> None:
        """Compute ``shard`` in this process (the local executor) and add its outcome.
        ``memo`` and ``stages``: tables and set-up stages shared with the other graphs of a sweep;
        ``tracker``: told of models loading and batches done."""
        self.work.stage_cache = stages
        self.absorb(self.work.run(shard, worker=worker, memo=memo, tracker=tracker))

    def fail(self, shard: Shard, message: str) -> None:
        """Give up on ``shard`` (its workers were lost): its rows fail transiently, to be retried."""
        self.absorb(self.work.write_failed_part(shard, message))

    def absorb(self, outcome: ShardOutcome) -> None:
        """Add a finished shard's outcome to the summary."""
        while len(self.part_files) <= outcome.index:
            self.part_files.append(None)
        self.part_files[outcome.index] = outcome.part
        for name, stats in outcome.computed.items():
            s = self.summary.nodes[name]
            s.computed_shards += 1
            s.rows += stats.rows
            s.errors += stats.errors
            s.seconds += stats.seconds
            s.calls += stats.calls
            s.model_seconds += stats.model_seconds
            s.peak_rss_mb = max(s.peak_rss_mb, stats.peak_rss_mb)
            s.peak_gpu_mb = max(s.peak_gpu_mb, stats.peak_gpu_mb)
        for name in outcome.loaded:
            self.summary.nodes[name].cached_shards += 1
        self.summary.corrupt_discarded += len(outcome.discarded)
        self.summary.produced_bytes += outcome.produced_bytes

    def begin(self, executor: str, device: str, args: dict) -> None:
        """Record this run as running, then remove the folder's last results: until this run
        finishes, the folder holds no results but its own."""
        self._earlier = self.folder.read_manifest()
        self.write_manifest("running", executor, device, args)
        self.folder.remove_results()

    def note_workers(self, workers: list[dict], startup_seconds: float) -> None:
        """Record where the run's workers are (in the running manifest too)."""
        self.summary.workers = workers
        self.summary.startup_seconds = startup_seconds
        if self._running_manifest is not None:
            self.write_manifest("running", *self._running_manifest)

    def note_driver_bytes(self, size: int) -> None:
        """Bytes the driver sent to or received from workers."""
        self.summary.driver_bytes += size

    # -- finishing -------------------------------------------------------------------------
    def finish(self, executor: str, device: str, args: dict, share: float = 1.0,
               sweep_seconds: float | None = None) -> RunSummary:
        """Concatenate the parts into results.parquet, drop stale parts, write the manifest.
        ``share``: this graph's share of a sweep's time (``sweep_shares``), ``sweep_seconds``
        that time, measured once for all of the sweep's graphs."""
        parts = [name for name in self.part_files if name]
        self.folder.remove_parts_except(set(parts))
        summary = self.summary
        summary.shards = len(self.part_files)
        self.work.close()  # the local executor's store: flush its index
        means: dict[str, list[float]] = {}
        scored = self._scored_columns()
        tallies = {node: OfficialTally(per_answer_type=self._metric(node) == "vqa") for node in scored}

        def add(table: pa.Table) -> None:  # one part at a time: nothing of the results is kept
            self._summarise(table, means)
            if not tallies:
                return
            types = {c: table.column(c).to_pylist() if c in table.column_names else None
                     for c in ("question_type", "answer_type")}
            failed = [status == "error" for status in table.column("status").to_pylist()]
            for node, column in scored.items():
                tallies[node].add(table.column(column).to_pylist(), types["question_type"],
                                  types["answer_type"], failed)

        results = None
        if parts:
            try:
                results = self.folder.write_results(parts, add)
            except CorruptPart as bad:
                raise RunError(f"results part {bad.where} went bad during the run ({bad.problem}); "
                               "it was removed: run the same command again to recompute it") from None
        summary.metrics = {k: v[0] / v[1] for k, v in means.items() if v[1]}
        for node, tally in tallies.items():
            summary.evaluation[node] = {"metric": self._metric(node), **tally.report()}
        wall = time.time() - self.started if sweep_seconds is None else sweep_seconds
        summary.seconds = share * wall
        summary.sweep_seconds = wall if share < 1 else None
        self.write_manifest("finished", executor, device, args, results)
        return summary

    def _work_record(self, results: dict | None) -> dict | None:
        """The manifest of the run that did the work, when this run computed nothing and wrote
        the same results (same graph, same parts, same bytes) as it."""
        earlier = self._earlier
        computed = any(s.computed_shards for s in self.summary.nodes.values())
        same = (earlier.get("status") == "finished" and earlier.get("graph_hash") == self.graph.hash
                and results is not None and (earlier.get("results") or {}).get("sha256") == results["sha256"])
        return earlier if same and not computed else None

    def _metric(self, node: str) -> str:
        return getattr(self.graph.nodes[node].stage.params, "metric", "vqa")  # vqa_eval's says gqa

    def _scored_columns(self) -> dict[str, str]:
        """Nodes whose accuracy (the role) is kept in the results: node -> results column."""
        return {column.split(".")[0]: column for column, role in self.graph.kept_roles().items()
                if role == Role.ACCURACY.value}

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
        if status == "running":
            self._running_manifest = (executor, device, args)
        seeds = {f"{n}.{k}": v for n, nd in self.graph.nodes.items()
                 for k, v in nd.stage.params.model_dump(mode="json").items() if "seed" in k}
        seeds.update({f"dataset.{k}": v for k, v in self.graph.raw["dataset"]["params"].items() if "seed" in k})
        manifest = {
            "status": status,
            "graph_file": self.graph.path,
            "graph_hash": self.graph.hash,
            "graph": self.graph.raw,
            "roles": self.graph.kept_roles(),  # what each kept column is: the report and export go by it
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S") if status == "finished" else None,
            "executor": executor,
            "device": device,
            "arguments": args,
            "versions": package_versions(),
            "weights": self.weights,
            "random_weights": self.settings.random_weights,  # for timing only, the results mean nothing
            "warnings": self.summary.warnings,
            "identity": self.identities,
            "workers": self.summary.workers,
            "seeds": seeds,
            "results": results,
            "parts": [name for name in self.part_files if name],
            "evaluation": self.summary.evaluation,
            "totals": {k: v for k, v in asdict(self.summary).items() if k not in NOT_TOTALS},
            "nodes": {n: asdict(s) for n, s in self.summary.nodes.items()},
            "cache": self.store.root if self.store else None,
        }
        earlier = self._work_record(results) if status == "finished" else None
        if earlier:
            manifest = keep_work_record(manifest, earlier)
            self.summary.record_of = manifest["started"]
        self.folder.write_manifest(json.dumps(manifest, indent=2, default=str).encode())


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
    return RunFolder(output).read_results()


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
                 f"{summary.errors} errors, {summary.seconds:.1f} s"
                 + (f" (its share of the sweep's {summary.sweep_seconds:.1f} s)" if summary.sweep_seconds else ""))
    if summary.record_of:
        lines.append(f"  nothing computed: the manifest keeps the record of the run started {summary.record_of} "
                     "and notes this rerun under 'reruns'")
    if summary.workers:
        lines.append(f"  Ray: {len(summary.workers)} workers up in {summary.startup_seconds:.1f} s; the driver "
                     f"carried {summary.driver_bytes / 2**20:.1f} MiB for {summary.produced_bytes / 2**20:.1f} MiB "
                     "the stages produced")
    model = sum(s.model_seconds for s in summary.nodes.values())
    if model:
        capacity = summary.seconds * max(1, len(summary.workers))
        lines.append(f"  inside model forward / backward passes: {model:.1f} s, {100 * model / capacity:.0f}% of the "
                     "wall time" + (f" of {len(summary.workers)} workers" if summary.workers else ""))
    for warning in summary.warnings:
        lines.append(f"  warning: {warning}")
    if summary.random_weights:
        lines.append("  RANDOM WEIGHTS (--random-weights): the models are untrained; use this run for timing only")
    if summary.transient_errors:
        lines.append(f"  {summary.transient_errors} rows failed in ways another attempt may not repeat "
                     "(out of memory, timeout, lost worker): run the same command again to retry them")
    if summary.corrupt_discarded:
        lines.append(f"  {summary.corrupt_discarded} corrupt cache entries or parts were found, removed and recomputed")
    for node, report in summary.evaluation.items():
        if report.get("overall") is not None:
            types = ", ".join(f"{t} {v:.2f}" for t, v in sorted((report.get("perAnswerType") or {}).items()))
            name = "VQA accuracy" if report["metric"] == "vqa" else "GQA accuracy"
            lines.append(f"  {name} ({node}, official): {official_line(report)}"
                         + (f"; per answer type: {types}" if types else ""))
    for k, v in summary.metrics.items():
        lines.append(f"  mean {k}: {v:.4f}")
    for ex in summary.error_examples:
        lines.append(f"  error: {ex}")
    lines.append(f"results: {summary.results}")
    return "\n".join(lines)
