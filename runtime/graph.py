"""Graph files: load (safe YAML, ``extends:``, ``--set``), validate, and resolve.

A graph names a dataset source, its nodes (stage + params + inputs wired from upstream
columns) and the outputs to keep. Validation happens before any work and reports every
problem with the file, node and field, and what would be valid.
"""

from __future__ import annotations

import copy
import difflib
import graphlib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from artifacts.columns import describe_type, match_spec
from artifacts.fingerprint import fingerprint
from runtime.errors import GraphError, Problem, shown
from runtime.params_check import holds_stray_bool
from runtime.params_doc import allowed_range, type_name
from runtime.yaml_io import DuplicateKeyError, ExpansionError, load_yaml, parse_value
from sources import SOURCES
from sources.base import Source
from stages import STAGES
from stages.base import Granularity, Stage

SOURCE = "source"  # the reserved node name of the dataset in input references
TOP_KEYS = {"name", "description", "extends", "dataset", "nodes", "outputs", "add_outputs", "shard_size"}
NODE_KEYS = {"stage", "params", "inputs", "batch_size", "optional"}
DATASET_KEYS = {"source", "params"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a graph's name is its run folder's (runs/NAME, OUTPUT/NAME of a sweep): one plain path component
GRAPH_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DEFAULT_SHARD_SIZE = 256


@dataclass(frozen=True)
class Ref:
    """A column reference ``node.column`` (``source.column`` for the dataset)."""

    node: str
    column: str

    def __str__(self) -> str:
        return f"{self.node}.{self.column}"


@dataclass
class Node:
    name: str
    stage: Stage
    inputs: dict[str, Ref]
    output_types: dict[str, pa.DataType]
    batch_size: int | None  # rows per process() call set in the graph; None: the stage's for the device
    origin: str  # the file that defined (or last overrode) the node

    @property
    def granularity(self) -> Granularity:
        return self.stage.granularity

    def batch_size_on(self, device: str) -> int:
        return self.batch_size or self.stage.resources.batch_size_on(device)


@dataclass
class Graph:
    name: str
    path: str
    description: str
    source: Source
    source_types: dict[str, pa.DataType]
    nodes: dict[str, Node]  # in topological order
    outputs: list[Ref]
    shard_size: int
    raw: dict[str, Any] = field(repr=False)  # the resolved document (after extends and --set)
    dataset_file: str | None = None  # the file the dataset block came from; None: written in the graph
    notes: list[str] = field(default_factory=list)  # what validation dropped (removed, skipped nodes' columns)

    @property
    def hash(self) -> str:
        return fingerprint(self.raw)

    def kept_roles(self) -> dict[str, str]:
        """``{results column: role}`` for the kept columns whose stage declares a role
        (``stages.base.Role``), in the order they are kept: what the run's readers go by."""
        outputs = {name: node.stage.outputs() for name, node in self.nodes.items()}
        return {str(ref): role.value for ref in self.outputs
                if ref.node != SOURCE and (role := outputs[ref.node][ref.column].role) is not None}

    def upstream(self, name: str) -> list[str]:
        return sorted({r.node for r in self.nodes[name].inputs.values() if r.node != SOURCE})

    def descendants(self, name: str) -> set[str]:
        found, frontier = set(), [name]
        while frontier:
            up = frontier.pop()
            for n in self.nodes:
                if n not in found and up in self.upstream(n):
                    found.add(n)
                    frontier.append(n)
        return found

    def to_dot(self) -> str:
        lines = [f'digraph "{self.name}" {{', "  rankdir=LR;", '  source [shape=cylinder, label="source\\n'
                 f'{self.source.name}"];']
        kept = {r.node for r in self.outputs}
        for name, node in self.nodes.items():
            style = ", style=bold" if name in kept else ""
            lines.append(f'  {name} [shape=box, label="{name}\\n{node.stage.name}"{style}];')
        for name, node in self.nodes.items():
            for inp, ref in node.inputs.items():
                lines.append(f'  {ref.node} -> {name} [label="{ref.column} -> {inp}"];')
        lines.append("}")
        return "\n".join(lines)


# --- loading ------------------------------------------------------------------------------

@dataclass
class _Document:
    """A graph file merged with its ``extends`` chain."""

    doc: dict
    origins: dict[str, str]  # node -> the file that defined (or last overrode) it
    dataset_file: str | None  # the file the dataset block came from; None: written inline
    notes: list[str]  # outputs dropped with the nodes a variant removed


def _parse_yaml_file(path: Path, what: str, chain: tuple[Path, ...] = ()) -> Any:
    """The YAML document in ``path``, a ``GraphError`` naming the file when it cannot be read
    (``what``: "graph" or "dataset")."""
    file = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GraphError([Problem(file, None, None, f"{what} file not found"
                                  + (f" (extended by {chain[-1]})" if chain else ""))]) from None
    except OSError as exc:
        raise GraphError([Problem(file, None, None, f"cannot read the {what} file: {exc}")]) from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise GraphError([Problem(file, None, None, f"line {line}: byte 0x{exc.object[exc.start]:02x} is not UTF-8 "
                                  f"({what} files are UTF-8 text)")]) from None
    try:
        return load_yaml(text)
    except DuplicateKeyError as exc:
        node = exc.key if exc.path == ["nodes"] else (exc.path[1] if len(exc.path) > 1 and exc.path[0] == "nodes" else None)
        kind = "duplicate node name" if exc.path == ["nodes"] else "duplicate key"
        raise GraphError([Problem(file, node, ".".join(exc.path + [exc.key]),
                                  f"{kind} '{exc.key}' (line {exc.line}); each name may appear once")]) from None
    except ExpansionError as exc:
        raise GraphError([Problem(file, None, None, str(exc))]) from None
    except Exception as exc:  # yaml.YAMLError and friends: report the parser's own words
        raise GraphError([Problem(file, None, None, f"not valid YAML: {exc}")]) from None


def read_dataset_file(path: Path) -> dict:
    """The dataset block held in ``path`` (``source`` + ``params``), with its relative file paths
    made relative to the file's folder: a dataset file works from any working directory."""
    file = str(path)
    block = _parse_yaml_file(path, "dataset")
    if not isinstance(block, dict) or "source" not in block:
        raise GraphError([Problem(file, None, None, "a dataset file is a YAML mapping {source: NAME, params: {...}} "
                                  f"(a graph's dataset block); sources: {', '.join(SOURCES)}")])
    unknown = sorted(set(block) - DATASET_KEYS)
    if unknown:
        raise GraphError([Problem(file, None, k, f"unknown key; valid keys: {', '.join(sorted(DATASET_KEYS))}")
                          for k in unknown])
    params = block.get("params")
    if block["source"] in SOURCES and isinstance(params, dict):  # else validation names what is wrong
        folder = path.parent
        block["params"] = {k: (_relative_to(folder, v) if k in SOURCES[block["source"]].Params.path_params else v)
                           for k, v in params.items()}
    return block


def _relative_to(folder: Path, value: Any) -> Any:
    """``value`` (a path param) joined to ``folder`` when it is a relative path."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value
    return os.path.normpath(folder / value)


def _dataset_path(graph: Path, value: Any) -> Path | None:
    """The dataset file a graph's ``dataset: FILE.yaml`` names (relative to the graph), else None."""
    return (graph.parent / value).resolve() if isinstance(value, str) else None


def _read_document(path: Path, chain: tuple[Path, ...]) -> _Document:
    """Read ``path`` and its ``extends`` chain; return the merged document and node origins."""
    file = str(path)
    if path in chain:
        raise GraphError([Problem(file, None, "extends", "circular extends: "
                                  + " -> ".join(str(p) for p in (*chain, path)))])
    doc = _parse_yaml_file(path, "graph", chain)
    if not isinstance(doc, dict):
        raise GraphError([Problem(file, None, None, "a graph file must be a YAML mapping with "
                                  "'dataset', 'nodes' and 'outputs'")])
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise GraphError([Problem(file, None, k, f"unknown top-level key; valid keys: {', '.join(sorted(TOP_KEYS))}")
                          for k in sorted(unknown)])
    nodes = doc.get("nodes") or {}
    if not isinstance(nodes, dict):
        raise GraphError([Problem(file, None, "nodes", "must be a mapping of node name -> {stage, params, inputs}")])
    dataset_path = _dataset_path(path, doc.get("dataset"))
    if dataset_path is not None:
        doc["dataset"] = read_dataset_file(dataset_path)
    dataset_file = str(dataset_path) if dataset_path else None
    origins = {name: file for name in nodes}
    if "extends" not in doc:
        return _Document(doc, origins, dataset_file, [])

    if not isinstance(doc["extends"], str):
        raise GraphError([Problem(file, None, "extends", f"must be the path of a graph file; got {shown(doc['extends'])}")])
    parent_path = (path.parent / doc["extends"]).resolve()
    parent = _read_document(parent_path, chain + (path,))
    merged = copy.deepcopy(parent.doc)
    for key in ("name", "description", "shard_size"):
        if key in doc:
            merged[key] = doc[key]
    if "dataset" in doc:
        ds = doc["dataset"] or {}
        base = merged.get("dataset") or {}
        if dataset_path is None and isinstance(ds, dict) and isinstance(base, dict) \
                and ds.get("source", base.get("source")) == base.get("source"):
            merged["dataset"] = {**base, **ds, "params": {**(base.get("params") or {}), **(ds.get("params") or {})}}
        else:  # another source, or a dataset file: the whole block
            merged["dataset"] = ds
    else:
        dataset_file = parent.dataset_file
    merged_nodes = dict(merged.get("nodes") or {})
    all_origins = dict(parent.origins)
    for name, spec in nodes.items():
        all_origins[name] = file
        if spec is None:  # `name: null` removes an inherited node
            merged_nodes.pop(name, None)
            all_origins.pop(name, None)
            continue
        base = merged_nodes.get(name)
        if isinstance(base, dict) and isinstance(spec, dict) and spec.get("stage", base.get("stage")) == base.get("stage"):
            merged_nodes[name] = {
                **base, **spec,
                "params": {**(base.get("params") or {}), **(spec.get("params") or {})},
                "inputs": {**(base.get("inputs") or {}), **(spec.get("inputs") or {})},
            }
        else:
            merged_nodes[name] = spec
    merged["nodes"] = merged_nodes
    notes = list(parent.notes)
    if "outputs" in doc:
        merged["outputs"] = doc["outputs"]
    else:
        removed = [name for name, spec in nodes.items() if spec is None]
        merged["outputs"], dropped = _without_nodes(merged.get("outputs"), set(removed))
        notes += [f"node '{name}' removed by {file}: its inherited outputs {', '.join(dropped[name])} are dropped"
                  for name in removed if dropped.get(name)]
    merged["outputs"] = list(merged.get("outputs") or []) + list(doc.get("add_outputs") or [])
    merged.pop("add_outputs", None)
    merged.pop("extends", None)
    return _Document(merged, all_origins, dataset_file, notes)


def _without_nodes(outputs: Any, nodes: set[str]) -> tuple[Any, dict[str, list[str]]]:
    """``outputs`` without the columns of ``nodes``, and those dropped by node (a malformed
    ``outputs`` is left to validation)."""
    if not isinstance(outputs, list) or not nodes:
        return outputs, {}
    dropped: dict[str, list[str]] = {}
    for item in outputs:
        ref = _parse_ref(item)
        if ref is not None and ref.node in nodes:
            dropped.setdefault(ref.node, []).append(item)
    return [o for o in outputs if not any(o in cols for cols in dropped.values())], dropped


def apply_overrides(doc: dict, overrides: list[str], file: str) -> None:
    """Apply ``--set NODE.PARAM=VALUE`` / ``dataset.PARAM=VALUE`` / ``shard_size=N`` in place."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem("--set", None, item, "expected NODE.PARAM=VALUE, dataset.PARAM=VALUE or shard_size=N"))
            continue
        try:
            parsed = parse_value(value)
        except ExpansionError as exc:
            problems.append(Problem("--set", None, key, str(exc)))
            continue
        except Exception as exc:  # yaml.YAMLError and friends: the value, not the graph, is wrong
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append(Problem("--set", None, key, f"the value {shown(value)} is not valid YAML ({first}); quote "
                                    "strings, write lists as [a, b]"))
            continue
        if key == "shard_size":
            doc["shard_size"] = parsed
            continue
        target, dot, param = key.partition(".")
        if not dot or not param:
            problems.append(Problem("--set", None, key, "expected NODE.PARAM=VALUE, dataset.PARAM=VALUE or shard_size=N"))
            continue
        if key == "dataset.source":
            problems.append(Problem("--set", None, key, "the source is not a parameter: switch datasets with "
                                    "`--dataset FILE.yaml` (a file holding a graph's dataset block)"))
            continue
        if target == "dataset":
            ds = doc.setdefault("dataset", {})
            ds.setdefault("params", {})[param] = parsed
            continue
        nodes = doc.get("nodes") or {}
        if target not in nodes:
            problems.append(Problem("--set", target, key, f"no node '{target}' in {file}; nodes: {', '.join(nodes) or 'none'}"))
            continue
        spec = nodes[target]
        if param in ("batch_size", "replicas"):  # replicas: refused by validation with its reason
            spec[param] = parsed
        elif param.startswith("inputs."):
            spec.setdefault("inputs", {})[param[len("inputs."):]] = parsed
        else:
            spec.setdefault("params", {})[param] = parsed
    if problems:
        raise GraphError(problems)


def apply_preset(doc: dict, preset: str, file: str) -> None:
    """Set ``preset`` on every model node whose stage offers that preset (``--preset large``
    sets the BLIP and UnifiedQA nodes; SAM presets have other names)."""
    offered: set[str] = set()
    changed = 0
    for spec in (doc.get("nodes") or {}).values():
        if not (isinstance(spec, dict) and spec.get("stage") in STAGES):
            continue
        field = STAGES[spec["stage"]].Params.model_fields.get("preset")
        if field is None:
            continue
        choices = {str(c) for c in typing.get_args(field.annotation)}
        offered |= choices
        if preset in choices:
            params = spec.get("params")
            spec["params"] = {**(params if isinstance(params, dict) else {}), "preset": preset}
            changed += 1
    if not changed:
        raise GraphError([Problem("--preset", None, preset, f"no model node of {file} offers preset '{preset}'; "
                                  f"presets: {', '.join(sorted(offered)) or 'none (the graph has no model nodes)'}")])


def apply_dtype(doc: dict, dtype: str, file: str) -> None:
    """Set ``dtype`` on every model node whose stage has a ``dtype`` param (``--dtype bfloat16``);
    a value a stage refuses (qa_fid and float16) is reported by validation, naming the node."""
    changed = 0
    for spec in (doc.get("nodes") or {}).values():
        if isinstance(spec, dict) and spec.get("stage") in STAGES and "dtype" in STAGES[spec["stage"]].Params.model_fields:
            params = spec.get("params")
            spec["params"] = {**(params if isinstance(params, dict) else {}), "dtype": dtype}
            changed += 1
    if not changed:
        raise GraphError([Problem("--dtype", None, dtype, f"no node of {file} has a dtype param (the BLIP, UnifiedQA "
                                  "and EfficientSAM embedding stages do)")])


def load_graph(path: str | Path, overrides: list[str] | None = None,
               presets: list[str] | tuple[str, ...] = (), dtype: str | None = None,
               dataset: str | Path | None = None) -> Graph:
    """Read, merge, override and validate a graph file; raise ``GraphError`` listing every problem.

    ``dataset`` (``--dataset``) is a dataset file replacing the graph's whole dataset block.
    Each of ``presets`` sets the preset of the model nodes that offer it (``--preset large
    --preset vitt``), ``dtype`` the compute type of those that have one (``--dtype``);
    ``overrides`` (``--set``) come after them.
    """
    path = Path(path)
    read = _read_document(path.resolve(), ())
    doc, dataset_file = read.doc, read.dataset_file
    file = str(path)
    origins = {k: (file if Path(v) == path.resolve() else v) for k, v in read.origins.items()}
    if dataset is not None:
        doc["dataset"] = read_dataset_file(Path(dataset).resolve())
        dataset_file = str(dataset)
    doc.setdefault("name", path.stem)
    for preset in presets:
        apply_preset(doc, preset, file)
    if dtype is not None:
        apply_dtype(doc, dtype, file)
    apply_overrides(doc, list(overrides or []), file)
    return _validate(doc, origins, file, dataset_file, read.notes)


# --- validation ---------------------------------------------------------------------------

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


def _parse_ref(text: Any) -> Ref | None:
    if not isinstance(text, str) or text.count(".") != 1:
        return None
    node, column = text.split(".")
    return Ref(node, column) if node and column else None


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
    return [ref for ref in map(_parse_ref, inputs.values()) if ref is not None] if isinstance(inputs, dict) else []


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
    doc["outputs"], dropped = _without_nodes(doc.get("outputs"), set(skipped))
    return [f"node '{name}' skipped: {why}" + (f"; its outputs {', '.join(dropped[name])} are dropped"
                                               if dropped.get(name) else "") for name, why in skipped.items()]


def _validate(doc: dict, origins: dict[str, str], file: str, dataset_file: str | None = None,
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
            ref = _parse_ref(target)
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
        ref = _parse_ref(item)
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
