"""Sizes and choices of a fusion module, as data (saved with the weights).

``FusionConfig`` is what a fusion file carries in its safetensors metadata; a loader compares
it with what the graph expects (BLIP width and grid, SAM channels) before building anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

MODES = ("concat_conv", "cross_attention", "difnet")
SAM_CLS = ("zero", "learned")
FORMULATIONS = ("gated", "reference")
CONFIG_VERSION = 1  # bump when a module's architecture changes for the same config


@dataclass(frozen=True)
class FusionConfig:
    """One fusion module.

    mode        concat_conv | cross_attention | difnet
    blip_width  C1: width of the BLIP ViT tokens ``[B, 1+P, C1]`` (64 tiny, 768 base, 1024 large)
    sam_dim     Cs: channels of the SAM embedding ``[B, Cs, S, S]`` (256 real, 32 tiny)
    grid        g: side of the BLIP patch grid (P = g*g; 24 for 384-px inputs)
    width       fusion width (conv output / attention width / DIFNet d_model)
    heads       attention heads (cross_attention, difnet); ``width % heads == 0``
    ffn_dim     DIFNet position-wise FFN width; 0 = 4 * width
    dropout     dropout of the sub-layer outputs (attention, FFN) during training
    sam_grid    cross_attention: SAM tokens are resized to ``sam_grid x sam_grid`` keys
    Lf, T, N    difnet: layers before fusion (each applied T times per stream), total layers (N > Lf)
    sam_cls     difnet: SAM stream's CLS slot: "zero" (masked out) or "learned" (a kept token)
    formulation difnet: "gated" (one residual + LayerNorm per sub-layer, per-stream LayerNorms,
                masked SAM tokens zeroed at the fusion) or "reference" (the published DIFNet
                encoder, layer for layer: models/fusion/difnet_reference.py)
    identity_map_reordering  difnet reference: the published pre-norm variant
    """

    mode: str
    blip_width: int
    sam_dim: int = 256
    grid: int = 24
    width: int = 256
    heads: int = 8
    ffn_dim: int = 0
    dropout: float = 0.0
    sam_grid: int = 16
    Lf: int = 1
    T: int = 2
    N: int = 3
    sam_cls: str = "zero"
    formulation: str = "gated"
    identity_map_reordering: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid fusion config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if self.mode not in MODES:
            out.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("blip_width", "sam_dim", "grid", "width", "heads", "sam_grid", "T", "N"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.ffn_dim, int) or self.ffn_dim < 0:
            out.append(f"ffn_dim must be >= 0 (0 = 4 * width), got {self.ffn_dim!r}")
        if not isinstance(self.Lf, int) or self.Lf < 0:
            out.append(f"Lf must be an integer >= 0, got {self.Lf!r}")
        if not out and self.width % self.heads:
            out.append(f"width {self.width} is not divisible by heads {self.heads}")
        if not out and self.N <= self.Lf:
            out.append(f"DIFNet needs N > Lf (the streams are fused at layer Lf, which must exist): "
                       f"got N={self.N}, Lf={self.Lf}")
        if not 0.0 <= float(self.dropout) < 1.0:
            out.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.formulation not in FORMULATIONS:
            out.append(f"formulation {self.formulation!r} is not one of {', '.join(FORMULATIONS)}")
        if self.identity_map_reordering and self.formulation != "reference":
            out.append("identity_map_reordering belongs to the reference DIFNet formulation")
        if self.sam_cls not in SAM_CLS:
            out.append(f"sam_cls {self.sam_cls!r} is not one of {', '.join(SAM_CLS)}")
        if self.version != CONFIG_VERSION:
            out.append(f"config version {self.version} is not supported (this code reads version {CONFIG_VERSION})")
        return out

    @property
    def tokens(self) -> int:
        """``1 + grid * grid``: BLIP tokens in and fused tokens out."""
        return 1 + self.grid * self.grid

    @property
    def ffn_width(self) -> int:
        return self.ffn_dim or 4 * self.width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fusion config fields: {', '.join(unknown)}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "FusionConfig":
        return cls.from_dict(json.loads(text))

    def mismatches(self, expected: "FusionConfig | Mapping[str, Any]") -> list[str]:
        """``'field: file X, expected Y'`` for every field of ``expected`` (a config, or a mapping
        of only the fields that matter) that differs from this one."""
        wanted = expected.to_dict() if isinstance(expected, FusionConfig) else dict(expected)
        own = self.to_dict()
        unknown = sorted(set(wanted) - set(own))
        if unknown:
            raise ValueError(f"unknown fusion config fields: {', '.join(unknown)}")
        return [f"{k}: file has {own[k]!r}, expected {v!r}" for k, v in wanted.items() if own[k] != v]
