"""Plain-text documentation of pydantic params (for `runtime stages` and validation errors)."""

from __future__ import annotations

import types
import typing


def type_name(ann) -> str:
    """``int``, ``one of a|b``, ``float | None``, ``list[float]`` for a param annotation."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def allowed_range(field) -> str | None:
    """The bounds of a numeric param as text (``at least 32 and at most 4096``), or None when it
    has none."""
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata
              if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
    low = f"at least {bounds['Ge']}" if "Ge" in bounds else f"above {bounds['Gt']}" if "Gt" in bounds else None
    high = f"at most {bounds['Le']}" if "Le" in bounds else f"below {bounds['Lt']}" if "Lt" in bounds else None
    return " and ".join(b for b in (low, high) if b) or None


def describe_params(model) -> list[str]:
    lines = []
    for name, f in model.model_fields.items():
        ann = type_name(f.annotation)
        default = "required" if f.is_required() else f"default {f.default!r}"
        bounds = " ".join(f"{type(m).__name__.lower()} {getattr(m, type(m).__name__.lower())}" for m in f.metadata
                          if hasattr(m, type(m).__name__.lower()))
        lines.append(f"    {name}: {ann} ({default}{', ' + bounds if bounds else ''}) — {f.description or ''}".rstrip(" —"))
    return lines or ["    (none)"]
