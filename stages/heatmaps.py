"""Heatmap stages: oracle maps from masks, peak points for SAM, mask enhancement, quality
metrics and heatmap-guided patch sampling for the captioner.

Heatmaps are ``float32[g, g]`` grids over the image; masks are ``uint8[H, W]`` at any
resolution (nonzero = on) and are pooled to the grid by exact area fraction.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from artifacts.columns import TensorSpec, tensor_type
from stages.base import STAGES, Batch, Input, Output, Resources, Stage, StageParams
from stages.common import nullable, optional_column, row_rng
from grids import gaussian_blur, minmax, pool_to_grid, sample_patch_sets

HEATMAP = TensorSpec("float32", ("g", "g"))
MASK = TensorSpec("uint8", (None, None))


class MaskHeatmapParams(StageParams):
    grid: int = Field(24, ge=1, le=256, description="heatmap side g in cells")
    sigma: float = Field(1.0, ge=0, le=16, description="Gaussian blur sigma in cells (0 = none)")
    if_missing: Literal["uniform", "fail"] = Field(
        "uniform", description="rows without a mask (the question refers to no object): "
        "'uniform' gives a flat map of ones, 'fail' makes the row an error")


@STAGES.add
class MaskHeatmap(Stage):
    """Oracle heatmap from a ground-truth mask, for tests and demos.

    The mask is pooled to ``grid x grid`` by area fraction, blurred and min-max normalised
    to [0, 1]. Rows without a mask get a flat map (or fail, with ``if_missing: fail``).
    """

    name = "mask_heatmap"
    Params = MaskHeatmapParams
    resources = Resources(batch_size=64)
    INPUTS = {"mask": Input(MASK, "ground-truth mask [H, W], nonzero = object", optional=True)}

    def outputs(self) -> dict[str, Output]:
        g = self.params.grid
        return {"heatmap": Output(tensor_type("float32", [g, g]), "heatmap [g, g] in [0, 1]", role="heatmap")}

    def process(self, batch: Batch) -> dict[str, Any]:
        masks, given = optional_column(batch, "mask", np.zeros((len(batch), 1, 1), np.uint8))
        missing = ~given
        if self.params.if_missing == "fail":
            for i in np.flatnonzero(missing):
                batch.fail(int(i), "no ground-truth mask")
        frac = pool_to_grid(masks, self.params.grid)
        heatmap = minmax(gaussian_blur(frac, self.params.sigma))
        heatmap[missing] = 1.0
        return {"heatmap": heatmap.astype(np.float32)}


class HeatmapPointsParams(StageParams):
    num_points: int = Field(
        5, ge=0, le=16, description="most foreground peaks to pick (EfficientSAM takes at most 6 "
        "points in all)")
    sigma: float = Field(
        1.0, ge=0, le=16, description="Gaussian blur sigma in cells before picking (0 = none)")
    suppression_radius: int = Field(
        2, ge=0, le=64, description="after each pick, cells within this many cells (a (2r+1)^2 "
        "square) are not picked again")
    min_score: float = Field(
        0.0, ge=0, le=1, description="drop peaks whose score (blurred value / blurred max) "
        "is below this")
    num_negative_points: int = Field(
        0, ge=0, le=16, description="background points (label 0) at the lowest blurred cells, "
        "with the same suppression (the CLIP Surgery recipe; 0 = foreground only)")

    @model_validator(mode="after")
    def _some_points(self) -> "HeatmapPointsParams":
        if self.num_points + self.num_negative_points == 0:
            raise ValueError("num_points + num_negative_points must be at least 1")
        return self


@STAGES.add
class HeatmapPoints(Stage):
    """Pick peak cells of a heatmap as SAM point prompts in image pixels.

    The map is blurred, then peaks are taken greedily, each suppressing the square of
    ``suppression_radius`` cells around it. Optional background points come from the
    lowest remaining cells. A map with no positive value, or a constant one, gives no point.
    Slots are ordered foreground (best first), background (lowest first), then padding.
    """

    name = "heatmap_points"
    Params = HeatmapPointsParams
    INPUTS = {
        "heatmap": Input(HEATMAP, "heatmap [g, g]"),
        "image_size": Input(tensor_type("int32", [2]), "(height, width) of the prompted image"),
    }

    def outputs(self) -> dict[str, Output]:
        k = self.params.num_points + self.params.num_negative_points
        return {
            "points": Output(tensor_type("float32", [k, 2]),
                             "(x, y) cell centres in image pixels [K, 2]", role="points"),
            "labels": Output(tensor_type("int32", [k]),
                             "1 foreground, 0 background, -1 padding [K]", role="point_labels"),
            "scores": Output(tensor_type("float32", [k]),
                             "blurred value / blurred max, 0 for padding [K]", role="point_scores"),
            "num_points": Output(pa.int32(), "number of foreground points"),
        }

    def process(self, batch: Batch) -> dict[str, Any]:
        p = self.params
        raw = np.asarray(batch["heatmap"], dtype=np.float64).reshape(len(batch), -1)
        # a map with no positive value, or a constant one, says nothing about where to look
        informative = (raw.max(axis=1) > 0) & (raw.max(axis=1) > raw.min(axis=1))
        blurred = gaussian_blur(batch["heatmap"], p.sigma)
        n, g = blurred.shape[:2]
        flat = blurred.reshape(n, g * g)
        top = flat.max(axis=1)
        score = flat / np.where(top > 0, top, 1.0)[:, None]
        row, col = np.divmod(np.arange(g * g), g)
        rows = np.arange(n)

        k_total = p.num_points + p.num_negative_points
        cells = np.zeros((n, k_total), dtype=np.int64)
        labels = np.full((n, k_total), -1, dtype=np.int32)
        available = np.repeat(informative[:, None], g * g, axis=1)

        def take(k: int, chosen: np.ndarray, ok: np.ndarray, label: int) -> None:
            cells[ok, k] = chosen[ok]
            labels[ok, k] = label
            near = ((np.abs(row[None, :] - row[chosen][:, None]) <= p.suppression_radius)
                    & (np.abs(col[None, :] - col[chosen][:, None]) <= p.suppression_radius))
            available[ok] &= ~near[ok]

        # Greedy, best first: once a row has no acceptable peak, later ones cannot be.
        for k in range(p.num_points):
            chosen = np.where(available, flat, -np.inf).argmax(axis=1)
            ok = (available[rows, chosen] & (flat[rows, chosen] > 0)
                  & (score[rows, chosen] >= p.min_score))
            take(k, chosen, ok, 1)
        for k in range(p.num_points, k_total):
            chosen = np.where(available, flat, np.inf).argmin(axis=1)
            take(k, chosen, available[rows, chosen], 0)

        used = labels >= 0
        h, w = batch["image_size"][:, 0:1], batch["image_size"][:, 1:2]
        x = (col[cells] + 0.5) * w / g
        y = (row[cells] + 0.5) * h / g
        points = np.where(used[..., None], np.stack([x, y], axis=-1), 0.0)
        return {
            "points": points.astype(np.float32),
            "labels": labels,
            "scores": np.where(used, np.take_along_axis(score, cells, 1), 0.0).astype(np.float32),
            "num_points": (labels == 1).sum(axis=1).astype(np.int32),
        }


class HeatmapEnhanceParams(StageParams):
    alpha: float = Field(
        0.5, ge=0, le=1, description="weight of the normalised heatmap; 1 - alpha goes to the mask")


@STAGES.add
class HeatmapEnhance(Stage):
    """Blend a heatmap with a segmentation mask pooled to its grid.

    ``enhanced = minmax(alpha * minmax(heatmap) + (1 - alpha) * mask_frac)``. When the point
    stage found no peak, or the mask is empty or null, the heatmap passes through unchanged
    and ``status`` says why.
    """

    name = "heatmap_enhance"
    Params = HeatmapEnhanceParams
    resources = Resources(batch_size=64)
    INPUTS = {
        "heatmap": Input(HEATMAP, "heatmap [g, g]"),
        "mask": Input(MASK, "binary mask [H, W], nonzero = on", optional=True),
        "num_points": Input(pa.int32(), "foreground points the mask was prompted with",
                            optional=True),
    }
    OUTPUTS = {
        "heatmap": Output(HEATMAP, "enhanced heatmap [g, g] in [0, 1], or the input on fallback",
                          role="enhanced_heatmap"),
        "mask_grid": Output(HEATMAP, "fraction of each cell covered by the mask [g, g]"),
        "status": Output(pa.string(), "'enhanced', 'fallback: no peak', 'fallback: empty mask' or 'fallback: no mask'",
                         role="status"),
    }

    def process(self, batch: Batch) -> dict[str, Any]:
        heatmap = batch["heatmap"]
        n, g = heatmap.shape[:2]
        masks, mask_given = optional_column(batch, "mask", np.zeros((n, 1, 1), np.uint8))
        mask_grid = np.where(mask_given[:, None, None], pool_to_grid(masks, g), np.float32(0))
        has_mask = mask_given & (masks != 0).any(axis=(1, 2))
        counts, has_count = optional_column(batch, "num_points", np.zeros(n, np.int32))
        no_peak = has_count & (counts == 0)

        a = self.params.alpha
        enhanced = minmax(a * minmax(heatmap) + (1 - a) * mask_grid)
        use = (has_mask & ~no_peak)[:, None, None]
        status = np.where(no_peak, "fallback: no peak",
                          np.where(has_mask, "enhanced",
                                   np.where(mask_given, "fallback: empty mask", "fallback: no mask")))
        return {
            "heatmap": np.where(use, enhanced, heatmap).astype(np.float32),
            "mask_grid": mask_grid,
            "status": status.tolist(),
        }


class HeatmapMetricsParams(StageParams):
    top_k: int | None = Field(
        None, ge=1, description="heatmap cells compared in topk_iou (None = the number of cells "
        "covered at least cell_threshold, at least 1)")
    cell_threshold: float = Field(
        0.5, gt=0, le=1,
        description="a cell is inside the mask when this fraction of it is covered")
    recall_k: int = Field(
        20, ge=1, description="heatmap cells of topk_recall (PNP-VQA samples 20 patches per caption)")


@STAGES.add
class HeatmapMetrics(Stage):
    """Score a heatmap against a ground-truth mask: pointing game, energy in mask, top-k IoU
    and top-k recall.

    ``pointing_game`` is 1 when the argmax cell overlaps the mask; ``energy_in_mask`` the
    share of positive heatmap mass weighted by cell coverage; ``topk_iou`` the IoU of the
    top-k cells with the cells covered at least ``cell_threshold``; ``topk_recall`` the share
    of those mask cells among the ``recall_k`` highest cells (ties: first cells first). Null
    without a mask (``topk_recall`` also when no cell is covered ``cell_threshold``).
    """

    name = "heatmap_metrics"
    Params = HeatmapMetricsParams
    resources = Resources(batch_size=64)
    INPUTS = {
        "heatmap": Input(HEATMAP, "heatmap [g, g]"),
        "gt_mask": Input(MASK, "ground-truth mask [H, W], nonzero = object", optional=True),
    }
    OUTPUTS = {
        "pointing_game": Output(pa.float32(), "1 if the argmax cell overlaps the mask, else 0", role="pointing_game"),
        "energy_in_mask": Output(pa.float32(),
                                 "sum(h+ * mask_frac) / sum(h+); null without positive mass", role="energy_in_mask"),
        "topk_iou": Output(pa.float32(), "IoU of the top-k heatmap cells and the mask cells"),
        "topk_recall": Output(pa.float32(), "share of the mask cells among the recall_k highest heatmap cells"),
    }

    def process(self, batch: Batch) -> dict[str, Any]:
        heatmap = batch["heatmap"]
        n, g = heatmap.shape[:2]
        masks, valid = optional_column(batch, "gt_mask", np.zeros((n, 1, 1), np.uint8))
        h = heatmap.reshape(n, -1).astype(np.float64)
        frac = pool_to_grid(masks, g).reshape(n, -1).astype(np.float64)
        rows = np.arange(n)

        pointing = (frac[rows, h.argmax(axis=1)] > 0).astype(np.float64)

        positive = np.clip(h, 0, None)
        mass = positive.sum(axis=1)
        energy = (positive * frac).sum(axis=1) / np.where(mass > 0, mass, 1.0)

        inside = frac >= self.params.cell_threshold
        if self.params.top_k is None:
            k = np.maximum(inside.sum(axis=1), 1)
        else:
            k = np.full(n, self.params.top_k)
        rank = np.empty_like(h, dtype=np.int64)
        rank[rows[:, None], np.argsort(-h, axis=1, kind="stable")] = np.arange(g * g)
        top = rank < k[:, None]
        iou = (top & inside).sum(axis=1) / (top | inside).sum(axis=1)
        cells_in = inside.sum(axis=1)
        recall = (inside & (rank < self.params.recall_k)).sum(axis=1) / np.maximum(cells_in, 1)

        return {
            "pointing_game": nullable(pointing, valid),
            "energy_in_mask": nullable(energy, valid & (mass > 0)),
            "topk_iou": nullable(iou, valid),
            "topk_recall": nullable(recall, valid & (cells_in > 0)),
        }


class SamplePatchesParams(StageParams):
    num_captions: int = Field(
        5, ge=1, le=1000, description="patch sets to draw, one per caption (LAVIS: 50..100)")
    num_patches: int = Field(
        20, ge=1, le=4096, description="patches per set, drawn without replacement")
    seed: int = Field(
        0, ge=0, description="seed; each row's draws depend only on it and the row id")


@STAGES.add
class SamplePatches(Stage):
    """Draw patch index sets with probability proportional to the heatmap, for captioning.

    Each set is drawn without replacement by Gumbel-top-k and sorted ascending. Indices are
    0-based into the flattened ``g * g`` grid (no CLS). Negative or non-finite cells weigh 0
    and are drawn only once the positive cells run out; an all-zero map is uniform.
    """

    name = "sample_patches"
    Params = SamplePatchesParams
    resources = Resources(batch_size=64)
    INPUTS = {"heatmap": Input(HEATMAP, "heatmap [g, g]")}

    def outputs(self) -> dict[str, Output]:
        p = self.params
        return {"patches": Output(tensor_type("int32", [p.num_captions, p.num_patches]),
                                  "sorted patch indices per caption [num_captions, num_patches]", role="patches")}

    def process(self, batch: Batch) -> dict[str, Any]:
        p = self.params
        heatmap = batch["heatmap"]
        n, cells = len(heatmap), heatmap.shape[1] * heatmap.shape[2]
        out = np.zeros((n, p.num_captions, p.num_patches), dtype=np.int32)
        if p.num_patches > cells:
            for i in range(n):
                batch.fail(i, f"num_patches={p.num_patches} exceeds the {cells} cells "
                              "of the heatmap")
            return {"patches": out}
        rngs = [row_rng(p.seed, rid) for rid in batch.row_ids]
        out[:] = sample_patch_sets(heatmap.reshape(n, cells), rngs, p.num_captions, p.num_patches)
        return {"patches": out}
