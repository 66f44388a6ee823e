"""BLIP + SAM feature fusion: BLIP ViT tokens enriched with the EfficientSAM embedding
(concat-conv, cross-attention or DIFNet multi-level encoder).

Untrained, every mode returns the BLIP tokens unchanged (zero-initialised output projection),
so a graph with fusion gives the answers of the graph without it until the fusion is trained
(`runtime train fusion`; `weights: shapes` names the bundled file of the mode, trained for the
``shapes`` BLIP and EfficientSAM presets). Models and torch are imported inside the methods.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from artifacts.columns import TensorSpec
from stages.base import STAGES, Batch, Granularity, Input, Output, Resources, Stage, StageParams

SHAPES = "shapes"  # the `weights` value naming the bundled file of the node's mode
SHAPES_TRAIN_COMMAND = "bin/train-shapes fusion"


class FeatureFusionParams(StageParams):
    mode: Literal["concat_conv", "cross_attention", "difnet"] = Field(
        "concat_conv", description="concat_conv: SAM resized to the BLIP grid, channels concatenated, 1x1 conv; "
        "cross_attention: BLIP tokens query SAM tokens; difnet: DIFNet two-stream multi-level encoder")
    weights: str | None = Field(None, description="trained fusion weights: a fusion.safetensors written by `runtime "
                                "train fusion`, or `shapes` = the bundled "
                                "models/assets/shapes/fusion_<mode>.safetensors of this node's mode, trained for the "
                                "shapes BLIP and EfficientSAM presets (`bin/train-shapes fusion`); none = untrained, "
                                "i.e. the BLIP tokens unchanged")
    width: int = Field(256, ge=1, description="fusion width (untrained modules; a weights file brings its own)")
    heads: int = Field(8, ge=1, description="attention heads (cross_attention, difnet)")
    sam_grid: int = Field(16, ge=1, description="cross_attention: SAM tokens resized to this grid of keys")
    Lf: int = Field(1, ge=0, description="difnet: layers before the streams are fused (each applied T times)")
    T: int = Field(2, ge=1, description="difnet: repetitions of each pre-fusion layer per stream")
    N: int = Field(3, ge=1, description="difnet: total layers (N > Lf)")
    formulation: Literal["gated", "reference"] = Field(
        "gated", description="difnet (untrained modules; a weights file brings its own): gated = one residual and "
        "LayerNorm per sub-layer, per-stream LayerNorms; reference = the published DIFNet encoder layer for layer "
        "(double residual, shared attention LayerNorm, padded SAM tokens kept)")
    identity_map_reordering: bool = Field(False, description="difnet reference: the published pre-norm variant")


@STAGES.add
class FeatureFusion(Stage):
    """Fuse BLIP ViT tokens ``[1+P, C]`` with the SAM embedding ``[Cs, S, S]`` of the same image."""

    name = "feature_fusion"
    Params = FeatureFusionParams
    granularity = Granularity.IMAGE
    cacheable = False
    resources = Resources(gpu=0.25, batch_size=16)
    INPUTS = {
        "features": Input(TensorSpec("float32", ("t", "c")), "BLIP ViT tokens [1+P, C] (blip_features)"),
        "embedding": Input(TensorSpec("float32", ("d", "s", "s")), "SAM image embedding [Cs, S, S] (sam_embed)"),
    }
    OUTPUTS = {"features": Output(TensorSpec("float32", ("t", "c")), "fused tokens [1+P, C], same layout as the input")}

    def _weights_path(self):
        """The fusion file ``weights`` names (``shapes``: the bundled file of ``mode``); a
        ``WeightsError`` when the bundled file is missing. ``None`` when untrained."""
        from pathlib import Path

        from models.weights import shapes_weights

        p = self.params
        if not p.weights:
            return None
        if p.weights == SHAPES:
            return shapes_weights(f"fusion_{p.mode}.safetensors", SHAPES_TRAIN_COMMAND)
        return Path(p.weights)

    def _config(self, blip_width: int, grid: int, sam_dim: int):
        from models.fusion.checkpoint import read_fusion_config
        from models.fusion.config import FusionConfig

        p = self.params
        if p.weights:
            return read_fusion_config(self._weights_path())
        return FusionConfig(mode=p.mode, blip_width=blip_width, sam_dim=sam_dim, grid=grid, width=p.width,
                            heads=p.heads, sam_grid=p.sam_grid, Lf=p.Lf, T=p.T, N=p.N,
                            formulation=p.formulation if p.mode == "difnet" else "gated",
                            identity_map_reordering=p.identity_map_reordering)

    def problems(self) -> list[tuple[str, str]]:
        from models.fusion.checkpoint import read_fusion_config
        from models.weights import WeightsError

        p = self.params
        if p.weights:
            try:
                path = self._weights_path()
                config = read_fusion_config(path)
            except WeightsError as exc:
                return [("weights", str(exc))]
            if config.mode != p.mode:
                return [("mode", f"the weights {path} are a {config.mode} module: set mode: {config.mode}")]
            return []
        if p.mode == "difnet" and p.N <= p.Lf:
            return [("N", f"DIFNet needs N > Lf (the streams are fused at layer Lf): got N={p.N}, Lf={p.Lf}")]
        if p.identity_map_reordering and (p.mode != "difnet" or p.formulation != "reference"):
            return [("identity_map_reordering", "it belongs to mode: difnet with formulation: reference")]
        if p.width % p.heads:
            return [("heads", f"width {p.width} is not divisible by heads {p.heads}")]
        return []

    def binding_problems(self, dims: dict[str, int]) -> list[tuple[str, str]]:
        if not {"t", "c", "d"} <= set(dims):  # an input is not wired: reported as such
            return []
        grid = math.isqrt(dims["t"] - 1)
        if grid * grid != dims["t"] - 1:
            return [("inputs.features", f"{dims['t']} tokens are not a CLS token plus a square patch grid")]
        if not self.params.weights:
            return []
        from models.weights import WeightsError

        try:
            config = self._config(dims["c"], grid, dims["d"])
        except WeightsError:
            return []  # reported by problems()
        wrong = config.mismatches({"blip_width": dims["c"], "grid": grid, "sam_dim": dims["d"]})
        if wrong:
            return [("weights", f"{self._weights_path()} was trained for other models: {'; '.join(wrong)}")]
        from models.fusion.checkpoint import fusion_file_problems

        broken = fusion_file_problems(self._weights_path(), config)
        if broken:
            return [("weights", f"{self._weights_path()} does not fit the {config.mode} module its own config "
                     f"describes: {'; '.join(broken[:5])}{'; ...' if len(broken) > 5 else ''} (a damaged or "
                     "hand-edited file: train it again with `runtime train fusion`)")]
        return []

    def weights_fingerprint(self) -> str | None:
        from models.fusion.checkpoint import fusion_fingerprint

        p = self.params
        # untrained = identity: the params say it all
        return fusion_fingerprint(self._weights_path()) if p.weights else None

    def setup(self, device: str) -> None:
        super().setup(device)
        self.module = None  # built on the first batch, when the token and SAM sizes are known

    def _build(self, blip_width: int, grid: int, sam_dim: int):
        import torch

        from models.fusion.checkpoint import build_fusion, load_fusion

        if self.params.weights:
            expected = {"blip_width": blip_width, "grid": grid, "sam_dim": sam_dim}
            module, _ = load_fusion(self._weights_path(), expected, self.device)
            return module
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same untrained module in every worker
            module = build_fusion(self._config(blip_width, grid, sam_dim))
        return module.to(self.device).eval()

    def process(self, batch: Batch) -> dict[str, Any]:
        import torch

        tokens = torch.from_numpy(batch["features"]).to(self.device)
        sam = torch.from_numpy(batch["embedding"]).to(self.device)
        if self.module is None:
            self.module = self._build(tokens.shape[-1], math.isqrt(tokens.shape[1] - 1), sam.shape[1])
        with torch.no_grad():
            fused = self.module(tokens, sam)
        return {"features": fused.float().cpu().numpy()}
