"""What a stage's results depend on besides its params and inputs: its code and libraries.

The code identity of a stage is computed, never hand-kept: the module that defines the stage
class and, transitively, every module of this project (``stages``, ``grids``, ``models``,
``artifacts``, or the stage's own top-level package for plugins) that it imports anywhere in its source,
lazy imports inside functions included. Each module counts by its syntax tree without
docstrings, so editing a comment or a docstring keeps cached results, and any change to the
code does not. Third-party imports found on the way name the libraries whose versions join
the key (only those that change numbers: torch, transformers, numpy, ...).

Nothing here imports the modules it reads: files are found from the packages' locations and
parsed, so computing a key costs no torch import.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import platform
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from artifacts.filehash import file_version, remembered

PROJECT_PACKAGES = ("stages", "grids", "models", "artifacts")
# import name -> distributions whose version can change a stage's numbers
NUMERIC_LIBRARIES = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "transformers": ("transformers", "tokenizers"),  # tokenizers runs transformers' fast tokenizers
    "tokenizers": ("tokenizers",),
    "timm": ("timm",),
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "cv2": ("opencv-python-headless", "opencv-python"),
    "PIL": ("pillow",),
    "sentencepiece": ("sentencepiece",),
    "safetensors": ("safetensors",),
}
# the runtime's code that shapes every stage's results (batching, error rows, row alignment)
RUNNER_MODULES = ("runtime.node_runner",)


@dataclass(frozen=True)
class CodeIdentity:
    """``code``: hash of the modules' syntax; ``modules``: their names; ``libraries``: name ->
    version of the numeric libraries they import (plus Python's)."""

    code: str
    modules: tuple[str, ...]
    libraries: tuple[tuple[str, str], ...]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def _package_dir(top: str) -> Path | None:
    """Where the top-level package ``top`` lives, without importing it."""
    if top in sys.modules and getattr(sys.modules[top], "__file__", None):
        file = Path(sys.modules[top].__file__)
        return file.parent if file.name == "__init__.py" else file
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
        return None
    origin = Path(spec.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def _module_file(name: str) -> Path | None:
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__file__", None):
        return Path(mod.__file__)
    top, *rest = name.split(".")
    base = _package_dir(top)
    if base is None:
        return None
    if base.suffix == ".py":
        return base if not rest else None
    path = base.joinpath(*rest)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def _parse(file: str, version: tuple) -> tuple[str, tuple[tuple[str, tuple[str, ...], int], ...]]:
    """(hash of the docstring-free syntax tree, imports as (module, names, level)) of the file at
    ``version`` (``file_version``: an edit with the mtime put back is a new version), remembered
    across processes (``artifacts.filehash``): parsing a model package takes a second."""
    digest, imports = json.loads(remembered(file, "syntax", _parse_file))
    return digest, tuple((m, tuple(n), level) for m, n, level in imports)


def _parse_file(file: str) -> str:
    tree = ast.parse(Path(file).read_text(encoding="utf-8"), filename=file)
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.extend((alias.name, (), 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.append((node.module or "", tuple(a.name for a in node.names), node.level))
    dump = ast.dump(_strip_docstrings(tree), annotate_fields=False, include_attributes=False)
    dump += f"|python {sys.version_info[0]}.{sys.version_info[1]}"  # the tree's form depends on it
    return json.dumps([hashlib.sha256(dump.encode()).hexdigest(), imports])


def _resolve(module: str, package: str, level: int) -> str:
    if level == 0:
        return module
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, module] if module else base)


def _closure(start: str, roots: frozenset[str]) -> tuple[dict[str, str], set[str]]:
    """Module name -> syntax hash for ``start`` and the project modules it reaches; and the
    top-level names of the other modules imported on the way."""
    hashes: dict[str, str] = {}
    external: set[str] = set()
    stack = [start]
    while stack:
        name = stack.pop()
        if name in hashes:
            continue
        file = _module_file(name)
        if file is None or file.suffix != ".py":
            hashes[name] = "unreadable"
            continue
        digest, imports = _parse(str(file), file_version(file))
        hashes[name] = digest
        is_package = file.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        # (the parent packages' __init__ modules that `import a.b.c` also runs are not followed:
        # `stages/__init__` imports every stage, and registries do not change numbers)
        for module, names, level in imports:
            target = _resolve(module, package, level)
            if not target:
                continue
            top = target.split(".")[0]
            if top not in roots:
                external.add(top)
                continue
            stack.append(target)
            for member in names:  # `from pkg import submodule`
                if member != "*" and _module_file(f"{target}.{member}") is not None:
                    stack.append(f"{target}.{member}")
    return hashes, external


def _distribution_version(names: tuple[str, ...]) -> str | None:
    for dist in names:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@lru_cache(maxsize=None)
def _library_versions(externals: frozenset[str]) -> tuple[tuple[str, str], ...]:
    out = {"python": platform.python_version()}
    for top in sorted(externals):
        for dist in NUMERIC_LIBRARIES.get(top, ()):
            version = _distribution_version((dist,))
            if version is not None:
                out[dist] = version
    return tuple(sorted(out.items()))


def code_identity(cls: type) -> CodeIdentity:
    """The code and library identity of a stage class (see the module doc)."""
    module = cls.__module__
    roots = frozenset((*PROJECT_PACKAGES, module.split(".")[0]))
    hashes, external = _closure(module, roots)
    for runner in RUNNER_MODULES:  # its own file only: its imports are the runtime's, not numbers
        file = _module_file(runner)
        hashes[runner] = _parse(str(file), file_version(file))[0] if file else "unreadable"
    if hashes.get(module) == "unreadable":  # e.g. a class typed into an interactive session
        try:
            hashes[module] = hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
        except (OSError, TypeError):
            raise CodeUnreadable(f"the code of stage class {cls.__qualname__} (module {module}) cannot be read, "
                                 "so its cached results could not be told apart from another version's; "
                                 "define the stage in a module file") from None
    code = hashlib.sha256(repr(sorted(hashes.items())).encode()).hexdigest()[:32]
    return CodeIdentity(code, tuple(sorted(hashes)), _library_versions(frozenset(external)))


class CodeUnreadable(Exception):
    """A stage whose source cannot be found: its results cannot be keyed by its code."""
