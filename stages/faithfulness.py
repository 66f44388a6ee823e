"""Heatmap faithfulness without masks: how the model's own evidence changes when the cells a
heatmap ranks highest are removed or revealed first.

Deletion and insertion curves and their areas (RISE, Petsiuk et al. 2018) and the
remove-and-debias variant (ROAD, Rong et al. 2022: removed pixels are imputed from their
neighbours instead of a constant fill, so the shape of the hole leaks less), each against a
random cell order and a centre-prior order on the same sample.

The pure functions (cell orders, visible-cell masks, fills, imputation, areas) need no model;
torch is imported inside them, so graphs without model stages never import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from artifacts.columns import TensorSpec, tensor_type
from models.blip.family import BLIP_ITM
from stages.base import STAGES, Batch, Input, Output, Resources, StageParams
from stages.blip import Preset
from stages.common import row_rng
from stages.model_stage import ModelStage
from stages.text import blip_question

if TYPE_CHECKING:
    import torch

ORDERS = ("heatmap", "random", "centre")     # the heatmap's cell order and its two baselines
MODES = ("deletion", "insertion", "road")    # road: deletion with ROAD's imputation as the fill
ROAD_NEIGHBOURS = ((1 / 12, 1 / 6, 1 / 12),  # ROAD's weights: direct neighbours 1/6, diagonals 1/12
                   (1 / 6, 0.0, 1 / 6),
                   (1 / 12, 1 / 6, 1 / 12))


# --- cell orders and visible cells (numpy) --------------------------------------------------

def heatmap_order(heatmaps: np.ndarray) -> np.ndarray:
    """``[N, g, g]`` -> ``[N, g*g]`` cell indices, highest first; ties: lower index first."""
    flat = heatmaps.reshape(len(heatmaps), -1)
    return np.argsort(-flat, axis=1, kind="stable")


def random_order(rng: np.random.Generator, cells: int) -> np.ndarray:
    """``[cells]`` a random permutation of the cells."""
    return rng.permutation(cells)


def centre_order(grid: int) -> np.ndarray:
    """``[g*g]`` cells by distance of their centre to the image centre, nearest first; ties:
    lower index first (the centre prior: objects of interest tend to sit in the middle)."""
    centres = np.arange(grid) + 0.5 - grid / 2
    distance = centres[:, None] ** 2 + centres[None, :] ** 2
    return np.argsort(distance.reshape(-1), kind="stable")


def step_counts(cells: int, steps: int) -> np.ndarray:
    """``[steps+1]`` cells taken at each step: ``floor(k * cells / steps)``, 0 to all."""
    return np.arange(steps + 1) * cells // steps


def visible_cells(orders: np.ndarray, steps: int, mode: str) -> np.ndarray:
    """``orders [N, g*g]`` -> ``bool [N, steps+1, g*g]``: the cells left visible at each step.
    deletion / road: the first ``step_counts`` cells of the order are removed; insertion: only
    they are shown."""
    n, cells = orders.shape
    rank = np.empty_like(orders)
    rank[np.arange(n)[:, None], orders] = np.arange(cells)
    taken = rank[:, None, :] < step_counts(cells, steps)[None, :, None]
    return taken if mode == "insertion" else ~taken


def curve_auc(curves: np.ndarray) -> np.ndarray:
    """``[..., K+1]`` scores at evenly spaced steps -> ``[...]`` area under the curve over the
    step axis normalised to [0, 1] (trapezoid rule)."""
    k = curves.shape[-1] - 1
    return (curves.sum(axis=-1) - (curves[..., 0] + curves[..., -1]) / 2) / k


# --- pixels: cell masks, fills and ROAD's imputation (torch) --------------------------------

def pixel_mask(visible: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """``bool [M, g*g]`` -> ``bool [M, s, s]``: pixel ``p`` lies in cell ``p * g // s`` (blocks
    of ``s/g`` pixels)."""
    import torch

    cell = torch.arange(size, device=visible.device) * grid // size
    index = (cell[:, None] * grid + cell[None, :]).reshape(-1)
    return visible[:, index].reshape(len(visible), size, size)


def gaussian_blur_pixels(pixels: torch.Tensor, sigma: float, padding: str = "reflect") -> torch.Tensor:
    """``[B, C, s, s]`` blurred by a separable Gaussian of radius 3 sigma (at most ``s - 1``);
    ``padding`` "reflect" or "constant" (zeros: for normalised convolutions)."""
    import torch
    import torch.nn.functional as F

    radius = max(1, min(int(3 * sigma), pixels.shape[-1] - 1))
    x = torch.arange(-radius, radius + 1, device=pixels.device, dtype=pixels.dtype)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = pixels.shape[1]
    out = F.pad(pixels, (radius, radius, radius, radius), mode=padding)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def fill_canvas(pixels: torch.Tensor, fill: str, grid: int) -> torch.Tensor:
    """``[I, 3, s, s]`` -> what removed cells show: the image blurred by one cell (sigma
    ``s/g``: a cell's content is gone, its colour stays), its per-channel mean, or zero (the
    normalisation mean colour)."""
    import torch

    if fill == "blur":
        return gaussian_blur_pixels(pixels, pixels.shape[-1] / grid)
    if fill == "mean":
        return pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels).clone()
    return torch.zeros_like(pixels)


def neighbour_mean(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, C, s, s]`` -> the ROAD-weighted mean of each pixel's 8 neighbours inside the image
    (weights of neighbours outside renormalised away)."""
    import torch
    import torch.nn.functional as F

    weights = torch.tensor(ROAD_NEIGHBOURS, device=pixels.device, dtype=pixels.dtype)
    channels = pixels.shape[1]
    total = F.conv2d(pixels, weights.view(1, 1, 3, 3).expand(channels, 1, 3, 3), padding=1, groups=channels)
    inside = F.conv2d(torch.ones_like(pixels[:, :1]), weights.view(1, 1, 3, 3), padding=1)
    return total / inside


