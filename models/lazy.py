"""Packages whose names are imported on first use (PEP 562), so that importing one light
submodule (sizes, file lookup) does not import torch through the package's ``__init__``."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, list[str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``name`` from ``package.submodule`` for each
    ``submodule: [names]`` of ``exports``."""
    where = {name: sub for sub, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
