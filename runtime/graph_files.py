"""Reading graph files: safe YAML, the ``extends`` chain merged into one document, dataset
files, and column references (``node.column``)."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import GraphError, Problem, shown
from runtime.yaml_io import DuplicateKeyError, ExpansionError, load_yaml
from sources import SOURCES

SOURCE = "source"  # the reserved node name of the dataset in input references
TOP_KEYS = {"name", "description", "extends", "dataset", "nodes", "outputs", "add_outputs", "shard_size",
            "overlays"}
DATASET_KEYS = {"source", "params"}


@dataclass(frozen=True)
class Ref:
    """A column reference ``node.column`` (``source.column`` for the dataset)."""

    node: str
    column: str

    def __str__(self) -> str:
        return f"{self.node}.{self.column}"



def parse_ref(text: Any) -> Ref | None:
    if not isinstance(text, str) or text.count(".") != 1:
        return None
    node, column = text.split(".")
    return Ref(node, column) if node and column else None



@dataclass
class Document:
    """A graph file merged with its ``extends`` chain."""

    doc: dict
    origins: dict[str, str]  # node -> the file that defined (or last overrode) it
    dataset_file: str | None  # the file the dataset block came from; None: written inline
    notes: list[str]  # outputs dropped with the nodes a variant removed
    overlays: list[str] = field(default_factory=list)  # overlay files the chain names, parents' first


def parse_yaml_file(path: Path, what: str, chain: tuple[Path, ...] = ()) -> Any:
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
    block = parse_yaml_file(path, "dataset")
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
    """``value`` (a path param) joined to ``folder`` when it is a relative path; URIs
    (``s3://...``, ``file://...``) are left as they are."""
    if not isinstance(value, str) or not value or "://" in value or Path(value).expanduser().is_absolute():
        return value
    return os.path.normpath(folder / value)


def _dataset_path(graph: Path, value: Any) -> Path | None:
    """The dataset file a graph's ``dataset: FILE.yaml`` names (relative to the graph), else None."""
    return (graph.parent / value).resolve() if isinstance(value, str) else None


def read_document(path: Path, chain: tuple[Path, ...]) -> Document:
    """Read ``path`` and its ``extends`` chain; return the merged document and node origins."""
    file = str(path)
    if path in chain:
        raise GraphError([Problem(file, None, "extends", "circular extends: "
                                  + " -> ".join(str(p) for p in (*chain, path)))])
    doc = parse_yaml_file(path, "graph", chain)
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
    overlays = _overlay_paths(path, doc.pop("overlays", None))
    origins = {name: file for name in nodes}
    if "extends" not in doc:
        return Document(doc, origins, dataset_file, [], overlays)

    if not isinstance(doc["extends"], str):
        raise GraphError([Problem(file, None, "extends", f"must be the path of a graph file; got {shown(doc['extends'])}")])
    parent_path = (path.parent / doc["extends"]).resolve()
    parent = read_document(parent_path, chain + (path,))
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
        merged["outputs"], dropped = without_nodes(merged.get("outputs"), set(removed))
        notes += [f"node '{name}' removed by {file}: its inherited outputs {', '.join(dropped[name])} are dropped"
                  for name in removed if dropped.get(name)]
    merged["outputs"] = list(merged.get("outputs") or []) + list(doc.get("add_outputs") or [])
    merged.pop("add_outputs", None)
    merged.pop("extends", None)
    return Document(merged, all_origins, dataset_file, notes, parent.overlays + overlays)


def _overlay_paths(graph: Path, value: Any) -> list[str]:
    """The overlay files a graph's ``overlays: [FILE.yaml, ...]`` names, relative to the graph."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise GraphError([Problem(str(graph), None, "overlays", "must be a list of overlay files (paths relative to "
                                  f"this file, e.g. [overlays/faithfulness.yaml]); got {shown(value)}")])
    return [os.path.normpath(graph.parent / v) for v in value]


def without_nodes(outputs: Any, nodes: set[str]) -> tuple[Any, dict[str, list[str]]]:
    """``outputs`` without the columns of ``nodes``, and those dropped by node (a malformed
    ``outputs`` is left to validation)."""
    if not isinstance(outputs, list) or not nodes:
        return outputs, {}
    dropped: dict[str, list[str]] = {}
    for item in outputs:
        ref = parse_ref(item)
        if ref is not None and ref.node in nodes:
            dropped.setdefault(ref.node, []).append(item)
    return [o for o in outputs if not any(o in cols for cols in dropped.values())], dropped

