"""Small building blocks shared by the EfficientSAM modules."""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (each pixel normalised on its own)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class MLP(nn.Module):
    """``num_layers`` (Linear -> activation) pairs of width ``hidden`` and a final Linear.

    Parameter names follow the published checkpoints: ``layers.{i}.0`` and ``fc``.
    ``[..., in_dim] -> [..., out_dim]``.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int,
                 act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * num_layers
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(a, b), act()) for a, b in zip(dims[:-1], dims[1:]))
        self.fc = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)
