"""EfficientSAM stages: the image embedding (once per image) and point-prompted masks
(per question, all prompts of a batch in one decoder call).

Torch and the model code are imported inside the methods: graphs without model stages (and
their Ray workers) never pay for importing torch.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from artifacts.columns import TensorSpec, tensor_type
from models.efficient_sam.checkpoint import EFFICIENT_SAM
from stages.base import STAGES, Batch, Granularity, Input, Output, Resources, StageParams
from stages.dtypes import DTYPE_DOC, DType, torch_dtype
from grids import pool_to_grid
from stages.model_stage import ModelStage

SamPreset = EFFICIENT_SAM.preset_type()
PRESET_DOC = EFFICIENT_SAM.preset_doc("EfficientSAM") + "; use the same preset on sam_embed and sam_mask"


def _embedding_type(preset: str) -> pa.DataType:
    cfg = EFFICIENT_SAM.config(preset)
    return tensor_type("float32", [cfg.embed_dim, cfg.embed_grid, cfg.embed_grid])


class SamEmbedParams(StageParams):
    preset: SamPreset = Field("tiny", description=PRESET_DOC)
    checkpoint: str | None = Field(None, description="explicit checkpoint file instead of the preset's")
    dtype: DType = Field("float32", description=DTYPE_DOC + "; the image encoder runs in it")


@STAGES.add
class SamEmbed(ModelStage):
    """EfficientSAM image embedding, computed once per image for all of its questions.

    The decoded image is resized (bilinear, aspect ratio not kept) to the encoder's square
    input and normalised with ImageNet mean / std on [0, 1] pixels, as EfficientSAM does.
    Not cached (4 MiB per image at the real size): it is recomputed in memory when needed.
    """

    name = "sam_embed"
    family = EFFICIENT_SAM
    Params = SamEmbedParams
    granularity = Granularity.IMAGE
    cacheable = False
    resources = Resources(gpu=0.5, batch_size=8)
    INPUTS = {"image": Input(TensorSpec("uint8", None, ndim=3), "decoded RGB image [H, W, 3] (load_image)")}

    def outputs(self) -> dict[str, Output]:
        return {"embedding": Output(_embedding_type(self.params.preset), "image embedding [256, 64, 64] (real sizes)")}

    def setup(self, device: str) -> None:
        super().setup(device)
        self.model.image_encoder.to(torch_dtype(self.params.dtype))

    def process(self, batch: Batch) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            pixels = self.model.preprocess(batch["image"], device=self.device)
            embedding = self.model.embed(pixels.to(torch_dtype(self.params.dtype)))
        return {"embedding": embedding.float().cpu().numpy()}


class SamMaskParams(StageParams):
    preset: SamPreset = Field("tiny", description=PRESET_DOC)
    checkpoint: str | None = Field(None, description="explicit checkpoint file instead of the preset's")
    mask_selection: Literal["best_iou", "first"] = Field(
        "best_iou", description="which of the 3 candidate masks to keep: the best predicted IoU (as the "
        "EfficientSAM example), or candidate 0 (as the seed code)")
    mask_threshold: float = Field(0.0, description="a pixel is on where the mask logit exceeds this (SAM: 0)")
    mask_size: int = Field(256, ge=8, le=2048, description="side of the square mask kept for inspection and "
                           "enhancement (the decoder's native low-res size is 256)")
    grid: int = Field(24, ge=1, le=256, description="side of mask_grid (the heatmap grid)")


@STAGES.add
class SamMask(ModelStage):
    """Point-prompted EfficientSAM mask for each question, from its heatmap's peak points.

    All questions of a batch go through one decoder call. Points are in image pixels with labels
    1 (foreground), 0 (background) and -1 (padding). Rows without any point get an empty mask
    and a null IoU (the enhancement then keeps the heatmap).
    """

    name = "sam_mask"
    family = EFFICIENT_SAM
    Params = SamMaskParams
    resources = Resources(gpu=0.25, batch_size=64)

    def inputs(self) -> dict[str, Input]:
        return {
            "embedding": Input(_embedding_type(self.params.preset), "image embedding (sam_embed)", per_image=True),
            "points": Input(TensorSpec("float32", ("k", 2)), "prompt points (x, y) in image pixels [K, 2]"),
            "labels": Input(TensorSpec("int32", ("k",)), "1 foreground, 0 background, -1 padding [K]"),
            "image_size": Input(tensor_type("int32", [2]), "image (height, width) (load_image.size)"),
        }

    def outputs(self) -> dict[str, Output]:
        v, g = self.params.mask_size, self.params.grid
        return {
            "mask": Output(tensor_type("uint8", [v, v]), f"chosen mask [{v}, {v}] over the whole image (1 = on)",
                           role="mask"),
            "mask_grid": Output(tensor_type("float32", [g, g]), f"fraction of each of {g}x{g} cells covered"),
            "iou": Output(pa.float32(), "predicted IoU of the chosen mask (null without points)"),
            "candidate_iou": Output(tensor_type("float32", [3]), "predicted IoU of the 3 candidates"),
            "mask_index": Output(pa.int32(), "chosen candidate (0..2), -1 without points"),
        }

    def process(self, batch: Batch) -> dict[str, Any]:
        import torch

        p, device = self.params, self.device
        n = len(batch)
        labels = batch["labels"].astype(np.int64)
        has_points = (labels >= 0).any(axis=1)
        # points go to the square encoder frame per row, so images of any size share one decoder call
        side = self.model.config.image_size
        height, width = batch["image_size"][:, 0].astype(np.float32), batch["image_size"][:, 1].astype(np.float32)
        points = batch["points"] * np.stack([side / width, side / height], axis=1)[:, None, :]
        embeddings = torch.from_numpy(batch["embedding"]).to(device)[torch.from_numpy(batch.image_rows).to(device)]
        with torch.no_grad():
            logits, iou = self.model.predict_masks(
                embeddings, torch.from_numpy(points.astype(np.float32)).to(device)[:, None],
                torch.from_numpy(labels).to(device)[:, None], input_size=(side, side),
                output_size=(p.mask_size, p.mask_size))
        logits, iou = logits[:, 0].float().cpu().numpy(), iou[:, 0].float().cpu().numpy()  # [N, 3, V, V], [N, 3]
        index = iou.argmax(axis=1) if p.mask_selection == "best_iou" else np.zeros(n, dtype=np.int64)
        chosen = logits[np.arange(n), index] > p.mask_threshold
        chosen[~has_points] = False
        return {
            "mask": chosen.astype(np.uint8),
            "mask_grid": pool_to_grid(chosen, p.grid),
            "iou": [float(iou[i, index[i]]) if has_points[i] else None for i in range(n)],
            "candidate_iou": iou.astype(np.float32),
            "mask_index": np.where(has_points, index, -1).astype(np.int32),
        }
