"""The ``runtime`` command: run, validate, show, stages, sources, cache."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from runtime.errors import GraphError, UsageError
from runtime.params_doc import describe_params

EPILOG = """examples:
  runtime run graphs/oracle_heatmap.yaml                 run on the bundled synthetic sample
  runtime run graphs/pnp_vqa.yaml graphs/esam_enhanced.yaml   two variants in one pass (a sweep)
  runtime run graphs/pnp_vqa.yaml --preset large --random-weights --profile   time the published sizes
  runtime run graphs/oracle_heatmap.yaml --executor local --limit 20
  runtime run graphs/oracle_heatmap.yaml --set points.num_points=3 --set dataset.num_images=64
  runtime run graphs/pnp_vqa.yaml graphs/esam_enhanced.yaml --dataset datasets/vqav2_val.yaml   a sweep on VQAv2
  runtime validate graphs/oracle_heatmap.yaml             check a graph without running it
  runtime show graphs/oracle_heatmap.yaml --dot | dot -Tpng > graph.png
  runtime run graphs/qavit.yaml --overlay graphs/overlays/faithfulness.yaml --limit 16   score its heatmap without masks
  runtime stages heatmap_points                          params and columns of one stage
  runtime cache ls ; runtime cache verify ; runtime cache gc --older-than 30
  runtime report runs/esam_enhanced runs/pnp_vqa          HTML report with both runs side by side
  runtime compare runs/esam_enhanced runs/pnp_vqa         metrics per run and disagreements, in the terminal
  runtime export runs/pnp_vqa_vqav2_large --format vqav2   answers for the VQAv2 evaluation server
  runtime train fusion --out runs/fusion_train           train the BLIP + SAM fusion module
  runtime quality                                        every variant on held-out shapes data -> docs/quality.md
