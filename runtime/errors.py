"""Errors the CLI prints as one paragraph each, without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Problem:
    """One thing wrong with a graph: where (file, node, field) and what would be valid."""

    file: str
    node: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = [self.file]
        if self.node:
            where.append(f"node '{self.node}'")
        if self.field:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}"


class GraphError(Exception):
    """A graph file (or a --set override) that cannot run; holds every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UsageError(Exception):
    """A bad command-line argument."""
