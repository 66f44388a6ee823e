"""Errors the CLI prints as one paragraph each, without a traceback."""

from __future__ import annotations

import reprlib
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


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 2, 60, 60
    r.maxlist = r.maxtuple = r.maxset = r.maxfrozenset = r.maxdict = 5
    return r


_SHORT_REPR = _short_repr()
SHOWN_LIMIT = 200


def shown(value: object) -> str:
    """``repr(value)`` for a message, cut to about ``SHOWN_LIMIT`` characters without building
    the whole text: a value from a graph may expand to a megabyte through YAML aliases."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= SHOWN_LIMIT else text[:SHOWN_LIMIT] + "..."
