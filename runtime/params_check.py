"""Booleans where a param takes a number: pydantic reads ``true`` as 1 (``grid: true`` would
silently be a 1 x 1 grid), so validation refuses them by the param's annotation."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence


def _takes_bool(annotation: object) -> bool:
    """Whether a param of this annotation may be a boolean."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _takes_bool(args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_takes_bool(a) for a in args)
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in args)
    return annotation in (bool, typing.Any, object)


def holds_stray_bool(annotation: object, value: object) -> bool:
    """Whether ``value`` is, or holds in a list, tuple or mapping, a boolean where
    ``annotation`` takes none."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return holds_stray_bool(args[0], value)
    if isinstance(value, bool):
        return not _takes_bool(annotation)
    if origin in (typing.Union, types.UnionType):  # stray for every member that could hold the value
        holders = [a for a in args if _could_hold(a, value)]
        return bool(holders) and all(holds_stray_bool(a, value) for a in holders)
    if not _could_hold(annotation, value):
        return False
    if isinstance(value, Mapping):
        return bool(args) and any(holds_stray_bool(args[1], v) for v in value.values())
    return any(holds_stray_bool(item, v) for item, v in zip(_item_annotations(origin, args, len(value)), value))


def _could_hold(annotation: object, value: object) -> bool:
    """Whether ``annotation`` is a container of the kind of ``value`` (list / tuple / mapping)."""
    origin = typing.get_origin(annotation)
    if isinstance(value, Mapping):
        return origin is not None and isinstance(origin, type) and issubclass(origin, Mapping)
    return isinstance(value, (list, tuple)) and origin is not None and isinstance(origin, type) \
        and issubclass(origin, Sequence) and not issubclass(origin, str)


def _item_annotations(origin: type, args: tuple, length: int) -> list[object]:
    """The annotation of each item: ``tuple[int, float]`` by position, ``list[int]`` and
    ``tuple[int, ...]`` the same for all."""
    if origin is tuple and args and args[-1] is not Ellipsis:
        return list(args)
    return [args[0] if args else typing.Any] * length