"""


def _train_usage() -> str:
    from runtime.commands import TRAINERS

    width = max(map(len, TRAINERS))
    return ("usage: runtime train MODEL --out DIR [options]\n\nmodels:\n"
            + "".join(f"  {name:<{width}}  {t.description}\n" for name, t in TRAINERS.items())
            + "\n`runtime train MODEL --help` lists the options of one; docs/training.md explains them.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runtime", description="Run question-guided heatmap variants of "
                                "plug-and-play VQA as typed, cached, resumable graphs.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def graph_args(sp, several: str | None = None):
        if several:
            sp.add_argument("graph", nargs="+", help=f"graph YAML file (see graphs/); {several}")
        else:
            sp.add_argument("graph", help="graph YAML file (see graphs/)")
        sp.add_argument("--dataset", metavar="FILE.yaml",
                        help="a dataset file (a graph's dataset block: source + params; see datasets/) replacing "
                             "the graphs' own; its relative paths are relative to the file; --set dataset.PARAM "
                             "still applies on top")
        sp.add_argument("--preset", metavar="NAME", action="append", default=[],
                        help="model preset for every model node that offers it (BLIP / UnifiedQA: tiny, base, large, "
                             "3b; EfficientSAM: tiny, vitt, vits); repeatable, e.g. --preset large --preset vitt")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="compute type of every model node that has a dtype param (BLIP, UnifiedQA, EfficientSAM "
                             "embedding; default float32); part of the cache key")
        sp.add_argument("--random-weights", action="store_true",
                        help="give every model without an explicit checkpoint seeded random weights at its "
                             "preset's real size (e.g. --preset large --random-weights): for timing the published "
                             "architectures without their files; marked in the manifest, refused by quality")
        sp.add_argument("--weights", metavar="DIR",
                        help="folder of real checkpoints under their standard names (sets $PNPVQA_WEIGHTS)")
        sp.add_argument("--overlay", metavar="FILE.yaml", action="append", default=[],
                        help="an overlay file (see graphs/overlays/) whose template nodes attach to every output "
                             "of their roles, e.g. graphs/overlays/faithfulness.yaml scores every heatmap; "
                             "repeatable; adds the overlay's name to the graph's (its run folder)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.PARAM=VALUE",
                        help="override a node param (or dataset.PARAM, NODE.batch_size, "
                             "shard_size) without editing the file; repeatable; VALUE is parsed as YAML")

    r = sub.add_parser("run", help="validate and run a graph", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Validate and run a graph. Results go to OUTPUT/results.parquet (one row per "
                       "sample: kept columns as NODE.COLUMN, status, error) with a manifest.json. Killed runs resume "
                       "with the same command; finished (node, shard) results are served from the cache. Several "
                       "graphs over one dataset run as a sweep: each shard goes through every graph, nodes with the "
                       "same key are computed once, each model loads once, and each graph gets its own run folder "
                       "(OUTPUT/<graph name> with --output).")
    graph_args(r, several="several graphs over one dataset run as a sweep: in one pass, sharing every node they "
               "have in common")
    r.add_argument("--executor", choices=["auto", "ray", "local"], default="auto",
                   help="auto (default): Ray for --address or runs of 500 samples or more, local below (Ray's "
                   "start-up, about 25 s on 2 cores, would dominate a small run); ray: shards spread over Ray "
                   "workers (an embedded local Ray, or --address); local: shards one after another in this process")
    r.add_argument("--output", "-o", metavar="DIR|URI", help="run folder or URI (default: runs/<graph name>); "
                   "one run at a time per folder; for a sweep, the folder holding one run folder per graph")
    r.add_argument("--limit", type=int, metavar="N", help="only the first N samples")
    r.add_argument("--ids", metavar="ID,ID|@FILE", help="only these sample ids (comma list, or @file with one id a line)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where models run (default: cuda if available)")
    r.add_argument("--address", metavar="ADDR", help="join an existing Ray cluster (e.g. auto, or head:6379); "
                   "its nodes need this project installed and the --cache / --output locations reachable (README)")
    r.add_argument("--workers", type=int, metavar="N", help="Ray workers, each running the whole graph on one "
                   "shard at a time (default: one per GPU share on GPUs, one per CPU up to 4 on CPUs)")
    r.add_argument("--threads", type=int, metavar="N", help="CPU threads for the models of each process (default: "
                   "local: the CPUs this process may use; Ray: each worker's CPU share); recorded in the manifest")
    r.add_argument("--gpus-per-worker", type=float, metavar="G",
                   help="GPUs each Ray worker asks for (default: what the graph's model stages declare, at most 1, "
                   "so they share one GPU; 0.5 puts two workers on a GPU; 2 gives a worker two GPUs)")
    r.add_argument("--cache", metavar="DIR|URI", help="cache folder or URI, e.g. s3://bucket/cache, shared by runs "
                   "and machines (default: $RUNTIME_CACHE_DIR or ./.runtime_cache; docs/store.md)")
    r.add_argument("--no-cache", action="store_true", help="neither read nor write the cache (recompute everything)")
    r.add_argument("--force", action="append", default=[], metavar="NODE",
                   help="recompute NODE and everything downstream of it, ignoring cached results; repeatable")
    r.add_argument("--retry-errors", action="store_true",
                   help="recompute rows that failed on their data too (rows that failed transiently, e.g. out of "
                   "memory, are always retried)")
    r.add_argument("--wait", action="store_true", help="when another run holds the output folder, wait for it "
                   "instead of stopping")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress: no bars, no [progress] lines")
    r.add_argument("--debug", action="store_true", help="print tracebacks of failing rows and errors")
    r.add_argument("--profile", action="store_true", help="count the time inside model forward and backward passes "
                   "per node (manifest: model_seconds) and print its share of the run's wall time")

    v = sub.add_parser("validate", help="check graph files without running them")
    graph_args(v, several="each is checked, and every problem of each reported")
    s = sub.add_parser("show", help="print the resolved graph (after extends, overlays and --set)")
    graph_args(s)
    s.add_argument("--dot", action="store_true", help="print Graphviz DOT instead of YAML")

    st = sub.add_parser("stages", help="list stages with their params and input/output columns")
    st.add_argument("name", nargs="?", help="only this stage")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    so = sub.add_parser("sources", help="list dataset sources with their params and columns")
    so.add_argument("name", nargs="?", help="only this source")

    t = sub.add_parser("train", help="train a model (`runtime train --help` lists them; docs/training.md)",
                       add_help=False)
    from runtime.commands import TRAINERS

    # the registry itself: plugins' trainers are looked up only when `runtime train` runs
    t.add_argument("model", choices=TRAINERS, help="what to train (`runtime train` lists them)")
    t.add_argument("args", nargs=argparse.REMAINDER, help="options of the training command")

    from runtime.commands import REPORTS

    for report in REPORTS.values():  # listed here; `main` hands them their arguments before any parsing
        sub.add_parser(report.name, help=report.description, add_help=False) \
            .add_argument("args", nargs=argparse.REMAINDER, help=f"options of the {report.name} command")

    from runtime.cache_commands import add_cache_parser
    from runtime.export import add_export_parser

    add_cache_parser(sub)
    add_export_parser(sub)
    return p


def _parse_ids(text: str | None) -> set[str] | None:
    if text is None:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.exists():
            raise UsageError(f"--ids {text}: file {path} not found (one sample id a line)")
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    return {t.strip() for t in text.split(",") if t.strip()}


def _settings(a):
    """The settings of a run / validate / show command's flags (the environment fills in what
    they leave out), applied to this process: the graphs' model nodes look for their weights."""
    from runtime.settings import RunSettings

    weights = None
    if a.weights:
        if not Path(a.weights).is_dir():
            raise UsageError(f"--weights {a.weights}: no such folder (it should hold the checkpoints under their "
                             "standard names; see README, 'Real checkpoints')")
        weights = Path(a.weights).resolve()
    settings = RunSettings.from_environment(debug=getattr(a, "debug", False), profile=getattr(a, "profile", False),
                                            weights=weights, random_weights=a.random_weights)
    settings.apply_to_process()
    return settings


