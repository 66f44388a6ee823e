"""Named, pluggable things (stages, dataset sources, trainers, shipped presets, quality variants): one mechanism.

A ``Registry`` maps names to items. This project registers its own items where they are
defined (``@STAGES.add`` on a stage class) or, for items whose module is heavy to import
(trainers), as data in one place. Other installed packages add theirs through Python entry
points of the registry's group, e.g. in a plugin's ``pyproject.toml``::

    [project.entry-points."pnpvqa.stages"]
    center_prior = "my_heatmaps.stages:CenterPrior"

Entry points are read on the first lookup, so importing a registry costs nothing. A plugin that
cannot be loaded (an import error, even ``sys.exit`` at import), is misnamed or clashes with
another item under one name is left out with a warning naming it, so it blocks nothing but the
graphs that use its name: for them ``failure(name)`` says what is wrong (graph validation
reports it). Two built-in items under one name are an error.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(Exception):
    """A plugin that cannot be loaded, or two items under one name."""


def origin_of(item: object) -> str:
    """Where an item is defined: ``module (file)``."""
    target = item if inspect.isclass(item) or inspect.isfunction(item) else type(item)
    try:
        file = inspect.getsourcefile(target)
    except TypeError:
        file = None
    return f"{target.__module__} ({file})" if file else target.__module__


class Registry(MutableMapping[str, T], Generic[T]):
    """Items of one ``kind`` by name; plugins from the entry points of ``group``.

    ``name_of(item)`` gives an item's own name (a stage class's ``name``): an entry point must be
    called by it, so that graphs and the plugin's metadata agree.
    """

    def __init__(self, kind: str, group: str, name_of: Callable[[T], str]):
        self.kind, self.group, self.name_of = kind, group, name_of
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._failures: dict[str, str] = {}  # name -> why the plugin item of that name is left out
        self._plugins_loaded = False

    def add(self, item: T, origin: str | None = None) -> T:
        """Register ``item`` under its own name; usable as a class decorator."""
        name = self.name_of(item)
        origin = origin or origin_of(item)
        if name in self._items and self._items[name] is not item:
            raise RegistryError(f"two {self.kind}s are named '{name}': {self._origins[name]} and {origin}; "
                                "rename one (a plugin cannot replace a built-in)")
        self._items[name] = item
        self._origins[name] = origin
        return item

    def origin(self, name: str) -> str:
        self._load_plugins()
        return self._origins[name]

    def failure(self, name: object) -> str | None:
        """Why the plugin item called ``name`` is left out (None when it is not)."""
        self._load_plugins()
        return self._failures.get(name) if isinstance(name, str) else None

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points  # 40 ms, paid only by commands that look a name up

        for ep in entry_points(group=self.group):
            where = f"entry point '{ep.name} = {ep.value}' of {ep.dist.name if ep.dist else 'an installed package'}"
            try:
                self._add_plugin(ep, where)
            except RegistryError as exc:
                self._failures[ep.name] = str(exc)
                print(f"warning: {exc}; left out", file=sys.stderr)

    def _add_plugin(self, ep, where: str) -> None:
        """Load one entry point and register its item; ``RegistryError`` says why it cannot be."""
        try:
            item = ep.load()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin must not end the process; Ctrl-C still does
            said = " ".join(str(exc).split())  # one line: it is quoted in a warning and in validation errors
            raise RegistryError(f"{where} (group {self.group}) cannot be loaded: {type(exc).__name__}: {said}") \
                from None
        if self.name_of(item) != ep.name:
            raise RegistryError(f"{where} names a {self.kind} called '{self.name_of(item)}'; the entry point "
                                "must have the same name")
        self.add(item, f"{origin_of(item)}, {where}")

    # -- mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        self._load_plugins()
        return self._items[name]

    def __setitem__(self, name: str, item: T) -> None:  # tests put stand-in stages in place
        self._items[name] = item
        self._origins[name] = origin_of(item)

    def __delitem__(self, name: str) -> None:
        del self._items[name]
        del self._origins[name]

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(self._items)

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return isinstance(name, str) and name in self._items
