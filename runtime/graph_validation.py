"""Validation of a graph document: every problem with the file, node and field, and what
would be valid; a valid document becomes a ``Graph``."""

from __future__ import annotations

import difflib
import graphlib
import re
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from artifacts.columns import describe_type, match_spec
from runtime.errors import GraphError, Problem, shown
from runtime.graph_files import DATASET_KEYS, SOURCE, Ref, parse_ref, without_nodes
from runtime.graph_model import Graph, Node
from runtime.params_check import holds_stray_bool
from runtime.params_doc import allowed_range, type_name
from sources import SOURCES
from sources.base import Source
from stages import STAGES
from stages.base import Granularity, Stage

NODE_KEYS = {"stage", "params", "inputs", "batch_size", "optional"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a graph's name is its run folder's (runs/NAME, OUTPUT/NAME of a sweep): one plain path component
GRAPH_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DEFAULT_SHARD_SIZE = 256


def _suggest(word: object, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1) if isinstance(word, str) else []
    return f"did you mean '{close[0]}'? " if close else ""


def _build_params(model, values: dict, file: str, node: str | None, prefix: str) -> tuple[Any, list[Problem]]:
    """``(model(**values), [])``, or ``(None, problems)``: pydantic's, and a boolean where a param
    takes a number (pydantic would read ``true`` as 1)."""
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        return None, [Problem(file, node, prefix, "must be a mapping of parameter -> value")]
    fields = model.model_fields
    strays = [name for name, value in values.items()
              if name in fields and holds_stray_bool(fields[name].annotation, value)]
    problems = [Problem(file, node, f"{prefix}.{name}", f"expected {type_name(fields[name].annotation)}, got "
                        f"{shown(values[name])}: a boolean is not a number") for name in strays]
    try:
        built = model(**values)
    except ValidationError as exc:  # the strays' own errors are the ones above
        errors = [err for err in exc.errors() if not err["loc"] or err["loc"][0] not in strays]
        return None, problems + _pydantic_problems(errors, file, node, prefix, model)
    return (None if problems else built), problems


def _pydantic_problems(errors: list[dict], file: str, node: str | None, prefix: str, model) -> list[Problem]:
    out = []
    fields = model.model_fields
    for err in errors:
        loc = ".".join(str(x) for x in err["loc"])
        name = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            valid = ", ".join(sorted(fields)) or "none"
            msg = f"unknown parameter; {_suggest(name, list(fields))}valid parameters: {valid}"
        else:
            f = fields.get(name)
            allowed = allowed_range(f) if f else None
            hint = f" (expected {type_name(f.annotation)}{f', {allowed}' if allowed else ''}, default {f.default!r})" \
                if f else ""
            msg = f"{err['msg']}{hint}; got {shown(err.get('input'))}"
        out.append(Problem(file, node, f"{prefix}.{loc}" if loc else prefix, msg))
    return out




def _name_problems(name: object, file: str) -> list[Problem]:
    """A graph's name names its run folder: a name, never a path (``../x`` would write outside runs/)."""
    if isinstance(name, str) and GRAPH_NAME_RE.match(name) and ".." not in name:
        return []
    return [Problem(file, None, "name", "a graph's name names its run folder (runs/NAME): letters, digits, '_', "
                    f"'-' and '.' (not '..'), starting with a letter, digit or '_'; got {shown(name)}")]


def _build_source(ds: Any, dataset_file: str | None, file: str) -> tuple[Source | None, list[Problem]]:
    """The dataset block's source, or the problems with it (naming the dataset file when the
    block came from one)."""
    where, prefix = (dataset_file, "") if dataset_file else (file, "dataset.")
    if not isinstance(ds, dict) or "source" not in ds:
        return None, [Problem(where, None, prefix.rstrip(".") or None, "missing 'dataset: {source: NAME, params: "
                              f"{{...}}}}'; sources: {', '.join(SOURCES)}")]
    if SOURCES.failure(ds.get("source")):
        return None, [Problem(where, None, f"{prefix}source", SOURCES.failure(ds.get("source")))]
    if ds.get("source") not in SOURCES:
        return None, [Problem(where, None, f"{prefix}source", f"unknown source {shown(ds.get('source'))}; "
                              f"{_suggest(ds.get('source'), list(SOURCES))}valid sources: {', '.join(SOURCES)}")]
    problems = [Problem(where, None, f"{prefix}{k}", "unknown key; valid keys: source, params")
                for k in sorted(set(ds) - DATASET_KEYS)]
    cls = SOURCES[ds["source"]]
    params, found = _build_params(cls.Params, ds.get("params") or {}, where, None, f"{prefix}params")
    return (cls(params) if params is not None else None), problems + found


def _input_refs(spec: Any) -> list[Ref]:
    """The column references among a raw node spec's inputs."""
    inputs = spec.get("inputs") if isinstance(spec, dict) else None
    return [ref for ref in map(parse_ref, inputs.values()) if ref is not None] if isinstance(inputs, dict) else []


def _skip_optional_nodes(doc: dict, source: str, source_cols: dict) -> list[str]:
    """Drop from ``doc`` each ``optional: true`` node that reads a column the source lacks
    (ground-truth masks on VQAv2), the nodes reading its columns, and their kept outputs;
    return one note per skipped node."""
    nodes = doc.get("nodes") or {}
    skipped: dict[str, str] = {}  # node -> why
    for name, spec in nodes.items():
        missing = [r.column for r in _input_refs(spec) if r.node == SOURCE and r.column not in source_cols]
        if isinstance(spec, dict) and spec.get("optional") is True and missing:
            skipped[name] = f"source '{source}' has no column '{missing[0]}'"
    grew = bool(skipped)
    while grew:  # downstream: a node reading a skipped node's column cannot run either
        readers = {name: ref.node for name, spec in nodes.items() if name not in skipped
                   for ref in _input_refs(spec) if ref.node in skipped}
        skipped.update({name: f"it reads skipped node '{up}'" for name, up in readers.items()})
        grew = bool(readers)
    if not skipped:
        return []
    doc["nodes"] = {name: spec for name, spec in nodes.items() if name not in skipped}
    doc["outputs"], dropped = without_nodes(doc.get("outputs"), set(skipped))
    return [f"node '{name}' skipped: {why}" + (f"; its outputs {', '.join(dropped[name])} are dropped"
                                               if dropped.get(name) else "") for name, why in skipped.items()]


def validate(doc: dict, origins: dict[str, str], file: str, dataset_file: str | None = None,
              notes: list[str] | None = None) -> Graph:
    problems: list[Problem] = _name_problems(doc["name"], file)
    source, found = _build_source(doc.get("dataset"), dataset_file, file)
    problems += found
    source_cols = source.columns() if source else {}
    source_types = {k: v.type for k, v in source_cols.items()}
    notes = list(notes or [])
    if source is not None:
        notes += _skip_optional_nodes(doc, source.name, source_cols)

    shard_size = doc.get("shard_size", DEFAULT_SHARD_SIZE)
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        problems.append(Problem(file, None, "shard_size", f"must be a positive integer (samples per shard); got {shown(shard_size)}"))
        shard_size = DEFAULT_SHARD_SIZE

    # nodes: stage + params
    raw_nodes = doc.get("nodes") or {}
    if not raw_nodes:
        problems.append(Problem(file, None, "nodes", "the graph has no nodes"))
    stages: dict[str, Stage] = {}
    wiring: dict[str, dict[str, Any]] = {}
    extras: dict[str, tuple[int | None, int | None]] = {}
    for name, spec in raw_nodes.items():
        nfile = origins.get(name, file)
        if not NAME_RE.match(str(name)) or name == SOURCE:
            problems.append(Problem(nfile, str(name), None, "node names are identifiers (letters, digits, _) and 'source' is reserved"))
            continue
        if not isinstance(spec, dict):
            problems.append(Problem(nfile, name, None, "a node must be a mapping {stage, params, inputs}"))
            continue
        for k in sorted(set(spec) - NODE_KEYS):
            if k == "replicas":
                problems.append(Problem(nfile, name, k, "nodes no longer have replicas: every Ray worker runs the "
                                        "whole graph; set the number of workers with `runtime run --workers N`"))
            else:
                problems.append(Problem(nfile, name, k, f"unknown node key; valid keys: {', '.join(sorted(NODE_KEYS))}"))
        if not isinstance(spec.get("optional", False), bool):
            problems.append(Problem(nfile, name, "optional", f"must be true or false; got {shown(spec['optional'])}"))
        stage_name = spec.get("stage")
        if STAGES.failure(stage_name):
            problems.append(Problem(nfile, name, "stage", STAGES.failure(stage_name)))
            continue
        if stage_name not in STAGES:
            problems.append(Problem(nfile, name, "stage", f"unknown stage {shown(stage_name)}; {_suggest(stage_name, list(STAGES))}"
                                    f"run `runtime stages` for the list: {', '.join(STAGES)}"))
            continue
        cls = STAGES[stage_name]
        params, found = _build_params(cls.Params, spec.get("params") or {}, nfile, name, "params")
        if params is None:
            problems += found
            continue
        stages[name] = cls(params)
        for fld, msg in stages[name].problems():
            problems.append(Problem(nfile, name, f"params.{fld}", msg))
        inputs = spec.get("inputs") or {}
        if not isinstance(inputs, dict):
            problems.append(Problem(nfile, name, "inputs", "must be a mapping of input -> NODE.COLUMN"))
            inputs = {}
        inputs = {k: v for k, v in inputs.items() if v is not None}  # `input: null` unwires (with extends)
        wiring[name] = inputs
        batch_size = spec.get("batch_size")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            problems.append(Problem(nfile, name, "batch_size", f"must be a positive integer; got {shown(batch_size)}"))
        extras[name] = batch_size

    # edges + cycles
    feeds: dict[str, set[str]] = {name: set() for name in stages}  # node -> the nodes it reads
    refs: dict[str, dict[str, Ref]] = {}
    for name, inputs in wiring.items():
        nfile = origins.get(name, file)
        declared = stages[name].inputs()
        refs[name] = {}
        for inp, target in inputs.items():
            if inp not in declared:
                problems.append(Problem(nfile, name, f"inputs.{inp}", f"stage '{stages[name].name}' has no input '{inp}'; "
                                        f"{_suggest(str(inp), list(declared))}inputs: {', '.join(declared) or 'none'}"))
                continue
            ref = parse_ref(target)
            if ref is None:
                problems.append(Problem(nfile, name, f"inputs.{inp}", f"expected NODE.COLUMN (or source.COLUMN), got {shown(target)}"))
                continue
            if ref.node == SOURCE:
                if source is not None and ref.column not in source_cols:
                    problems.append(Problem(nfile, name, f"inputs.{inp}", f"source '{source.name}' has no column '{ref.column}'; "
                                            f"{_suggest(ref.column, list(source_cols))}columns: {', '.join(source_cols)}; "
                                            "to skip the node on such sources, mark it `optional: true`"))
                    continue
            elif ref.node not in raw_nodes:
                problems.append(Problem(nfile, name, f"inputs.{inp}", f"unknown node '{ref.node}'; "
                                        f"{_suggest(ref.node, list(raw_nodes))}nodes: {', '.join(raw_nodes)}"))
                continue
            elif ref.node in stages:
                feeds[name].add(ref.node)
            refs[name][inp] = ref
        for fld, msg in stages[name].wiring_problems(set(inputs)):
            problems.append(Problem(nfile, name, fld, msg))
        for inp, decl in declared.items():
            if not decl.optional and inp not in inputs:
                problems.append(Problem(nfile, name, f"inputs.{inp}", f"missing required input '{inp}' ({describe_type(decl.spec)}): "
                                        f"wire it as `{inp}: NODE.COLUMN`"))
    try:
        order = list(graphlib.TopologicalSorter(feeds).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]  # each node feeds the next; first == last
        problems.append(Problem(origins.get(cycle[0], file), cycle[0], "inputs",
                                f"cycle: {' -> '.join(cycle)}; a node cannot depend on its own output"))
        raise GraphError(problems) from None

    # types, granularity, outputs - in topological order
    output_types: dict[str, dict[str, pa.DataType]] = {}
    for name in order:
        stage, nfile = stages[name], origins.get(name, file)
        bindings: dict[str, int] = {}
        ok = True
        for inp, ref in refs.get(name, {}).items():
            if ref.node == SOURCE:
                if source is None:
                    ok = False
                    continue
                actual = source_types[ref.column]
                image_level = source_cols[ref.column].image_level
            elif ref.node in output_types:
                outs = output_types[ref.node]
                if ref.column not in outs:
                    problems.append(Problem(nfile, name, f"inputs.{inp}", f"node '{ref.node}' has no output '{ref.column}'; "
                                            f"{_suggest(ref.column, list(outs))}outputs: {', '.join(outs)}"))
                    ok = False
                    continue
                actual = outs[ref.column]
                image_level = stages[ref.node].granularity is Granularity.IMAGE
                if actual is None:
                    ok = False
                    continue
            else:
                ok = False
                continue
            why = match_spec(stage.inputs()[inp].spec, actual, bindings)
            if why:
                problems.append(Problem(nfile, name, f"inputs.{inp}", f"type mismatch: {ref} is {describe_type(actual)}, {why}"))
                ok = False
            if stage.inputs()[inp].per_image and not image_level:
                problems.append(Problem(nfile, name, f"inputs.{inp}", f"input '{inp}' is taken once per image, but {ref} is a "
                                        "per-question column; wire an image-level column (a per-image node or source.image_*)"))
                ok = False
            elif stage.granularity is Granularity.IMAGE and not image_level:
                problems.append(Problem(nfile, name, f"inputs.{inp}", f"'{stage.name}' runs once per image, but {ref} is a per-question "
                                        "column; wire an image-level column (e.g. source.image_path or a per-image node)"))
                ok = False
        required = {k for k, i in stage.inputs().items() if not i.optional}
        if ok and required <= set(refs.get(name, {})):  # sizes are checked once every input is right
            for fld, msg in stage.binding_problems(dict(bindings)):
                problems.append(Problem(nfile, name, fld, msg))
        outs = {}
        for out, decl in stage.outputs().items():
            try:
                outs[out] = decl.spec.concrete(bindings) if hasattr(decl.spec, "concrete") else decl.spec
            except KeyError:
                outs[out] = None  # unknown after an input error: consumers are not checked again
                if ok:
                    problems.append(Problem(nfile, name, f"outputs.{out}", "cannot determine the output shape from the inputs"))
        output_types[name] = outs

    # kept outputs
    outputs: list[Ref] = []
    raw_outputs = doc.get("outputs") or []
    if not isinstance(raw_outputs, list):
        problems.append(Problem(file, None, "outputs", "must be a list of NODE.COLUMN"))
        raw_outputs = []
    for i, item in enumerate(raw_outputs):
        ref = parse_ref(item)
        if ref is None:
            problems.append(Problem(file, None, f"outputs[{i}]", f"expected NODE.COLUMN, got {shown(item)}"))
        elif ref.node == SOURCE:
            if source is not None and ref.column not in source_cols:  # metadata of another dataset (answer_type)
                notes.append(f"output {ref} dropped: source '{source.name}' has no column '{ref.column}'; "
                             f"{_suggest(ref.column, list(source_cols))}columns: {', '.join(source_cols)}")
            else:
                outputs.append(ref)
        elif ref.node not in raw_nodes:
            problems.append(Problem(file, None, f"outputs[{i}]", f"unknown node '{ref.node}'; {_suggest(ref.node, list(raw_nodes))}nodes: {', '.join(raw_nodes)}"))
        elif ref.node in output_types and ref.column not in output_types[ref.node]:
            outs = output_types[ref.node]
            problems.append(Problem(file, None, f"outputs[{i}]", f"node '{ref.node}' has no output '{ref.column}'; outputs: {', '.join(outs)}"))
        else:
            outputs.append(ref)
    if len(set(outputs)) != len(outputs):
        problems.append(Problem(file, None, "outputs", "an output is listed twice"))

    if problems:
        raise GraphError(problems)

    nodes = {}
    for name in order:
        stage = stages[name]
        nodes[name] = Node(name, stage, refs.get(name, {}), output_types[name],
                           extras[name], origins.get(name, file))
    resolved = {
        "name": doc["name"],
        "description": doc.get("description", ""),
        "dataset": {"source": doc["dataset"]["source"], "params": source.params.model_dump(mode="json")},
        "shard_size": shard_size,
        "nodes": {n: {"stage": nd.stage.name, "version": nd.stage.version,
                      "params": nd.stage.params.model_dump(mode="json"),
                      "inputs": {k: str(v) for k, v in nd.inputs.items()},
                      **({"batch_size": nd.batch_size} if nd.batch_size else {})}  # else the stage's, per device
                  for n, nd in nodes.items()},
        "outputs": [str(r) for r in outputs],
    }
    return Graph(doc["name"], file, doc.get("description", ""), source, source_types, nodes, outputs, shard_size, resolved,
                 dataset_file, notes)

