"""Shared pieces of the fusion modules: input checks, SAM resampling, masks, zero projections,
multi-head attention with an explicit key mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fusion.config import FusionConfig


def check_inputs(config: FusionConfig, blip_tokens: torch.Tensor, sam_embed: torch.Tensor) -> None:
    """``blip_tokens [B, 1+g*g, C1]`` and ``sam_embed [B, Cs, S, S]`` as the config says."""
    if blip_tokens.dim() != 3:
        raise ValueError(f"blip_tokens must be [B, 1+P, C1], got {tuple(blip_tokens.shape)}")
    if sam_embed.dim() != 4:
        raise ValueError(f"sam_embed must be [B, Cs, S, S], got {tuple(sam_embed.shape)}")
    b, t, c = blip_tokens.shape
    if c != config.blip_width or t != config.tokens:
        raise ValueError(f"blip_tokens {tuple(blip_tokens.shape)} do not fit this fusion module: it takes "
                         f"[B, {config.tokens}, {config.blip_width}] (grid {config.grid}, width {config.blip_width})")
    if sam_embed.shape[1] != config.sam_dim:
        raise ValueError(f"sam_embed has {sam_embed.shape[1]} channels, this fusion module takes {config.sam_dim}")
    if sam_embed.shape[0] != b:
        raise ValueError(f"batch sizes differ: blip_tokens {b}, sam_embed {sam_embed.shape[0]}")


def check_mask(mask: torch.Tensor | None, batch: int, tokens: int, name: str, device) -> torch.Tensor | None:
    """``None`` or a bool ``[B, T]`` (True = keep) with at least one kept token per row."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got {mask.dtype}")
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(f"{name} must be [{batch}, {tokens}], got {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{name} masks every token of a row: at least one token must be kept")
    return mask.to(device)


def sam_to_grid(sam_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, Cs, S, S] -> [B, Cs, grid, grid]``: bilinear (``align_corners=False``, no antialias),
    a no-op when already that size."""
    if sam_embed.shape[-2:] == (grid, grid):
        return sam_embed
    return F.interpolate(sam_embed, size=(grid, grid), mode="bilinear", align_corners=False)


def flatten_grid(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, g, g] -> [B, g*g, C]`` (row-major, as ViT patch tokens)."""
    return x.flatten(2).transpose(1, 2)


def zero_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A Linear whose weight and bias start at zero (the fused output starts equal to BLIP's)."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def projection(in_dim: int, out_dim: int) -> nn.Module:
    """Identity where the widths agree, else a Linear."""
    return nn.Identity() if in_dim == out_dim else xavier_linear(in_dim, out_dim)


def residual(blip_tokens: torch.Tensor, delta: torch.Tensor, blip_mask: torch.Tensor | None) -> torch.Tensor:
    """``blip + delta`` (delta zeroed on masked BLIP tokens), in the BLIP tokens' dtype."""
    if blip_mask is not None:
        delta = delta * blip_mask[..., None].to(delta.dtype)
    return blip_tokens + delta.to(blip_tokens.dtype)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate q / k / v / out projections.

    ``queries [B, Tq, width]``, ``keys``/``values [B, Tk, kv_dim]``, ``key_mask [B, Tk]`` bool
    (True = attend) -> ``[B, Tq, width]``. A key whose mask is False has no influence on any
    output. ``zero_out``: the output projection starts at zero. ``dropout`` is applied to the
    output (not to the attention probabilities: that path of ``scaled_dot_product_attention``
    materialises a ``[B, heads, Tq, Tk]`` mask and is ~15x slower on CPU for 577 tokens).
    """

    def __init__(self, width: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0,
                 zero_out: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        kv_dim = kv_dim or width
        self.heads = heads
        self.dropout = nn.Dropout(dropout)
        self.q = xavier_linear(width, width)
        self.k = xavier_linear(kv_dim, width)
        self.v = xavier_linear(kv_dim, width)
        self.out = zero_linear(width, width) if zero_out else xavier_linear(width, width)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_mask: torch.Tensor | None = None, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, tq, _ = queries.shape
        tk = keys.shape[1]
        q = self.q(queries).view(b, tq, self.heads, -1).transpose(1, 2)
        k = self.k(keys)
        if key_bias is not None:  # e.g. a positional embedding of the keys
            k = k + key_bias
        k = k.view(b, tk, self.heads, -1).transpose(1, 2)
        v = self.v(values).view(b, tk, self.heads, -1).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dropout(self.out(a.transpose(1, 2).reshape(b, tq, -1)))
