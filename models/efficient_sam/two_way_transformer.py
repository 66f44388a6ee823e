"""The two-way transformer of the mask decoder: prompt tokens and image tokens attend to each
other, layer by layer, then the tokens attend to the image once more.

Tokens ``[B, T, C]`` (output tokens followed by prompt tokens), image ``[B, C, h, w]``.
LayerNorms use eps 1e-5; the MLP activation is GELU (segment-anything uses ReLU here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.efficient_sam.common import MLP


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections to ``width / downsample`` channels:
    ``q [B, Nq, C], k [B, Nk, C], v [B, Nk, C] -> [B, Nq, C]``."""

    def __init__(self, width: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = width // downsample
        if inner % heads:
            raise ValueError(f"{heads} heads do not divide the attention width {inner}")
        self.heads = heads
        self.q_proj = nn.Linear(width, inner)
        self.k_proj = nn.Linear(width, inner)
        self.v_proj = nn.Linear(width, inner)
        self.out_proj = nn.Linear(inner, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # [B, heads, N, c/heads]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self._split(self.q_proj(q)), self._split(self.k_proj(k)),
                                             self._split(self.v_proj(v)))
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class TwoWayAttentionBlock(nn.Module):
    """(1) token self-attention, (2) tokens -> image cross-attention, (3) token MLP,
    (4) image -> tokens cross-attention; each followed by a residual and a LayerNorm.
    Positional encodings are added to queries and keys (not values); the first block's
    self-attention takes the raw tokens (``skip_first_layer_pe``)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, downsample: int = 2,
                 skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(width, heads)
        self.norm1 = nn.LayerNorm(width)
        self.cross_attn_token_to_image = Attention(width, heads, downsample)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim, width, num_layers=1)
        self.norm3 = nn.LayerNorm(width)
        self.norm4 = nn.LayerNorm(width)
        self.cross_attn_image_to_token = Attention(width, heads, downsample)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries [B, T, C]``, ``keys [B, hw, C]`` and their encodings -> updated (queries, keys)."""
        if self.skip_first_layer_pe:
            queries = self.norm1(queries + self.self_attn(queries, queries, queries))
        else:
            q = queries + query_pe
            queries = self.norm1(q + self.self_attn(q, q, q))
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, a final tokens -> image attention and a LayerNorm."""

    def __init__(self, depth: int, width: int, heads: int, mlp_dim: int, downsample: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(width, heads, mlp_dim, downsample, skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = Attention(width, heads, downsample)
        self.norm_final_attn = nn.LayerNorm(width)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [B, C, h, w]``, ``image_pe [B or 1, C, h, w]``, ``tokens [B, T, C]`` ->
        (tokens ``[B, T, C]``, image tokens ``[B, hw, C]``)."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