def pyramid_fill(pixels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``pixels [B, C, s, s]`` with the pixels where ``known [B, 1, s, s]`` is 0 filled from a
    pyramid of area-averaged known pixels (push-pull): every hole gets the mean of the nearest
    known pixels at the scale where it closes; a region with no known pixel at all gets 0."""
    import torch
    import torch.nn.functional as F

    if pixels.shape[-1] == 1:
        return pixels * known
    coarse_known = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse = F.avg_pool2d(pixels * known, 2, ceil_mode=True) / coarse_known.clamp(min=1e-12)
    filled = pyramid_fill(coarse, (coarse_known > 0).to(known.dtype))
    up = F.interpolate(filled, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    return torch.where(known > 0, pixels, up)


def road_impute(pixels: torch.Tensor, removed: torch.Tensor, noise: torch.Tensor, iterations: int) -> torch.Tensor:
    """ROAD's noisy linear imputation: ``pixels [B, 3, s, s]`` with the ``removed [B, s, s]``
    pixels replaced by the solution of "each removed pixel is the weighted mean of its 8
    neighbours" (known pixels fixed), plus ``noise [B, 3, s, s]`` on them.

    ROAD solves that sparse system exactly; here Jacobi iterations, batched, start from a
    push-pull fill of the holes (:func:`pyramid_fill`) and approach the solution (a region with
    no kept pixel at all stays 0, the normalisation mean).
    """
    import torch

    hole = removed[:, None]
    out = pyramid_fill(pixels, (~hole).to(pixels.dtype))
    for _ in range(iterations):
        out = torch.where(hole, neighbour_mean(out), pixels)
    return out + noise * hole


# --- the stage ------------------------------------------------------------------------------

class HeatmapFaithfulnessParams(StageParams):
    preset: Preset = Field("tiny", description=BLIP_ITM.preset_doc("BLIP ITM model whose match score is the "
                                                                   "evidence (as itm_gradcam)"))
    checkpoint: str | None = Field(None, description="explicit checkpoint instead of the preset's standard file "
                                   "(as itm_gradcam)")
    steps: int = Field(8, ge=1, le=256, description="curve steps: step k removes / reveals the first "
                       "floor(k * g*g / steps) cells of the order")
    fill: Literal["blur", "mean", "zero"] = Field(
        "blur", description="what deletion shows in removed cells and insertion starts from: the image blurred "
        "by one cell, its per-channel mean, or zero (the normalisation mean colour)")
    road_iterations: int = Field(64, ge=0, le=4096, description="Jacobi iterations of ROAD's neighbour imputation")
    road_noise: float = Field(0.01, ge=0, description="std of the Gaussian noise ROAD adds to imputed pixels "
                              "(ROAD's 0.01, in normalised pixel units)")
    seed: int = Field(0, ge=0, description="seed of the random order and ROAD's noise (per row)")
    chunk: int = Field(64, ge=1, description="perturbed images encoded and scored at once (memory bound)")
    max_length: int = Field(35, ge=3, le=512, description="question tokens kept (as itm_gradcam)")


@STAGES.add
class HeatmapFaithfulness(ModelStage):
    """Faithfulness of any heatmap without masks: deletion, insertion and ROAD curves of the
    BLIP ITM match probability of the question as the heatmap's highest cells go first, and
    the same for a random and a centre-prior cell order.

    Each curve has ``steps + 1`` points, from the whole image (deletion, road) or the fill
    (insertion); its AUC is the trapezoid mean over the step axis. A faithful heatmap has a
    lower deletion / road AUC and a higher insertion AUC than the baselines of its own row.

    Circularity: the evidence is the ITM model that itm_gradcam reads, so its GradCAM is
    favoured by construction (it is the gradient of this very score); other heatmaps (enhanced,
    fused, QA-ViT, a plugin's) are judged by a model they were not built from. Compare a
    heatmap with the baselines and with other heatmaps under the same model, not in absolute
    terms. The whole image and the full fill are encoded once per image.
    """

    name = "heatmap_faithfulness"
    Params = HeatmapFaithfulnessParams
    family = BLIP_ITM
    resources = Resources(gpu=0.5, batch_size=4)  # each row scores 9 * (steps + 1) images

    def inputs(self) -> dict[str, Input]:
        s = self.model_config().vit.image_size
        return {"pixels": Input(tensor_type("float32", [3, s, s]), f"preprocessed image [3, {s}, {s}] "
                                "(preprocess_image, family blip)", per_image=True),
                "question": Input(pa.string(), "question text"),
                "heatmap": Input(TensorSpec("float32", ("g", "g")), "any heatmap [g, g]; cell (i, j) covers "
                                 "pixel block i*s/g.., j*s/g..")}

    def outputs(self) -> dict[str, Output]:
        k = self.params.steps + 1
        out = {}
        for order in ORDERS:
            prefix = "" if order == "heatmap" else f"{order}_"
            for mode in MODES:
                out[f"{prefix}{mode}_auc"] = Output(pa.float32(), f"{mode} AUC of the {order} cell order")
                out[f"{prefix}{mode}_curve"] = Output(tensor_type("float32", [k]),
                                                      f"{mode} curve [{k}] of the {order} cell order")
        return out

    def extra_problems(self) -> list[tuple[str, str]]:
        return BLIP_ITM.tokenizer_problems(self.params.preset, self.params.checkpoint)

    def setup(self, device: str) -> None:
        from models.blip.tokenizer import load_blip_tokenizer

        super().setup(device)
        self.tokenizer = load_blip_tokenizer(BLIP_ITM.tokenizer_dir(self.params.preset, self.params.checkpoint))

    def orders(self, batch: Batch, grid: int) -> np.ndarray:
        """``[N, 3, g*g]`` the heatmap's, the random and the centre cell order of each row."""
        n, cells = len(batch), grid * grid
        random = np.stack([random_order(row_rng(self.params.seed, f"{r}#order"), cells) for r in batch.row_ids])
        centre = np.broadcast_to(centre_order(grid), (n, cells))
        return np.stack([heatmap_order(batch["heatmap"]), random, centre], axis=1)

    def process(self, batch: Batch) -> dict[str, Any]:
        p = self.params
        grid = batch["heatmap"].shape[-1]
        orders = self.orders(batch, grid)                                        # [N, 3, C]
        visible = np.stack([np.stack([visible_cells(orders[:, o], p.steps, m) for m in MODES], axis=1)
                            for o in range(len(ORDERS))], axis=1)                 # [N, 3, 3, K+1, C]
        curves = self.score(batch, visible, grid)                                # [N, 3, 3, K+1]
        aucs = curve_auc(curves)
        out = {}
        for o, order in enumerate(ORDERS):
            prefix = "" if order == "heatmap" else f"{order}_"
            for m, mode in enumerate(MODES):
                out[f"{prefix}{mode}_auc"] = aucs[:, o, m].astype(np.float32)
                out[f"{prefix}{mode}_curve"] = curves[:, o, m].astype(np.float32)
        return out

    def score(self, batch: Batch, visible: np.ndarray, grid: int) -> np.ndarray:
        """ITM match probability of each row's question with each perturbed image:
        ``visible bool [N, 3, 3, K+1, C]`` -> ``[N, 3, 3, K+1]``. The whole image and the full
        fill come from tokens encoded once per image; the rest is built, encoded and scored
        ``chunk`` images at a time."""
        import torch

        from models.blip.tokenizer import tokenize_questions

        p, device = self.params, self.device
        ids, mask = tokenize_questions(self.tokenizer, [blip_question(q) for q in batch["question"]], p.max_length)
        pixels = torch.from_numpy(batch["pixels"]).to(device)                    # [I, 3, s, s]
        canvas = fill_canvas(pixels, p.fill, grid)
        with torch.no_grad():
            whole_tokens = self.model.encode_image(torch.cat([pixels, canvas]))  # [2I, 1+P, W]
        n_images = len(pixels)
        rows, orders, modes, steps = np.indices(visible.shape[:4]).reshape(4, -1)
        flat = visible.reshape(-1, visible.shape[-1])
        road = modes == MODES.index("road")
        # whole image: nothing removed; full fill: everything removed by deletion / insertion
        # (ROAD's all-removed image still carries per-row noise, so it is built)
        whole = np.where(flat.all(axis=1), batch.image_rows[rows],
                         np.where(~flat.any(axis=1) & ~road, n_images + batch.image_rows[rows], -1))
        scores = np.empty(len(flat), np.float32)
        for start in range(0, len(flat), p.chunk):
            part = slice(start, start + p.chunk)
            tokens = whole_tokens[torch.from_numpy(np.maximum(whole[part], 0)).to(device)]
            built = np.flatnonzero(whole[part] < 0)
            if len(built):
                items = start + built
                noise_keys = [f"{batch.row_ids[rows[i]]}#road#{orders[i]}#{steps[i]}" if road[i] else None
                              for i in items]
                images = self.perturbed(pixels, canvas, batch.image_rows[rows[items]], flat[items], noise_keys, grid)
                with torch.no_grad():
                    tokens[torch.from_numpy(built).to(device)] = self.model.encode_image(images)
            row = torch.from_numpy(rows[part]).to(device)
            with torch.no_grad():
                logits = self.model.itm_logits(tokens, ids.to(device)[row], mask.to(device)[row])
            scores[part] = logits.float().softmax(dim=-1)[:, 1].cpu().numpy()
        return scores.reshape(visible.shape[:4])

    def perturbed(self, pixels: torch.Tensor, canvas: torch.Tensor, image_of: np.ndarray, visible: np.ndarray,
                  noise_keys: list[str | None], grid: int) -> torch.Tensor:
        """``[B, 3, s, s]`` images of ``visible bool [B, C]`` cells of images ``image_of [B]``:
        removed cells show the fill, or, where an item has a noise key, ROAD's imputation with
        noise seeded by that key (row, order, step), so the images never depend on batching."""
        import torch

        device, size = pixels.device, pixels.shape[-1]
        image = torch.from_numpy(image_of).to(device)
        shown = pixel_mask(torch.from_numpy(visible).to(device), grid, size)    # [B, s, s]
        out = torch.where(shown[:, None], pixels[image], canvas[image])
        road = [i for i, key in enumerate(noise_keys) if key is not None]
        if road:
            noise = np.stack([row_rng(self.params.seed, noise_keys[i]).standard_normal((3, size, size), dtype=np.float32)
                              for i in road]) * self.params.road_noise
            index = torch.tensor(road, device=device)
            out[index] = road_impute(pixels[image[index]], ~shown[index], torch.from_numpy(noise).to(device),
                                     self.params.road_iterations)
        return out
