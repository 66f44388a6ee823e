"""DIFNet multi-level encoder (Wu et al., CVPR 2022) fusing BLIP tokens with a SAM embedding.

Two streams of ``T = 1+P`` tokens at the fusion width ``d``:

    stream 1: blip_tokens [B, 1+P, C1] --Linear (if C1 != d)--> [B, 1+P, d]
    stream 2: sam_embed [B, Cs, S, S] --bilinear to g x g, flatten, Linear (if Cs != d)--> [B, P, d],
              a CLS slot prepended (zeros and masked out, or a learned kept token) -> [B, 1+P, d]

Layers ``0 .. N-1`` are post-norm transformer encoder layers (multi-head self-attention +
residual + LayerNorm, position-wise FFN (ReLU) + residual + LayerNorm):

    layers 0 .. Lf-1   each applied T times to each stream; the streams share the layer's
                       attention and FFN weights but have their own LayerNorms
    layer Lf           x1, x2 = the two streams; applied once to x1 + x2 (stream-1 LayerNorms)
    layers Lf+1 .. N-1 applied once each
    encoded = out + x1 + x2                                                      [B, 1+P, d]
    fused   = blip_tokens + out_proj(encoded)   (out_proj zero init)             [B, 1+P, C1]

Masks are explicit bool ``[B, 1+P]`` (True = keep), not the reference's ``sum(x) ==
padding_idx`` test, and act as key padding masks: a masked token is no key in any attention,
so changing it changes no other token. Stream-2 tokens that are masked (the zero CLS slot by
default) are zeroed before the sum, so they never reach the fused stream; the fused layers use
the stream-1 mask. The BLIP tokens masked out are returned unchanged.

This is the ``gated`` formulation. It differs from mrwu-mac/DIFNet's published encoder:
explicit masks (above); the published ``MultiHeadAttention`` applies its own residual +
LayerNorm (shared by both streams) and ``EncoderLayer`` another one on top (a double residual),
and masked SAM tokens are kept at the fusion; here each sub-layer has one residual and one
LayerNorm per stream, as the paper describes. ``formulation: reference`` runs the published
encoder instead (``difnet_reference.py``), with the same projections around it. The input
projections and the zero-initialised output projection are ours in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.fusion.common import (MultiHeadAttention, check_inputs, check_mask, flatten_grid, projection,
                                  residual, sam_to_grid, xavier_linear, zero_linear)
from models.fusion.config import FusionConfig
from models.fusion.difnet_reference import ReferenceEncoder, multi_level


class DifnetLayer(nn.Module):
    """One encoder layer with ``streams`` sets of LayerNorms: ``x [B, T, d]``, ``key_mask [B, T]``
    (True = keep), ``stream`` (which LayerNorms) -> ``[B, T, d]``."""

    def __init__(self, width: int, heads: int, ffn_dim: int, dropout: float, streams: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(width, heads, dropout=dropout)
        self.fc1 = xavier_linear(width, ffn_dim)
        self.fc2 = xavier_linear(ffn_dim, width)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(streams))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(streams))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, stream: int = 0) -> torch.Tensor:
        x = self.attn_norms[stream](x + self.attn(x, x, x, key_mask=key_mask))  # (attn has its dropout)
        ff = self.fc2(self.dropout(F.relu(self.fc1(x))))
        return self.ffn_norms[stream](x + self.dropout(ff))


@dataclass
class DifnetTrace:
    """Intermediate states of one :meth:`DifnetFusion.encode` call (all ``[B, 1+P, d]``).

    ``stream1[k]`` / ``stream2[k]``: the streams after the k-th layer application before the
    fusion (layer ``k // T``, repeat ``k % T``); ``x1`` / ``x2``: the streams entering layer
    ``Lf`` (``x2`` with its masked tokens zeroed); ``fused[j]``: output of layer ``Lf + j``;
    ``encoded = fused[-1] + x1 + x2``."""

    stream1: list[torch.Tensor] = field(default_factory=list)
    stream2: list[torch.Tensor] = field(default_factory=list)
    x1: torch.Tensor | None = None
    x2: torch.Tensor | None = None
    fused: list[torch.Tensor] = field(default_factory=list)
    encoded: torch.Tensor | None = None


class DifnetFusion(nn.Module):
    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.blip_in = projection(config.blip_width, d)
        self.sam_in = projection(config.sam_dim, d)
        if config.sam_cls == "learned":
            self.sam_cls = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.trunc_normal_(self.sam_cls, std=0.02)
        if config.formulation == "reference":
            self.encoder = ReferenceEncoder(config)
        else:
            self.layers = nn.ModuleList(
                DifnetLayer(d, config.heads, config.ffn_width, config.dropout, streams=2 if i < config.Lf else 1)
                for i in range(config.N))
        self.out_proj = zero_linear(d, config.blip_width)

    def streams(self, blip_tokens: torch.Tensor, sam_embed: torch.Tensor, blip_mask: torch.Tensor | None = None,
                sam_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two input streams ``s1, s2 [B, 1+P, d]`` and their masks ``m1, m2 [B, 1+P]``
        (given masks, the zero CLS slot of stream 2 masked out)."""
        cfg = self.config
        check_inputs(cfg, blip_tokens, sam_embed)
        b, device = blip_tokens.shape[0], blip_tokens.device
        m1 = check_mask(blip_mask, b, cfg.tokens, "blip_mask", device)
        m2 = check_mask(sam_mask, b, cfg.tokens, "sam_mask", device)
        m1 = torch.ones(b, cfg.tokens, dtype=torch.bool, device=device) if m1 is None else m1
        m2 = torch.ones(b, cfg.tokens, dtype=torch.bool, device=device) if m2 is None else m2
        dtype = self.out_proj.weight.dtype
        s1 = self.blip_in(blip_tokens.to(dtype))
        sam = self.sam_in(flatten_grid(sam_to_grid(sam_embed.to(dtype), cfg.grid)))
        if cfg.sam_cls == "learned":
            cls = self.sam_cls.to(sam.dtype).expand(b, -1, -1)
        else:
            cls = sam.new_zeros(b, 1, sam.shape[-1])
            m2 = m2.clone()
            m2[:, 0] = False
            if not bool(m2.any(dim=1).all()):
                raise ValueError("sam_mask leaves no SAM token in a row (the zero CLS slot is always masked)")
        return s1, torch.cat([cls, sam], dim=1), m1, m2

    def encode(self, s1: torch.Tensor, s2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor,
               trace: DifnetTrace | None = None) -> torch.Tensor:
        """The multi-level encoder on the streams of :meth:`streams` -> ``encoded [B, 1+P, d]``
        (``out + x1 + x2``). ``trace``: filled with the intermediate states."""
        if self.config.formulation == "reference":
            return self.encoder(s1, s2, m1, m2, trace)
        return multi_level(self.layers, self.config, s1, s2, m1, m2, trace, zero_masked_sam=True)

    def forward(self, blip_tokens: torch.Tensor, sam_embed: torch.Tensor, blip_mask: torch.Tensor | None = None,
                sam_mask: torch.Tensor | None = None, trace: DifnetTrace | None = None) -> torch.Tensor:
        """``blip_tokens [B, 1+P, C1]``, ``sam_embed [B, Cs, S, S]``; ``blip_mask`` / ``sam_mask``
        ``[B, 1+P]`` bool (True = keep; ``sam_mask`` indexes stream 2: CLS slot, then the g x g
        resampled SAM cells) -> fused ``[B, 1+P, C1]``; a masked BLIP token is returned unchanged."""
        s1, s2, m1, m2 = self.streams(blip_tokens, sam_embed, blip_mask, sam_mask)
        encoded = self.encode(s1, s2, m1, m2, trace)
        return residual(blip_tokens, self.out_proj(encoded), None if blip_mask is None else m1)