def _load(a, path: str | None = None):
    """Validate the graph of a run / validate / show command, after ``_settings`` and --preset."""
    from runtime.graph import load_graph

    graph = load_graph(path or a.graph, a.overrides, presets=a.preset, dtype=a.dtype, dataset=a.dataset,
                       overlays=a.overlay)
    if a.preset and "tiny" not in a.preset:
        left = [n for n, nd in graph.nodes.items() if getattr(nd.stage.params, "preset", None) == "tiny"]
        if left:
            print(f"warning: {', '.join(left)} still use the random 'tiny' preset; add --preset for them "
                  "(e.g. --preset vitt for EfficientSAM) or --set NODE.preset=...", file=sys.stderr)
    return graph


def _warn_notes(graph) -> None:
    """What validation dropped from ``graph`` (removed or skipped nodes' columns), one line each."""
    for note in graph.notes:
        print(f"warning: {graph.path}: {note}", file=sys.stderr)


def _cmd_run(a) -> int:
    from runtime.api import run_graphs
    from runtime.run import format_summary

    settings = _settings(a)
    graphs = [_load(a, path) for path in a.graph]
    for graph in graphs:
        _warn_notes(graph)
    outputs = None
    if a.output:
        outputs = [a.output] if len(graphs) == 1 else [f"{a.output.rstrip('/')}/{g.name}" for g in graphs]
    summaries = run_graphs(graphs, executor=a.executor, outputs=outputs, cache_dir=a.cache, no_cache=a.no_cache,
                           force=a.force, limit=a.limit, ids=_parse_ids(a.ids), device=a.device, address=a.address,
                           workers=a.workers, gpus_per_worker=a.gpus_per_worker, threads=a.threads,
                           progress=not a.quiet, retry_errors=a.retry_errors, wait=a.wait, settings=settings,
                           arguments={"graph": " ".join(a.graph), "overrides": a.overrides, "preset": a.preset,
                                      "dtype": a.dtype,
                                      "weights": a.weights, **({"overlay": a.overlay} if a.overlay else {}), **({"dataset": a.dataset} if a.dataset else {})})
    for graph, summary in zip(graphs, summaries):
        if len(graphs) > 1:
            print(f"== {graph.name} ({graph.path})")
        print(format_summary(summary, graph))
    return 0


def _cmd_validate(a) -> int:
    from runtime.api import check_sources

    _settings(a)
    problems = []
    for path in a.graph:  # every graph is checked: one run of validate reports all of a sweep's problems
        try:
            g = _load(a, path)
            check_sources(g)
        except GraphError as exc:  # a shared dataset file's problems once, not once per graph
            problems += [p for p in exc.problems if p not in problems]
            continue
        print(f"{path}: ok — {len(g.nodes)} nodes, source '{g.source.name}', {len(g.outputs)} kept outputs")
        for note in g.notes:
            print(f"  {note}")
    if problems:
        raise GraphError(problems)
    return 0


def _cmd_show(a) -> int:
    import yaml

    from artifacts.columns import describe_type

    _settings(a)
    g = _load(a)
    _warn_notes(g)
    if a.dot:
        print(g.to_dot())
        return 0
    doc = dict(g.raw)
    doc["graph_hash"] = g.hash
    doc["columns"] = {f"{n}.{c}": describe_type(t) for n, nd in g.nodes.items() for c, t in nd.output_types.items()}
    print(yaml.safe_dump(doc, sort_keys=False, width=100))
    return 0


def _selected(name: str | None, known: list[str], what: str) -> list[str]:
    """``[name]`` when given (a usage error listing ``known`` when it is not one of them), else ``known``."""
    if not name:
        return known
    if name not in known:
        raise UsageError(f"no {what} '{name}'; {what}s: {', '.join(known)}")
    return [name]


