"""Concat-conv fusion: BLIP patch grid and SAM embedding side by side, mixed by a 1x1 conv.

    blip_tokens [B, 1+P, C1] --drop CLS--> [B, C1, g, g] --+
    sam_embed  [B, Cs, S, S] --bilinear--> [B, Cs, g, g] --+--concat--> [B, C1+Cs, g, g]
        --1x1 conv, GELU--> [B, width, g, g] --flatten--> [B, P, width]
        --learned CLS prepended--> [B, 1+P, width] --out_proj (zero init)--> delta [B, 1+P, C1]
    fused = blip_tokens + delta                                                  [B, 1+P, C1]

Every position is mixed on its own (a 1x1 conv), so a token never influences another; the CLS
slot's delta is a learned constant. With the zero-initialised ``out_proj`` the fused tokens equal
the BLIP tokens until trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fusion.common import check_inputs, check_mask, flatten_grid, residual, sam_to_grid, zero_linear
from models.fusion.config import FusionConfig


class ConcatConvFusion(nn.Module):
    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(config.blip_width + config.sam_dim, config.width, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.out_proj = zero_linear(config.width, config.blip_width)

    def forward(self, blip_tokens: torch.Tensor, sam_embed: torch.Tensor, blip_mask: torch.Tensor | None = None,
                sam_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``blip_tokens [B, 1+P, C1]``, ``sam_embed [B, Cs, S, S]``, ``blip_mask [B, 1+P]`` bool
        (True = keep; a masked token is returned unchanged) -> fused ``[B, 1+P, C1]``.
        ``sam_mask`` is not supported here (there is no SAM token sequence)."""
        cfg = self.config
        check_inputs(cfg, blip_tokens, sam_embed)
        if sam_mask is not None:
            raise ValueError("concat_conv fusion takes no sam_mask (the SAM map is mixed per position)")
        b = blip_tokens.shape[0]
        blip_mask = check_mask(blip_mask, b, cfg.tokens, "blip_mask", blip_tokens.device)
        dtype = self.conv.weight.dtype
        patches = blip_tokens[:, 1:].to(dtype).transpose(1, 2).reshape(b, cfg.blip_width, cfg.grid, cfg.grid)
        sam = sam_to_grid(sam_embed.to(dtype), cfg.grid)
        mixed = F.gelu(self.conv(torch.cat([patches, sam], dim=1)))         # [B, width, g, g]
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), flatten_grid(mixed)], dim=1)  # [B, 1+P, width]
        return residual(blip_tokens, self.out_proj(tokens), blip_mask)
