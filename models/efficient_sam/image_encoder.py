"""EfficientSAM's image encoder: a plain ViT (no CLS token, no windows) and a conv neck.

``[B, 3, S, S]`` normalised pixels -> ``[B, out_chans, S/16, S/16]``. The absolute position
embedding is stored at its pretraining size (``[1, 1 + 14*14, C]``: a CLS slot, then a 14x14
grid for 224-px images); at run time the CLS slot is dropped and the grid is resized
bicubically (``align_corners=False``) to the patch grid, e.g. 64x64 for 1024-px inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.efficient_sam.common import LayerNorm2d


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv: ``[B, 3, S, S] -> [B, C, S/p, S/p]``."""

    def __init__(self, patch_size: int, in_chans: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection: ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``: ``[..., C] -> [..., C]``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6): ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def grid_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``pos_embed [1, 1 + g0*g0, C]`` (CLS slot first) -> ``[1, h, w, C]`` for ``grid = (h, w)``.

    The CLS slot is dropped; the ``g0 x g0`` part is resized bicubically (``align_corners=False``,
    no antialiasing), in the dtype of ``pos_embed``, when its size differs from ``grid``.
    """
    table = pos_embed[:, 1:]
    side = int(round(table.shape[1] ** 0.5))
    if side * side != table.shape[1]:
        raise ValueError(f"pos_embed grid part has {table.shape[1]} entries, not a square")
    table = table.reshape(1, side, side, -1)
    if (side, side) == tuple(grid):
        return table
    table = F.interpolate(table.permute(0, 3, 1, 2), size=tuple(grid), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """ViT of ``depth`` blocks on 16-px patches, then the neck
    (conv 1x1 -> LayerNorm2d -> conv 3x3 -> LayerNorm2d, convs without bias).

    ``[B, 3, img_size, img_size] -> [B, out_chans, img_size/patch, img_size/patch]``.
    """

    def __init__(self, img_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, out_chans: int, pretrain_grid: int = 14) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid * pretrain_grid, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(width, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"the image encoder takes [B, 3, {self.img_size}, {self.img_size}] pixels, "
                             f"got {tuple(x.shape)} (resize with preprocess() first)")
        x = self.patch_embed(x).permute(0, 2, 3, 1)              # [B, g, g, C]
        b, h, w, c = x.shape
        x = (x + grid_pos_embed(self.pos_embed, (h, w))).reshape(b, h * w, c)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.reshape(b, h, w, c).permute(0, 3, 1, 2))