def _cmd_stages(a) -> int:
    from artifacts.columns import describe_type
    from stages import STAGES

    names = _selected(a.name, sorted(STAGES), "stage")
    if a.json:
        out = {}
        for n in names:
            cls = STAGES[n]
            out[n] = {"version": cls.version, "granularity": cls.granularity.value, "cacheable": cls.cacheable,
                      "doc": cls.describe(), "defined_in": STAGES.origin(n), "params": cls.Params.model_json_schema(),
                      "roles": {k: o.role.value for k, o in cls(cls.Params()).outputs().items() if o.role is not None}}
        print(json.dumps(out, indent=2))
        return 0
    for n in names:
        cls = STAGES[n]
        stage = cls(cls.Params())
        print(f"{n}  (v{cls.version}, per {cls.granularity.value}, {'cached' if cls.cacheable else 'not cached'}, "
              f"batch {_batch_sizes(cls.resources)}{', gpu %.2f' % cls.resources.gpu if cls.resources.gpu else ''})")
        print(f"  {cls.describe()}")
        print(f"  defined in: {STAGES.origin(n)}")
        print("  params:")
        print("\n".join(describe_params(cls.Params)))
        print("  inputs:")
        for k, i in stage.inputs().items():
            flags = ", ".join(f for f, on in (("optional", i.optional), ("once per image", i.per_image)) if on)
            print(f"    {k}: {describe_type(i.spec)}{f' ({flags})' if flags else ''} — {i.doc}")
        print("  outputs:")
        for k, o in stage.outputs().items():
            role = f" [role: {o.role.value}]" if o.role is not None else ""
            print(f"    {k}: {describe_type(o.spec)}{role} — {o.doc}")
        print()
    return 0


def _cmd_sources(a) -> int:
    from artifacts.columns import describe_type
    from sources import BASE_COLUMNS, SOURCES

    for n in _selected(a.name, list(SOURCES), "source"):
        cls = SOURCES[n]
        print(f"{n}\n  {cls.describe()}\n  defined in: {SOURCES.origin(n)}\n  params:")
        print("\n".join(describe_params(cls.Params)))
        try:
            cols = cls(cls.Params()).columns()
        except Exception:  # noqa: BLE001 - sources with required params: show the base columns
            cols = BASE_COLUMNS
        print("  columns:")
        for k, c in cols.items():
            print(f"    {k}: {describe_type(c.type)}{' (per image)' if c.image_level else ''} — {c.doc}")
        print()
    return 0


def _batch_sizes(resources) -> str:
    cuda = resources.cuda_batch_size
    return str(resources.batch_size) + (f", on a GPU {cuda}" if cuda and cuda != resources.batch_size else "")


def _cmd_cache(a) -> int:
    from artifacts.store import Store
    from runtime.api import default_cache_dir, folder_location
    from runtime.cache_commands import cache_main

    return cache_main(a, Store(folder_location(a.cache or default_cache_dir(), "--cache")))


def _cmd_export(a) -> int:
    from runtime.export import export_main

    return export_main(a)


def _cmd_train(a) -> int:
    from runtime.commands import TRAINERS

    return TRAINERS[a.model].main()(a.args) or 0


COMMANDS = {"export": _cmd_export, "run": _cmd_run, "train": _cmd_train, "validate": _cmd_validate, "show": _cmd_show, "stages": _cmd_stages,
            "sources": _cmd_sources, "cache": _cmd_cache}


# exit status when the reader of our output went away (`runtime stages | head`): 128 + SIGPIPE, as for a
# program the signal ends, so `set -o pipefail` scripts still see that the output was cut
CLOSED_PIPE_STATUS = 141


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit quietly when stdout is a pipe closed early."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a warning when the interpreter exits
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the flush at exit writes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE_STATUS


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"] and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        print(_train_usage())
        return 0 if len(argv) > 1 else 2
    from runtime.commands import REPORTS

    # a report parses its own options (argparse's REMAINDER would not take a first one starting with "--")
    report, a = REPORTS.get(argv[0]) if argv else None, None
    if report is None:
        parser = _parser()
        a = parser.parse_args(argv)
        if a.command is None:
            parser.print_help()
            return 2
    try:
        return report.main()(argv[1:]) if report else COMMANDS[a.command](a)
    except GraphError as exc:
        n = len(exc.problems)
        print(f"error: {'the graph has ' + str(n) + ' problems' if n > 1 else 'invalid graph'}:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume (finished shards are kept)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # not an error of the command: `main` exits quietly
    except Exception as exc:  # noqa: BLE001
        from runtime.settings import DEBUG_ENV

        if getattr(a, "debug", False) or os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1
