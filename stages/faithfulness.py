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

import hashlib
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from artifacts.columns import TensorSpec, tensor_type
from models.blip.family import BLIP_ITM
from stages.base import STAGES, Batch, Input, Output, Resources, Role, StageParams
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


def _neighbour_sum(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, C, s, s]`` -> the ROAD-weighted sum of each pixel's 8 neighbours inside the image."""
    import torch
    import torch.nn.functional as F

    weights = torch.tensor(ROAD_NEIGHBOURS, device=pixels.device, dtype=pixels.dtype)
    channels = pixels.shape[1]
    return F.conv2d(pixels, weights.view(1, 1, 3, 3).expand(channels, 1, 3, 3), padding=1, groups=channels)


def road_cg(pixels: torch.Tensor, removed: torch.Tensor, start: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` of conjugate gradients (preconditioned by the diagonal) on ROAD's system
    for the ``removed [B, s, s]`` pixels of ``pixels [B, C, s, s]``, from ``start`` on them:
    ``d_i x_i - sum_j w_ij x_j = 0`` for each removed pixel ``i`` (``w`` the neighbour weights
    inside the image, ``d_i`` their sum; known pixels fixed). The matrix is symmetric positive
    definite wherever a hole touches a kept pixel; items are solved independently (sums per
    item and channel), with a fixed iteration count, so batching never changes a result."""
    import torch

    hole = removed[:, None].to(pixels.dtype)
    known = pixels * (1 - hole)
    diag = _neighbour_sum(torch.ones_like(pixels[:1, :1]))                  # [1, 1, s, s]
    rhs = hole * _neighbour_sum(known)

    def system(u):
        return hole * (diag * u - _neighbour_sum(u))

    def dot(a, b):
        return (a * b).sum(dim=(2, 3), keepdim=True)

    u = start * hole
    r = rhs - system(u)
    z = r / diag
    p, rz = z, dot(r, z)
    for _ in range(iterations):
        ap = system(p)
        pap = dot(p, ap)
        alpha = torch.where(pap > 0, rz / pap.clamp(min=1e-30), torch.zeros_like(pap))
        u = u + alpha * p
        r = r - alpha * ap
        z = r / diag
        rz_next = dot(r, z)
        beta = torch.where(rz > 0, rz_next / rz.clamp(min=1e-30), torch.zeros_like(rz))
        p, rz = z + beta * p, rz_next
    return known + u


def road_solve(pixels: torch.Tensor, removed: torch.Tensor, iterations: int, coarsest: int = 12) -> torch.Tensor:
    """ROAD's linear imputation, coarse to fine: the image's pyramid (2x2 area means of the
    kept pixels; a coarse pixel is removed when all four of its pixels are) is solved at its
    coarsest level (at most ``coarsest`` pixels a side, ``4 * side`` iterations), and each
    finer level runs ``iterations`` of :func:`road_cg` from the bilinear upsampling of the
    coarser solution. A region with no kept pixel at all gets 0 (the normalisation mean)."""
    import torch
    import torch.nn.functional as F

    size = pixels.shape[-1]
    if size <= coarsest:
        return road_cg(pixels, removed, torch.zeros_like(pixels), 4 * size)
    known = (~removed[:, None]).to(pixels.dtype)
    coarse_known = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse = F.avg_pool2d(pixels * known, 2, ceil_mode=True) / coarse_known.clamp(min=1e-12)
    solved = road_solve(coarse, coarse_known[:, 0] == 0, iterations, coarsest)
    start = F.interpolate(solved, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    return road_cg(pixels, removed, start, iterations)


def road_impute(pixels: torch.Tensor, removed: torch.Tensor, noise: torch.Tensor, iterations: int) -> torch.Tensor:
    """ROAD's noisy linear imputation: ``pixels [B, 3, s, s]`` with the ``removed [B, s, s]``
    pixels replaced by the solution of "each removed pixel is the weighted mean of its 8
    neighbours" (known pixels fixed), plus ``noise [B, 3, s, s]`` on them.

    ROAD (and pytorch-grad-cam's ``NoisyLinearImputer``) solves that sparse system exactly
    with a direct solver, one image at a time on the CPU; here it is solved batched, in torch,
    coarse to fine (:func:`road_solve`), ``iterations`` conjugate-gradient steps per pyramid
    level (bench/faithfulness_road.py measures the agreement and the time). Denormal floats
    are flushed while it runs (the residuals of a converged item would crawl otherwise)."""
    import torch

    flushed = torch.set_flush_denormal(True)
    try:
        out = road_solve(pixels, removed, iterations)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    return torch.where(removed[:, None], out + noise, pixels)


# --- the stage ------------------------------------------------------------------------------

def image_key(pixels: np.ndarray) -> str:
    """A key of an image's content (its preprocessed pixels), for per-image seeding that never
    depends on which rows or batches the image comes with."""
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8).hexdigest()


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
    road_iterations: int = Field(16, ge=0, le=4096, description="conjugate-gradient iterations per pyramid level "
                                 "of ROAD's neighbour imputation (solved coarse to fine)")
    road_noise: float = Field(0.01, ge=0, description="std of the Gaussian noise ROAD adds to imputed pixels "
                              "(ROAD's 0.01, in normalised pixel units)")
    seed: int = Field(0, ge=0, description="seed of the random order (per image) and ROAD's noise (per image "
                      "and set of removed cells)")
    chunk: int = Field(64, ge=1, description="perturbed images built and encoded at once (memory bound)")
    max_length: int = Field(35, ge=3, le=512, description="question tokens kept (as itm_gradcam)")


AUC_ROLES = {(order, mode): Role(f"{'' if order == 'heatmap' else order + '_'}{mode}_auc")
             for order in ORDERS for mode in MODES}
CURVE_ROLES = {mode: Role(f"{mode}_curve") for mode in MODES}


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
    terms.

    Image-level work once per image: the random order is seeded per image and the centre
    order is the same for every image, so the baselines' perturbed images are shared by all
    questions of an image; every distinct perturbed image of a batch (an image, the cells left
    visible, fill or ROAD) is built and encoded once and scored against each question that
    uses it (ROAD's noise is seeded by the image and the removed cells, so equal sets give
    equal images). Per image ``3 + 6 (steps - 1)`` encodes (whole image, full fill, ROAD with
    everything removed, the baselines' other steps), per row ``3 (steps - 1)``, fewer where
    sets coincide.
    """

    name = "heatmap_faithfulness"
    version = "2"   # random order per image, ROAD noise per image and removed set, coarse-to-fine CG
    Params = HeatmapFaithfulnessParams
    family = BLIP_ITM
    resources = Resources(gpu=0.5, batch_size=8)  # rows of an image share the baselines' images

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
                out[f"{prefix}{mode}_auc"] = Output(pa.float32(), f"{mode} AUC of the {order} cell order",
                                                    role=AUC_ROLES[order, mode])
                out[f"{prefix}{mode}_curve"] = Output(tensor_type("float32", [k]),
                                                      f"{mode} curve [{k}] of the {order} cell order",
                                                      role=CURVE_ROLES[mode] if order == "heatmap" else None)
        return out

    def extra_problems(self) -> list[tuple[str, str]]:
        return BLIP_ITM.tokenizer_problems(self.params.preset, self.params.checkpoint)

    def setup(self, device: str) -> None:
        from models.blip.tokenizer import load_blip_tokenizer

        super().setup(device)
        self.tokenizer = load_blip_tokenizer(BLIP_ITM.tokenizer_dir(self.params.preset, self.params.checkpoint))

    def orders(self, batch: Batch, grid: int) -> np.ndarray:
        """``[N, 3, g*g]`` the heatmap's, the random and the centre cell order of each row; the
        random order is seeded by the row's image, so all questions of an image share it."""
        n, cells = len(batch), grid * grid
        keys = [image_key(p) for p in batch["pixels"]]
        random = np.stack([random_order(row_rng(self.params.seed, f"{k}#order"), cells) for k in keys])
        centre = np.broadcast_to(centre_order(grid), (n, cells))
        return np.stack([heatmap_order(batch["heatmap"]), random[batch.image_rows], centre], axis=1)

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

    @staticmethod
    def distinct_images(image_rows: np.ndarray, visible: np.ndarray) -> tuple[list[tuple[int, str, bytes]], np.ndarray]:
        """The distinct perturbed images of ``visible bool [N, 3, 3, K+1, C]`` and which one each
        curve point shows: ``(specs, index [N, 3, 3, K+1])``; a spec is ``(image, kind,
        visible cells packed)`` with kind "whole" (nothing removed, whatever the mode), "fill"
        (deletion and insertion: removed cells show the fill) or "road"."""
        rows, _, modes, _ = np.indices(visible.shape[:4]).reshape(4, -1)
        flat = visible.reshape(-1, visible.shape[-1])
        packed = np.packbits(flat, axis=1)
        everything = flat.all(axis=1)
        road = modes == MODES.index("road")
        seen: dict[tuple[int, str, bytes], int] = {}
        index = np.empty(len(flat), np.int64)
        for i in range(len(flat)):
            kind = "whole" if everything[i] else "road" if road[i] else "fill"
            spec = (int(image_rows[rows[i]]), kind, b"" if kind == "whole" else packed[i].tobytes())
            index[i] = seen.setdefault(spec, len(seen))
        return list(seen), index.reshape(visible.shape[:4])

    def score(self, batch: Batch, visible: np.ndarray, grid: int) -> np.ndarray:
        """ITM match probability of each row's question with each perturbed image:
        ``visible bool [N, 3, 3, K+1, C]`` -> ``[N, 3, 3, K+1]``. The distinct images
        (:meth:`distinct_images`) are built and encoded ``chunk`` at a time; each is scored
        once per row that shows it."""
        import torch

        from models.blip.tokenizer import tokenize_questions

        p, device = self.params, self.device
        ids, mask = tokenize_questions(self.tokenizer, [blip_question(q) for q in batch["question"]], p.max_length)
        ids, mask = ids.to(device), mask.to(device)
        pixels = torch.from_numpy(batch["pixels"]).to(device)                    # [I, 3, s, s]
        canvas = fill_canvas(pixels, p.fill, grid)
        keys = [image_key(x) for x in batch["pixels"]]
        specs, index = self.distinct_images(batch.image_rows, visible)
        rows = np.broadcast_to(np.arange(len(batch))[:, None, None, None], index.shape).reshape(-1)
        # each (row, distinct image) pair is scored once
        pairs, pair_of = np.unique(rows * len(specs) + index.reshape(-1), return_inverse=True)
        pair_rows, pair_images = pairs // len(specs), pairs % len(specs)
        scores = np.empty(len(pairs), np.float32)
        for start in range(0, len(specs), p.chunk):
            part = specs[start:start + p.chunk]
            images = self.perturbed(pixels, canvas, keys, part, grid)
            with torch.no_grad():
                tokens = self.model.encode_image(images)
            todo = np.flatnonzero((pair_images >= start) & (pair_images < start + len(part)))
            for first in range(0, len(todo), p.chunk):
                sel = todo[first:first + p.chunk]
                row = torch.from_numpy(pair_rows[sel]).to(device)
                with torch.no_grad():
                    logits = self.model.itm_logits(tokens[torch.from_numpy(pair_images[sel] - start).to(device)],
                                                   ids[row], mask[row])
                scores[sel] = logits.float().softmax(dim=-1)[:, 1].cpu().numpy()
        return scores[pair_of].reshape(visible.shape[:4])

    def perturbed(self, pixels: torch.Tensor, canvas: torch.Tensor, keys: list[str],
                  specs: list[tuple[int, str, bytes]], grid: int) -> torch.Tensor:
        """``[B, 3, s, s]`` the images of ``specs`` (:meth:`distinct_images`): removed cells
        show the fill, or ROAD's imputation with noise seeded by the image's content and the
        removed cells, so an image never depends on the rows or the batch it comes with."""
        import torch

        device, size, cells = pixels.device, pixels.shape[-1], grid * grid
        image = torch.tensor([spec[0] for spec in specs], device=device)
        visible = np.stack([np.unpackbits(np.frombuffer(b, np.uint8), count=cells).astype(bool) if kind != "whole"
                            else np.ones(cells, bool) for _, kind, b in specs])
        shown = pixel_mask(torch.from_numpy(visible).to(device), grid, size)     # [B, s, s]
        out = torch.where(shown[:, None], pixels[image], canvas[image])
        road = [i for i, spec in enumerate(specs) if spec[1] == "road"]
        if road:
            noise = np.stack([row_rng(self.params.seed, f"{keys[specs[i][0]]}#road#{specs[i][2].hex()}")
                              .standard_normal((3, size, size), dtype=np.float32) for i in road])
            at = torch.tensor(road, device=device)
            out[at] = road_impute(pixels[image[at]], ~shown[at], torch.from_numpy(noise * self.params.road_noise)
                                  .to(device), self.params.road_iterations)
        return out
