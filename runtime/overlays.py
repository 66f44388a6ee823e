"""Overlays: a node attached to every output of some roles in a graph, without copying YAML.

An overlay file holds template nodes. A template names a stage, its params and inputs as a
graph node does, plus ``for_each_output: {roles: [...], input: NAME}``: against a validated
graph it expands into one ordinary node per node output whose role is one of ``roles`` and
whose type fits the stage's input NAME, wired to that output (named TEMPLATE_NODE, or
TEMPLATE_NODE_COLUMN where one node has several such outputs). The columns listed in its
``outputs`` (default: all) join the graph's kept outputs. The expanded nodes are plain nodes,
so the nodes they read keep their cache keys: a graph run, then run with the overlay,
computes only the overlay's nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from artifacts.columns import describe_type, match_spec
from runtime.errors import GraphError, Problem, shown
from runtime.graph_files import parse_yaml_file
from runtime.graph_model import Graph
from stages import STAGES
from stages.base import Role, Stage

OVERLAY_KEYS = {"name", "description", "nodes"}
TEMPLATE_KEYS = {"stage", "params", "inputs", "batch_size", "for_each_output", "outputs"}
FOR_EACH_KEYS = {"roles", "input"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ROLES = [r.value for r in Role]


@dataclass
class Template:
    name: str
    spec: dict  # stage, params, inputs, batch_size: a node spec less the wired input
    roles: list[str]
    input: str
    outputs: list[str]
    stage: Stage  # with the template's params (the defaults where they are invalid: validation names them)


@dataclass
class Overlay:
    file: str
    name: str  # appended to the graph's name when applied from the command line (its run folder)
    templates: list[Template]


def read_overlay(path: str | Path) -> Overlay:
    """The overlay in ``path``; a ``GraphError`` naming the file, template and field otherwise."""
    file = str(path)
    doc = parse_yaml_file(Path(path), "overlay")
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), dict) or not doc["nodes"]:
        raise GraphError([Problem(file, None, "nodes", "an overlay file is a YAML mapping with 'nodes': template "
                                  "nodes, each with a stage and for_each_output: {roles: [...], input: NAME}")])
    problems = [Problem(file, None, k, f"unknown top-level key; valid keys: {', '.join(sorted(OVERLAY_KEYS))}")
                for k in sorted(set(doc) - OVERLAY_KEYS)]
    name = doc.get("name", Path(path).stem)
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.append(Problem(file, None, "name", "an overlay's name is added to the graph's (its run folder): "
                                f"letters, digits and _; got {shown(name)}"))
    templates = []
    for tname, spec in doc["nodes"].items():
        template, found = _template(file, str(tname), spec)
        problems += found
        if template is not None:
            templates.append(template)
    if problems:
        raise GraphError(problems)
    return Overlay(file, name, templates)


def _template(file: str, name: str, spec: Any) -> tuple[Template | None, list[Problem]]:
    def problem(field: str | None, message: str) -> tuple[None, list[Problem]]:
        return None, [Problem(file, name, field, message)]

    if not NAME_RE.match(name) or name == "source":
        return problem(None, "node names are identifiers (letters, digits, _) and 'source' is reserved")
    if not isinstance(spec, dict):
        return problem(None, "a template node is a mapping {stage, params, inputs, for_each_output, outputs}")
    unknown = sorted(set(spec) - TEMPLATE_KEYS)
    if unknown:
        return problem(unknown[0], f"unknown key in a template node; valid keys: {', '.join(sorted(TEMPLATE_KEYS))}")
    if STAGES.failure(spec.get("stage")):
        return problem("stage", STAGES.failure(spec.get("stage")))
    cls = STAGES.get(spec.get("stage")) if isinstance(spec.get("stage"), str) else None
    if cls is None:
        return problem("stage", f"unknown stage {shown(spec.get('stage'))}; `runtime stages` lists them")
    try:
        stage = cls(cls.Params(**(spec.get("params") or {})))
    except (ValidationError, TypeError):  # the expanded nodes' validation names the bad param
        stage = cls(cls.Params())
    each = spec.get("for_each_output")
    if not isinstance(each, dict) or set(each) != FOR_EACH_KEYS:
        return problem("for_each_output", "expected {roles: [ROLE, ...], input: INPUT}: the roles of the outputs "
                       "to attach to and the stage input they are wired to; got " + shown(each))
    roles, inp = each["roles"], each["input"]
    if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
        return problem("for_each_output.roles", f"expected a list of roles ({', '.join(ROLES)}); got {shown(roles)}")
    inputs = spec.get("inputs") or {}
    declared = stage.inputs()
    if inp not in declared:
        return problem("for_each_output.input", f"stage '{cls.name}' has no input {shown(inp)}; inputs: "
                       f"{', '.join(declared)}")
    if not isinstance(inputs, dict) or inp in inputs:
        return problem("inputs", f"a mapping of the other inputs; '{inp}' is wired by for_each_output")
    outputs = spec.get("outputs", list(stage.outputs()))
    if not isinstance(outputs, list) or any(o not in stage.outputs() for o in outputs):
        return problem("outputs", f"expected a list of columns of '{cls.name}' to keep ({', '.join(stage.outputs())}); "
                       f"got {shown(outputs)}")
    node = {k: v for k, v in spec.items() if k not in ("for_each_output", "outputs")}
    return Template(name, node, roles, inp, outputs, stage), []


def expand(overlay: Overlay, graph: Graph, doc: dict,
           origins: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """Add ``overlay``'s expanded nodes and their kept columns to ``doc`` (the document ``graph``
    was validated from), recording each node's origin; return ``{template: expanded node names}``
    and one note per output of a listed role passed over because its type does not fit."""
    problems, expanded, notes = [], {}, []
    nodes = doc.setdefault("nodes", {})
    for t in overlay.templates:
        spec = t.stage.inputs()[t.input].spec
        fits, misfits = [], []
        for name, node in graph.nodes.items():
            for column, out in node.stage.outputs().items():
                if out.role is not None and out.role.value in t.roles:
                    why = match_spec(spec, node.output_types[column], {})
                    (misfits if why else fits).append((name, column, why))
        if not fits:
            seen = "; ".join(f"{n}.{c} does not fit ({why})" for n, c, why in misfits) or "it has none"
            problems.append(Problem(overlay.file, t.name, "for_each_output.roles", f"graph '{graph.name}' "
                                    f"({graph.path}) has no output with role {' / '.join(t.roles)} that fits input "
                                    f"'{t.input}' ({describe_type(spec)}): {seen}"))
            continue
        notes += [f"overlay {overlay.file}: template '{t.name}' passes over {n}.{c}, which does not fit input "
                  f"'{t.input}' ({why})" for n, c, why in misfits]
        per_node = {n: sum(1 for m, _, _ in fits if m == n) for n, _, _ in fits}
        expanded[t.name] = []
        for source, column, _ in fits:
            name = f"{t.name}_{source}" + (f"_{column}" if per_node[source] > 1 else "")
            if name in nodes:
                problems.append(Problem(overlay.file, t.name, None, f"expands to node '{name}' for {source}.{column}, "
                                        f"but graph '{graph.name}' already has a node of that name; rename the template"))
                continue
            nodes[name] = {**t.spec, "inputs": {**(t.spec.get("inputs") or {}), t.input: f"{source}.{column}"}}
            origins[name] = overlay.file
            doc["outputs"] = list(doc.get("outputs") or []) + [f"{name}.{c}" for c in t.outputs]
            expanded[t.name].append(name)
    if problems:
        raise GraphError(problems)
    return expanded, notes


def override_target(item: str) -> str:
    """The node (or ``dataset``, ``shard_size``) a ``--set`` item names."""
    return item.partition("=")[0].strip().partition(".")[0]


def per_expansion(overrides: list[str], expanded: dict[str, list[str]]) -> list[str]:
    """``--set TEMPLATE.PARAM=V`` as one ``--set NODE.PARAM=V`` per node the template expanded to."""
    out = []
    for item in overrides:
        target = override_target(item)
        rest = item.lstrip()[len(target):]
        out += [f"{node}{rest}" for node in expanded[target]] if target in expanded else [item]
    return out
