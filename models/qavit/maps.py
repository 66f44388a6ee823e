"""Heatmaps from ViT attention maps: CLS-to-patch attention of one or several layers, and
attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Attention maps are head-averaged, row-stochastic ``[B, N, N]`` matrices (row = query token,
column = key token; token 0 is CLS, 1..P the patches in row-major grid order).
"""

from __future__ import annotations

from typing import Sequence

import torch


def cls_to_patches(attention: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` (or ``[B, H, N, N]``, averaged over heads) -> the CLS row over the patches
    ``[B, N - 1]``."""
    if attention.dim() == 4:
        attention = attention.mean(dim=1)
    return attention[:, 0, 1:]


def with_residual(attention: torch.Tensor) -> torch.Tensor:
    """``0.5 * A + 0.5 * I``: the residual connection as an identity attention (rows still sum to 1)."""
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    return 0.5 * attention + 0.5 * eye


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rollout of layers ``attentions[0], ..., attentions[-1]`` (first to last), each
    ``[B, N, N]``: ``R = Â_last @ ... @ Â_first`` with ``Â = 0.5 * A + 0.5 * I``; ``R[:, i, j]`` is
    how much input token ``j`` flows into token ``i`` of the last layer's output. ``[B, N, N]``."""
    if not attentions:
        raise ValueError("attention rollout needs at least one layer")
    rollout = with_residual(attentions[0])
    for attention in attentions[1:]:
        rollout = torch.matmul(with_residual(attention), rollout)
    return rollout


def rollout_row(attentions: Sequence[torch.Tensor], row: int = 0) -> torch.Tensor:
    """Row ``row`` of :func:`attention_rollout` (``[B, N]``) without forming the ``N x N``
    products: ``e_row^T Â_last ... Â_first`` evaluated from the last layer back (vector times
    matrix, O(N^2) per layer)."""
    if not attentions:
        raise ValueError("attention rollout needs at least one layer")
    last = attentions[-1]
    vec = torch.zeros(last.shape[0], last.shape[-1], dtype=last.dtype, device=last.device)
    vec[:, row] = 1
    for attention in reversed(attentions):
        vec = 0.5 * torch.matmul(vec[:, None, :], attention)[:, 0] + 0.5 * vec
    return vec
