"""BLIP's image encoder: a plain timm ViT with LAVIS's parameter names.

timm's ``VisionTransformer`` with ``num_classes=0, global_pool=''`` has exactly the key
layout of LAVIS's ``visual_encoder.*`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so no conversion is
needed. ``forward_features`` returns every token after the final LayerNorm: ``[B, 1+P, C]``
with the CLS token first and ``P = grid * grid`` patch tokens in row-major order.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.blip.config import VitConfig
from models.compute_clock import counted


def build_vit(cfg: VitConfig) -> VisionTransformer:
    """A timm ViT without head or pooling (LayerNorm eps ``cfg.layer_norm_eps``: 1e-6 in LAVIS)."""
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
        num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0, global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps))


@counted  # forward_features is not a module call: --profile would not see it otherwise
def encode(vit: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """``pixels [B, 3, S, S]`` (normalised) -> tokens ``[B, 1+P, C]`` (CLS first)."""
    return vit.forward_features(pixels)


def vit_grid(vit: VisionTransformer) -> int:
    """Side of the (square) patch grid of ``vit``."""
    rows, cols = vit.patch_embed.grid_size
    if rows != cols:
        raise ValueError(f"non-square patch grid {rows}x{cols}")
    return int(rows)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``pos_embed [1, 1+P0, C]`` (``P0`` a square) -> ``[1, 1+grid*grid, C]``.

    The CLS entry is kept; the ``g0 x g0`` grid part is resized bicubically
    (``align_corners=False``), computed in float32 and returned in the input dtype.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, 1+P, C], got {tuple(pos_embed.shape)}")
    patches = pos_embed.shape[1] - 1
    old = math.isqrt(patches)
    if old * old != patches:
        raise ValueError(f"pos_embed has {patches} patch positions, not a square grid")
    if old == grid:
        return pos_embed
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    width = pos_embed.shape[-1]
    grid_pos = grid_pos.float().reshape(1, old, old, width).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, width).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid_pos], dim=1)
