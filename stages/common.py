"""Helpers shared by stages: per-row seeding, optional inputs, nullable outputs."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from stages.base import Batch


def row_rng(seed: int, row_id: str) -> np.random.Generator:
    """A generator seeded by ``(seed, row_id)`` only, so draws never depend on batching."""
    digest = hashlib.sha256(row_id.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def optional_column(batch: Batch, name: str, fill: Any) -> tuple[Any, np.ndarray]:
    """``(values, valid)`` of an optional input; a column the graph does not wire is ``fill``,
    all null."""
    if name not in batch.columns:
        return fill, np.zeros(len(batch), dtype=bool)
    return batch[name], np.asarray(batch.valid(name), dtype=bool)


def nullable(values: np.ndarray, valid: np.ndarray) -> list[float | None]:
    """Scalars as a list with None (null) where ``valid`` is False."""
    return [float(v) if ok else None for v, ok in zip(values, valid)]

