"""The published DIFNet encoder (mrwu-mac/DIFNet ``models/difnet/encoders.py``,
``attention.py``, ``utils.py``), reproduced layer for layer: ``formulation: reference``.

What the published encoder does, and the gated formulation (``difnet.py``) does not:

- the attention sub-layer is wrapped twice: ``MultiHeadAttention`` adds its own residual and
  LayerNorm (``mhatt.layer_norm``), then ``EncoderLayer`` adds a second residual with a
  per-stream LayerNorm (``lnorm`` for the BLIP stream, ``lnorm1`` for the SAM stream);
- that inner LayerNorm is the same for both streams (the stream index never reaches
  ``MultiHeadAttention``; ``mhatt.layer_norm1`` is declared and never used); the feed-forward's
  LayerNorm is per stream (``pwff.layer_norm`` / ``pwff.layer_norm1``);
- ``identity_map_reordering=True`` turns both sub-layers pre-norm, with a ReLU on the sub-layer
  output: ``x + relu(attention(norm(x)))`` (keys and values normalised too) and
  ``x + relu(ffn(norm(x)))``; the outer ``lnorm`` / ``lnorm1`` stay;
- masked (padded) tokens of the SAM stream are kept when the streams are summed (``x2 = out1``).

Parameter names are the published ones (``layers.N.mhatt.attention.fc_q`` ...), so the
encoder part of a published checkpoint loads unchanged (``load_reference_encoder``). Masks are
explicit (True = keep); the published code derives them from ``sum(features) == padding_idx``.
Dropout sits where the published code has it (identity in eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fusion.config import FusionConfig


class ReferenceAttention(nn.Module):
    """``fc_q / fc_k / fc_v / fc_o`` scaled dot-product attention: ``x [B, T, d]`` queries,
    ``keys``/``values [B, S, d]``, ``key_mask [B, S]`` (True = attend) -> ``[B, T, d]``."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.fc_q, self.fc_k = nn.Linear(width, width), nn.Linear(width, width)
        self.fc_v, self.fc_o = nn.Linear(width, width), nn.Linear(width, width)
        for layer in (self.fc_q, self.fc_k, self.fc_v, self.fc_o):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, queries, keys, values, key_mask):
        b, t, _ = queries.shape
        s = keys.shape[1]
        q = self.fc_q(queries).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.fc_k(keys).view(b, s, self.heads, -1).transpose(1, 2)
        v = self.fc_v(values).view(b, s, self.heads, -1).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.fc_o(out.transpose(1, 2).reshape(b, t, -1))


class ReferenceMultiHead(nn.Module):
    """``mhatt``: the attention with its own residual and LayerNorm (one for both streams)."""

    def __init__(self, width: int, heads: int, dropout: float, reorder: bool) -> None:
        super().__init__()
        self.attention = ReferenceAttention(width, heads, dropout)
        self.layer_norm = nn.LayerNorm(width)
        self.layer_norm1 = nn.LayerNorm(width)  # in the published layout; never used there either
        self.dropout, self.reorder = nn.Dropout(dropout), reorder

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if self.reorder:
            n = self.layer_norm(x)
            return x + self.dropout(torch.relu(self.attention(n, n, n, key_mask)))
        return self.layer_norm(x + self.dropout(self.attention(x, x, x, key_mask)))


class ReferenceFeedForward(nn.Module):
    """``pwff``: ReLU feed-forward with a per-stream LayerNorm."""

    def __init__(self, width: int, hidden: int, dropout: float, reorder: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.layer_norm, self.layer_norm1 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout, self.dropout_2, self.reorder = nn.Dropout(dropout), nn.Dropout(dropout), reorder

    def forward(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        norm = self.layer_norm if stream == 0 else self.layer_norm1
        if self.reorder:
            out = self.fc2(self.dropout_2(F.relu(self.fc1(norm(x)))))
            return x + self.dropout(torch.relu(out))
        return norm(x + self.dropout(self.fc2(self.dropout_2(F.relu(self.fc1(x))))))


class ReferenceEncoderLayer(nn.Module):
    """One published ``EncoderLayer``: ``x [B, T, d]``, ``key_mask [B, T]``, ``stream`` (0: BLIP
    LayerNorms ``lnorm`` / ``pwff.layer_norm``; 1: SAM ``lnorm1`` / ``pwff.layer_norm1``)."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float, reorder: bool) -> None:
        super().__init__()
        self.mhatt = ReferenceMultiHead(width, heads, dropout, reorder)
        self.lnorm, self.lnorm1 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.pwff = ReferenceFeedForward(width, hidden, dropout, reorder)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, stream: int = 0) -> torch.Tensor:
        att = self.mhatt(x, key_mask)
        att = (self.lnorm if stream == 0 else self.lnorm1)(x + self.dropout(att))  # the second residual
        return self.pwff(att, stream)


class ReferenceEncoder(nn.Module):
    """The published ``MultiLevelEncoder`` on two streams ``s1, s2 [B, T, d]`` with masks
    ``m1, m2 [B, T]`` -> ``out + x1 + x2`` (``x2`` unmasked, as published)."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            ReferenceEncoderLayer(config.width, config.heads, config.ffn_width, config.dropout,
                                  config.identity_map_reordering) for _ in range(config.N))

    def forward(self, s1, s2, m1, m2, trace=None) -> torch.Tensor:
        return multi_level(self.layers, self.config, s1, s2, m1, m2, trace, zero_masked_sam=False)


def multi_level(layers, cfg: FusionConfig, s1, s2, m1, m2, trace=None, zero_masked_sam: bool = False) -> torch.Tensor:
    """DIFNet's multi-level control flow, shared by both formulations: layers ``0 .. Lf-1``
    applied ``T`` times to each stream (``layer(x, key_mask, stream)``), the streams summed at
    layer ``Lf`` (``x1``, ``x2`` = the streams before the sum; with ``zero_masked_sam`` the masked
    SAM tokens are zeroed first), the remaining layers once, ``out + x1 + x2``."""
    k1 = None if bool(m1.all()) else m1  # no mask: the faster attention kernels
    k2 = None if bool(m2.all()) else m2
    out, out2, x1, x2 = s1, s2, None, None
    for i, layer in enumerate(layers):
        if i < cfg.Lf:
            for _ in range(cfg.T):
                out, out2 = layer(out, k1, 0), layer(out2, k2, 1)
                if trace is not None:
                    trace.stream1.append(out)
                    trace.stream2.append(out2)
            continue
        if i == cfg.Lf:
            x1, x2 = out, (out2 * m2[..., None].to(out2.dtype) if zero_masked_sam else out2)
            out = x1 + x2
        out = layer(out, k1, 0)
        if trace is not None:
            trace.fused.append(out)
    encoded = out + x1 + x2
    if trace is not None:
        trace.x1, trace.x2, trace.encoded = x1, x2, encoded
    return encoded
