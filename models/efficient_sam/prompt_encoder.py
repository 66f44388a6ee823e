"""EfficientSAM's prompt encoder: points with labels -> sparse prompt tokens.

A point's token is the random-Fourier-feature encoding of its position plus a learned
embedding chosen by its label:

    -1  padding (not a point)   ``invalid_points``
     0  background point         nothing added (position only)
     1  foreground point         ``point_embeddings``
     2  box top-left corner      ``bbox_top_left_embeddings``
     3  box bottom-right corner  ``bbox_bottom_right_embeddings``

Unlike segment-anything, a padding point keeps its positional encoding (of whatever
coordinates it carries); :class:`models.efficient_sam.efficient_sam.EfficientSam` therefore
puts every padding point at ``(-1, -1)``, where the reference's own padding lies.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LABELS = (-1, 0, 1, 2, 3)


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of 2-D positions with a fixed Gaussian frequency matrix.

    ``positional_encoding_gaussian_matrix [2, F]`` is a persistent buffer (it is in the
    checkpoints). Positions in ``[0, 1]^2`` (x, y) -> ``[..., 2F]`` = ``[sin, cos]``.
    """

    def __init__(self, num_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords [..., 2]`` in ``[0, 1]`` (x, y) -> ``[..., 2F]`` (computed in float32)."""
        proj = (2 * coords.float() - 1) @ self.positional_encoding_gaussian_matrix.float()
        proj = 2 * math.pi * proj
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the cell centres of an ``h x w`` grid: ``[2F, h, w]``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        coords = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self.encode(coords).permute(2, 0, 1)

    def points(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``coords [..., 2]`` in pixels (x, y) of an ``image_size = (H, W)`` frame -> ``[..., 2F]``."""
        h, w = image_size
        scale = torch.tensor([1.0 / w, 1.0 / h], device=coords.device, dtype=torch.float32)
        return self.encode(coords.float() * scale)


class PromptEncoder(nn.Module):
    """Points and labels -> sparse tokens ``[B, N, embed_dim]``; also the dense positional
    encoding of the image-embedding grid ``[1, embed_dim, h, w]`` for the decoder."""

    def __init__(self, embed_dim: int, embedding_grid: tuple[int, int], input_size: tuple[int, int]) -> None:
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even, got {embed_dim}")
        self.embed_dim = embed_dim
        self.embedding_grid = tuple(embedding_grid)
        self.input_size = tuple(input_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.invalid_points = nn.Embedding(1, embed_dim)
        self.point_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_top_left_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_bottom_right_embeddings = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        """``[1, embed_dim, h, w]`` positional encoding of the image-embedding grid (float32)."""
        return self.pe_layer.grid(self.embedding_grid)[None]

    def label_table(self) -> torch.Tensor:
        """``[5, embed_dim]``: the embedding added for labels -1, 0, 1, 2, 3 (row = label + 1)."""
        weight = self.point_embeddings.weight
        return torch.cat([self.invalid_points.weight, torch.zeros_like(weight), weight,
                          self.bbox_top_left_embeddings.weight, self.bbox_bottom_right_embeddings.weight])

    def forward(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``points [B, N, 2]`` (x, y) in pixels of the encoder's input frame (e.g. 1024x1024),
        ``labels [B, N]`` in {-1, 0, 1, 2, 3} -> ``[B, N, embed_dim]``.

        Points are shifted by half a pixel to the pixel centre before encoding.
        """
        pe = self.pe_layer.points(points + 0.5, self.input_size)
        table = self.label_table()
        return pe.to(table.dtype) + table[labels.long() + 1]
