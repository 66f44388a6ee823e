"""Whether each Ray worker runs the driver's code. Cache keys are computed by the driver from
its code and library versions (runtime/code_identity.py) and a worker stores its results under
them, so a node with other code or libraries would put its numbers under the driver's keys:
such a worker stops the run before any work, named with what differs."""

from __future__ import annotations

import sys

from runtime.code_identity import code_identity
from runtime.errors import UsageError

Identity = tuple[str, tuple[tuple[str, str], ...]]  # (code hash, library versions)


def stage_classes(graphs) -> tuple[type, ...]:
    """The stage classes of ``graphs``, each once (pickled by reference: a worker imports its own)."""
    return tuple(dict.fromkeys(type(nd.stage) for g in graphs for nd in g.nodes.values()))


def identities(classes: tuple[type, ...]) -> list[Identity | None]:
    """This process's identity of each class; None for a class shipped by value (cloudpickle's
    ``register_pickle_by_value``, as tests do): its module is not imported here, and the class
    brought its code with it."""
    out: list[Identity | None] = []
    for cls in classes:
        if cls.__module__ not in sys.modules:
            out.append(None)
            continue
        identity = code_identity(cls)
        out.append((identity.code, identity.libraries))
    return out


def check_same_code(classes: tuple[type, ...], infos: list[dict]) -> None:
    """Refuse to run when a worker's identity of a stage class (``info["code"]``) is not the driver's."""
    here = identities(classes)
    for info in infos:
        for cls, mine, theirs in zip(classes, here, info.pop("code")):
            if mine is None or theirs is None or mine == theirs:
                continue
            raise UsageError(f"the Ray worker on {info['host']} (node {str(info.get('node_id', '?'))[:12]}) runs other "
                             f"code than this driver for stage '{getattr(cls, 'name', cls.__name__)}': "
                             f"{_difference(mine, theirs)}. Cache keys are computed by the driver, so that worker "
                             "would store its results under keys they do not match: install the same checkout and "
                             "libraries on every node (README, 'Cluster + bucket, worked through')")


def _difference(mine: Identity, theirs: Identity) -> str:
    here, there = dict(mine[1]), dict(theirs[1])
    libraries = [f"{name} {there.get(name, 'missing')} there, {here.get(name, 'missing')} here"
                 for name in sorted(set(here) | set(there)) if here.get(name) != there.get(name)]
    return ", ".join(libraries) or "the code of the stage or of the project modules it imports differs"
