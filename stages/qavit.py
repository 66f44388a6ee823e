"""QA-ViT attention heatmaps: the question steers a CLIP ViT, whose CLS-to-patch attention is the
question-guided heatmap (an alternative to BLIP ITM GradCAM for patch sampling and captioning).

The image is preprocessed once per image (``per_image`` input) but encoded once per question,
since the question changes the ViT from its first instruction layer on; the layers before that
(none with ``all`` / ``early`` / ``sparse``, the first half with ``late``) run once per image.

Presets and the ``pixels`` they need (``preprocess_image`` family ``clip`` at ``image_size``):
``tiny`` 112 (random weights, 8x8 grid), ``shapes`` 168 (trained by ``runtime train qavit`` on the
shapes data, bundled; 12x12 grid), ``l14_336`` 336 (the published QA-ViT; 24x24 grid). The
``shapes`` weights were trained with a grounding loss on the heatmap this stage reads (``mode``
layer, ``block_num`` -1): its heatmap quality on shapes is supervised, not emergent.

Torch and the model code are imported inside the methods: graphs without model stages (and their
Ray workers) never pay for importing torch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from artifacts.columns import tensor_type
from models.qavit.checkpoint import QAVIT
from models.qavit.config import INTEGRATION_POINTS
from stages.base import STAGES, Batch, Input, Output, Resources, StageParams
from stages.common import nullable
from grids import cell_weights
from stages.model_stage import ModelStage

Preset = QAVIT.preset_type()
IntegrationPoint = Literal[INTEGRATION_POINTS]


# --- heatmap post-processing (numpy, batched) ---------------------------------------------------

def bilinear_weights(n: int, g: int) -> np.ndarray:
    """``[g, n]`` weights of bilinear resampling of ``n`` cells to ``g`` with half-cell centres
    (``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``; edges clamped)."""
    src = np.maximum((np.arange(g) + 0.5) * (n / g) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = src - lo
    w = np.zeros((g, n))
    np.add.at(w, (np.arange(g), lo), 1.0 - frac)
    np.add.at(w, (np.arange(g), hi), frac)
    return w


def resample_heatmaps(maps: np.ndarray, g: int, method: Literal["bilinear", "area"] = "bilinear") -> np.ndarray:
    """``[N, h, w]`` maps -> ``[N, g, g]`` float32. ``bilinear``: half-cell-centre bilinear
    (smooth when upsampling 8 -> 24); ``area``: exact area average (each output cell is the mean of
    the input area it covers: blocks when upsampling, box averages when downsampling; keeps the
    mean). Equal sizes are returned unchanged (a copy)."""
    maps = np.asarray(maps)
    n, h, w = maps.shape
    if (h, w) == (g, g):
        return maps.astype(np.float32, copy=True)
    if method not in ("bilinear", "area"):
        raise ValueError(f"unknown resampling {method!r}; choose bilinear or area")
    weights = bilinear_weights if method == "bilinear" else cell_weights
    rows, cols = weights(h, g), weights(w, g)
    return np.einsum("gh,nhw,kw->ngk", rows, maps.astype(np.float64), cols).astype(np.float32)


def heatmap_statistics(maps: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """Per map of ``[N, g, g]``: ``mean``, ``std``, ``max`` of the values; ``entropy`` (natural
    log) of the map normalised to sum 1 (negative cells count as 0; NaN when nothing is positive;
    a uniform map of P cells gives log P); ``top_patches`` the ``top_k`` cells in decreasing
    order (ties by index), as indices into the flattened grid."""
    n = len(maps)
    flat = np.asarray(maps, dtype=np.float64).reshape(n, -1)
    positive = np.clip(flat, 0, None)
    mass = positive.sum(axis=1, keepdims=True)
    p = positive / np.where(mass > 0, mass, 1.0)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = np.where(mass[:, 0] > 0, -plogp.sum(axis=1), np.nan)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :top_k]
    return {"mean": flat.mean(axis=1).astype(np.float32), "std": flat.std(axis=1).astype(np.float32),
            "max": flat.max(axis=1).astype(np.float32), "entropy": entropy.astype(np.float32),
            "top_patches": order.astype(np.int32)}


def map_layers(layers: tuple[int, ...] | list[int], depth: int, layers_depth: int | None) -> list[int]:
    """Layer indices of a ``depth``-layer ViT for ``layers`` given for a ``layers_depth``-layer one
    (layer ``i`` ends at the fraction ``(i + 1) / layers_depth`` of the stack; the layer that ends
    nearest to it is taken: [3, 7, 11] of 12 is [7, 15, 23] of 24 and [0, 2, 3] of 4).
    ``layers_depth=None``: the indices are the model's own (negative counts from the end).
    Sorted, without duplicates."""
    if layers_depth is None:
        return sorted({i % depth for i in layers})
    return sorted({max(0, math.floor((i + 1) * depth / layers_depth + 0.5) - 1) for i in layers})


# --- the stage -----------------------------------------------------------------------------------

class QAViTAttentionParams(StageParams):
    preset: Preset = Field("tiny", description=QAVIT.preset_doc("QA-ViT"))
    checkpoint: str | None = Field(None, description="vision weights instead of the preset's (qavit-base2.pth; "
                                   "shapes: models/assets/shapes/qavit.safetensors, or any qavit.safetensors of "
                                   "runtime train qavit): a "
                                   "QA-ViT / VisualT5 checkpoint (prefixes stripped), or plain CLIP weights (a "
                                   "Hugging Face folder such as clip-vit-large-patch14-336 or "
                                   "hf:openai/clip-vit-large-patch14-336 from the local Hugging Face cache, or a "
                                   "vision_model.* state dict) whose instruction modules then start at identity")
    question_encoder: str | None = Field(None, description="Hugging Face T5 folder of the question encoder "
                                         "instead of the preset's (l14_336: flan-t5-base in the weights folder), or "
                                         "hf:google/flan-t5-base from the local Hugging Face cache")
    integration_point: IntegrationPoint | None = Field(
        None, description="layers that read the question: all, early (first half), late (second half), late2 "
        "(last quarter), late3 (all but the first quarter), sparse (even layers); None = the checkpoint's, or "
        "late (the published setting)")
    formulation: Literal["auto", "reference", "gated"] = Field(
        "auto", description="instruction attention: reference (the published computation), gated (the "
        "instruction keys reach the output only through the gated projection: the plain ViT at gate 0); auto = "
        "the one a runtime train qavit file records (shapes: gated), else reference for QA-ViT weights, gated for "
        "tiny / plain CLIP")
    mode: Literal["layer", "layers", "rollout"] = Field(
        "layer", description="heatmap: CLS-to-patch attention of block_num (layer), its mean over `layers` "
        "(layers), or the CLS row of the attention rollout of layers 0..block_num (rollout)")
    block_num: int = Field(-1, description="ViT layer of mode layer / last layer of mode rollout; negative counts "
                           "from the end (-1 = the last layer, whose output QA-ViT feeds the language model)")
    layers: tuple[int, ...] = Field((3, 7, 11), min_length=1, description="layers averaged in mode layers, "
                                    "indices of a layers_depth-layer ViT")
    layers_depth: int | None = Field(12, ge=1, description="depth the `layers` indices refer to; they are mapped "
                                     "to the same relative depth of the model ([3, 7, 11] of 12 = [7, 15, 23] of "
                                     "24); None = the model's own indices")
    output_grid: int = Field(24, ge=1, le=256, description="side of `heatmap` (the captioner's grid: 24 for BLIP "
                             "at 384 px); the model grid is resampled unless equal")
    resample: Literal["bilinear", "area"] = Field("bilinear", description="grid resampling: bilinear (half-cell "
                                                  "centres, smooth) or area (exact area average)")
    top_k: int = Field(10, ge=1, description="cells listed in top_patches")
    max_question_tokens: int = Field(30, ge=2, le=512, description="question tokens kept (the reference: 30)")


@STAGES.add
class QAViTAttention(ModelStage):
    """Question-guided heatmap from QA-ViT: CLS-to-patch attention of a question-aware CLIP ViT.

    The question is encoded by a T5 encoder and injected as extra keys / values into the
    instruction layers' self-attention (padding masked). The heatmap is the CLS row of the
    head-averaged image attention (softmax over image keys) at ``block_num``, or its mean over
    several layers, or the attention rollout (Abnar & Zuidema: ``0.5 A + 0.5 I`` per layer,
    multiplied from the first layer to ``block_num``); ``native_heatmap`` is at the model's grid,
    ``heatmap`` resampled to ``output_grid``, and the statistics are those of ``heatmap``.
    """

    name = "qavit_attention"
    Params = QAViTAttentionParams
    family = QAVIT
    resources = Resources(gpu=0.5, batch_size=32)

    def weights_options(self) -> dict[str, Any]:
        p = self.params
        return {"question_encoder": p.question_encoder, "integration_point": p.integration_point,
                "formulation": p.formulation}

    def inputs(self) -> dict[str, Input]:
        s = self.model_config().image_size
        return {"pixels": Input(tensor_type("float32", [3, s, s]),
                                f"preprocessed image [3, {s}, {s}] (preprocess_image, family clip, image_size {s})",
                                per_image=True),
                "question": Input(pa.string(), "question text")}

    def outputs(self) -> dict[str, Output]:
        g, k, native = self.params.output_grid, self.params.top_k, self.model_config().grid
        return {
            "heatmap": Output(tensor_type("float32", [g, g]), f"CLS-to-patch attention [{g}, {g}] (head mean, "
                              "resampled to output_grid; not normalised)", role="heatmap"),
            "native_heatmap": Output(tensor_type("float32", [native, native]),
                                     f"the heatmap at the model's grid [{native}, {native}]"),
            "mean": Output(pa.float32(), "mean of heatmap"),
            "std": Output(pa.float32(), "standard deviation of heatmap"),
            "max": Output(pa.float32(), "maximum of heatmap"),
            "entropy": Output(pa.float32(), "entropy (nats) of heatmap normalised to sum 1 (log of the cell "
                              "count when uniform)"),
            "top_patches": Output(tensor_type("int32", [k]), f"the {k} highest cells of heatmap, best first "
                                  "(indices into the flattened output grid)"),
        }

    def selected_layers(self) -> list[int]:
        """The layers whose attention the heatmap needs (0-based, ascending)."""
        p, depth = self.params, self.model_config().depth
        if p.mode == "layers":
            return map_layers(p.layers, depth, p.layers_depth)
        block = p.block_num % depth
        return [block] if p.mode == "layer" else list(range(block + 1))

    def extra_problems(self) -> list[tuple[str, str]]:
        p, depth = self.params, self.model_config().depth
        out = []
        if p.mode != "layers" and not -depth <= p.block_num < depth:
            out.append(("block_num", f"block_num={p.block_num} but the '{p.preset}' ViT has {depth} layers: use "
                        f"0..{depth - 1} or -{depth}..-1"))
        if p.mode == "layers":
            limit = depth if p.layers_depth is None else p.layers_depth
            bad = [i for i in p.layers if not (-limit <= i < limit if p.layers_depth is None else 0 <= i < limit)]
            if bad:
                out.append(("layers", f"layers {bad} out of range for {limit} layers"
                            + (" (layers_depth)" if p.layers_depth is not None else f" (the '{p.preset}' ViT)")))
        if p.top_k > p.output_grid ** 2:
            out.append(("top_k", f"top_k={p.top_k} exceeds the {p.output_grid ** 2} cells of the output grid"))
        return out

    def native_heatmaps(self, pixels: np.ndarray, questions: list[str], image_rows: np.ndarray) -> np.ndarray:
        """``[B, grid, grid]`` heatmaps at the model grid for ``questions`` on ``pixels[image_rows]``."""
        import torch

        from models.qavit.maps import cls_to_patches, rollout_row

        p, device, cfg = self.params, self.device, self.model_config()
        layers = self.selected_layers()
        enc = self.tokenizer(questions, padding="longest", truncation=True, max_length=p.max_question_tokens,
                             return_tensors="pt")
        with torch.no_grad():
            states, mask = self.model.encode_question(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            out = self.model(torch.from_numpy(pixels).to(device), states, mask, output_attentions=layers,
                             mean_heads=True, image_rows=torch.from_numpy(np.asarray(image_rows)).to(device))
            maps = [out.attentions[i] for i in layers]
            if p.mode == "rollout":
                heat = rollout_row(maps)[:, 1:]
            else:
                heat = torch.stack([cls_to_patches(a) for a in maps]).mean(dim=0)
        return heat.float().cpu().numpy().reshape(len(questions), cfg.grid, cfg.grid)

    def process(self, batch: Batch) -> dict[str, Any]:
        p = self.params
        questions = [q if isinstance(q, str) else "" for q in batch["question"]]
        for i, q in enumerate(questions):
            if not q.strip():
                batch.fail(i, "empty question")
        image_rows = batch.image_rows if batch.image_rows is not None else np.arange(len(batch))
        native = self.native_heatmaps(batch["pixels"], questions, image_rows)
        heatmap = resample_heatmaps(native, p.output_grid, p.resample)
        stats = heatmap_statistics(heatmap, p.top_k)
        return {"heatmap": heatmap, "native_heatmap": native.astype(np.float32),
                "mean": stats["mean"], "std": stats["std"], "max": stats["max"],
                "entropy": nullable(stats["entropy"], np.isfinite(stats["entropy"])),
                "top_patches": stats["top_patches"]}
