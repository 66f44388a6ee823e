"""Building a model of a preset: seeded random weights, or empty ones a checkpoint will fill."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def build_preset(make: Callable[[], nn.Module], empty: bool, device: torch.device | str, seed: int) -> nn.Module:
    """``make()`` with seeded random initialisation (the same weights in every process, the
    global RNG untouched), or, with ``empty``, built on the meta device and materialised
    uninitialised with its buffers recomputed (``reset_buffers``): every parameter must then
    come from a checkpoint, and no time goes into an initialisation it would overwrite."""
    if not empty:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make()
        return model.to(device)
    with torch.device("meta"):
        model = make()
    model.to_empty(device=device)
    model.reset_buffers()
    return model
