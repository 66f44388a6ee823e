"""Cross-attention fusion: every BLIP token queries the SAM embedding.

    sam_embed [B, Cs, S, S] --bilinear--> [B, Cs, Gs, Gs] --flatten, LayerNorm--> kv [B, Gs*Gs, Cs]
    blip_tokens [B, 1+P, C1] --LayerNorm--> queries [B, 1+P, C1]
    attention (heads, width; keys get a learned position embedding [1, Gs*Gs, width])
        --out_proj (zero init)--> delta [B, 1+P, C1]
    fused = blip_tokens + delta                                                  [B, 1+P, C1]

``Gs = config.sam_grid`` bounds the cost (the real SAM grid is 64x64 = 4096 tokens; 16x16 = 256
keys by default). A BLIP token only reads SAM keys, never other BLIP tokens, so a masked BLIP
token changes nothing else; masked SAM keys (``sam_mask``) are ignored by every query.
"""

from __future__ import annotations

import torch
from torch import nn

from models.fusion.common import (MultiHeadAttention, check_inputs, check_mask, flatten_grid, residual,
                                  sam_to_grid, zero_linear)
from models.fusion.config import FusionConfig


class CrossAttentionFusion(nn.Module):
    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.query_norm = nn.LayerNorm(config.blip_width)
        self.query_proj = nn.Linear(config.blip_width, config.width)
        self.sam_norm = nn.LayerNorm(config.sam_dim)
        self.key_pos = nn.Parameter(torch.zeros(1, config.sam_grid * config.sam_grid, config.width))
        nn.init.trunc_normal_(self.key_pos, std=0.02)
        self.attn = MultiHeadAttention(config.width, config.heads, kv_dim=config.sam_dim, dropout=config.dropout)
        self.out_proj = zero_linear(config.width, config.blip_width)

    def forward(self, blip_tokens: torch.Tensor, sam_embed: torch.Tensor, blip_mask: torch.Tensor | None = None,
                sam_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``blip_tokens [B, 1+P, C1]``, ``sam_embed [B, Cs, S, S]``; ``blip_mask [B, 1+P]`` bool
        (True = keep; a masked token is returned unchanged), ``sam_mask [B, Gs*Gs]`` bool (True =
        a key to attend to, on the resized ``Gs x Gs`` grid) -> fused ``[B, 1+P, C1]``."""
        cfg = self.config
        check_inputs(cfg, blip_tokens, sam_embed)
        b = blip_tokens.shape[0]
        blip_mask = check_mask(blip_mask, b, cfg.tokens, "blip_mask", blip_tokens.device)
        sam_mask = check_mask(sam_mask, b, cfg.sam_grid ** 2, "sam_mask", blip_tokens.device)
        dtype = self.query_proj.weight.dtype
        kv = self.sam_norm(flatten_grid(sam_to_grid(sam_embed.to(dtype), cfg.sam_grid)))   # [B, Gs*Gs, Cs]
        queries = self.query_proj(self.query_norm(blip_tokens.to(dtype)))                   # [B, 1+P, width]
        attended = self.attn(queries, kv, kv, key_mask=sam_mask, key_bias=self.key_pos)     # [B, 1+P, width]
        return residual(blip_tokens, self.out_proj(attended), blip_mask)
