"""A validated graph: its nodes (stage + wired inputs + output types) in topological order,
the dataset source and the kept outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from artifacts.fingerprint import fingerprint
from runtime.graph_files import SOURCE, Ref
from sources.base import Source
from stages.base import Granularity, Stage


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

