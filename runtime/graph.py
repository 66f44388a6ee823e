"""Graph files: load (safe YAML, ``extends:``, overlays, ``--set``), validate, and resolve.

A graph names a dataset source, its nodes (stage + params + inputs wired from upstream
columns) and the outputs to keep. Validation happens before any work and reports every
problem with the file, node and field, and what would be valid. The seams: reading files
(``graph_files``), command-line edits (``graph_edits``), overlays (``overlays``), validation
(``graph_validation``), the validated ``Graph`` (``graph_model``).
"""

from __future__ import annotations

import copy
from pathlib import Path

from runtime.graph_edits import apply_dtype, apply_overrides, apply_preset
from runtime.graph_files import SOURCE, Ref, read_dataset_file, read_document
from runtime.graph_model import Graph, Node
from runtime.graph_validation import validate
from runtime.overlays import expand, override_target, per_expansion, read_overlay

__all__ = ["SOURCE", "Graph", "Node", "Ref", "load_graph"]


def load_graph(path: str | Path, overrides: list[str] | None = None,
               presets: list[str] | tuple[str, ...] = (), dtype: str | None = None,
               dataset: str | Path | None = None, overlays: list[str | Path] | tuple[str | Path, ...] = ()) -> Graph:
    """Read, merge, overlay, override and validate a graph file; raise ``GraphError`` listing every problem.

    ``dataset`` (``--dataset``) is a dataset file replacing the graph's whole dataset block.
    The overlays the graph file names, then ``overlays`` (``--overlay``, each adding its name
    to the graph's: ``esam_enhanced-faithfulness``) expand against the graph as it stands.
    Each of ``presets`` sets the preset of the model nodes that offer it (``--preset large
    --preset vitt``), ``dtype`` the compute type of those that have one (``--dtype``);
    ``overrides`` (``--set``) come after them, and one naming an overlay template sets every
    node it expanded to.
    """
    path = Path(path)
    read = read_document(path.resolve(), ())
    doc, dataset_file = read.doc, read.dataset_file
    file = str(path)
    origins = {k: (file if Path(v) == path.resolve() else v) for k, v in read.origins.items()}
    if dataset is not None:
        doc["dataset"] = read_dataset_file(Path(dataset).resolve())
        dataset_file = str(dataset)
    doc.setdefault("name", path.stem)
    overrides = list(overrides or [])
    named = [read_overlay(o) for o in overlays]
    expanded: dict[str, list[str]] = {}
    notes = list(read.notes)
    for overlay in [*map(read_overlay, read.overlays), *named]:
        base = validate(_as_it_stands(doc, overrides, file), origins, file, dataset_file, read.notes)
        added, passed_over = expand(overlay, base, doc, origins)
        expanded |= added
        notes += passed_over
    if named and isinstance(doc["name"], str):  # its own run folder, not the graph's
        doc["name"] = "-".join([doc["name"], *(o.name for o in named)])
    for preset in presets:
        apply_preset(doc, preset, file)
    if dtype is not None:
        apply_dtype(doc, dtype, file)
    apply_overrides(doc, per_expansion(overrides, expanded), file)
    return validate(doc, origins, file, dataset_file, notes)


def _as_it_stands(doc: dict, overrides: list[str], file: str) -> dict:
    """A copy of ``doc`` with the ``--set`` items naming its nodes, dataset or shard_size: the
    graph an overlay expands against (items naming nodes it expands to apply afterwards)."""
    base = copy.deepcopy(doc)
    known = {"dataset", "shard_size", *(base.get("nodes") or {})}
    apply_overrides(base, [o for o in overrides if override_target(o) in known], file)
    return base
