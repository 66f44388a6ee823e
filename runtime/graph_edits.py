"""Command-line edits of a graph document before validation: ``--set``, ``--preset``, ``--dtype``."""

from __future__ import annotations

import typing

from runtime.errors import GraphError, Problem, shown
from runtime.yaml_io import ExpansionError, parse_value
from stages import STAGES


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

