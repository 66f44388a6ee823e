"""``runtime train itm``: train a BLIP ITM model (every parameter, the ViT included).

Objective, per step of ``batch_size`` samples (see :mod:`training.pairs`):

- ITM: cross-entropy of the ITM head (``[ENC]`` first, cross-attention to the image tokens)
  on each positive pair (an image, its own question) and one hard negative per positive (a
  colour / shape word swapped to one absent from the scene, or the question of another image
  whose answer differs);
- ITC (weight ``--itc-weight``): symmetric InfoNCE between the normalised
  ``vision_proj(image CLS)`` and ``text_proj(text CLS)`` (text-only encoder, ``[CLS]`` first as
  in LAVIS) over the batch's positives, with temperature ``temp`` (LAVIS's parameterisation:
  learned, clamped to [0.001, 0.5], unless ``--fixed-temp``). Positives sharing an image or an
  identical question are all targets (soft targets, normalised per row). A tiny ITM barely
  learns from the ITM loss alone; ITC gives the image and text encoders a direct signal;
- grounding (weight ``--grounding-weight``, default 0 = off; needs ground-truth masks, as the
  ``shapes`` source has): ``-log`` of the cross-attention mass that layer ``--block-num``'s
  question tokens (mean over heads and tokens ``1..L-2``, as GradCAM averages them) put on the
  patches the positive's referred objects overlap. It teaches the attention GradCAM reads
  where the answer is, as large-scale pre-training does for the published BLIP; heatmap
  quality measured on a model trained with it is supervised, not emergent (docs/quality.md).

- patch labels (weight ``--patch-label-weight``, default 0 = off; needs the ``scene`` column,
  as the ``shapes`` source has): a linear probe on the ViT's patch tokens predicts the colour
  and the shape of the object that covers at least half of each patch (bounding boxes; or
  background), cross-entropy. The probe exists only during training (it is not in
  ``itm.safetensors``); it gives the ViT, trained from scratch, the dense signal that
  pre-training gives the published one: without it the 4-layer shapes ITM stayed at chance
  (ITM loss 0.69 for 300 steps) while its attention learned to find *some* object.
  Object patches are a few percent of the grid, so ``--patch-object-weight W`` weighs each
  object patch ``W`` times a background patch in that cross-entropy (default 1: a plain mean,
  which the shape classes hardly move).

``--questions-per-image Q`` draws a step's positives as ``batch / Q`` images with up to ``Q``
questions each: all pairs of a positive use its image, so a step encodes ``Q`` times fewer
images. Cross-attention keys / values are computed once per image and shared by its pairs.

AdamW (no weight decay on biases, norms and the temperature), linear warmup over ``--warmup``
steps then a constant learning rate (``--lr-decay cosine``: a cosine decay to 0 at
``--steps``), gradient clipping.

Initialisation: ``--preset tiny`` without ``--init`` is the preset's seeded random init (the
same in every process); ``--init FILE`` loads a checkpoint (LAVIS ``.pth`` or a previous
``itm.safetensors``) into the preset's architecture; ``base`` / ``large`` need ``--init`` or
their standard file in the weights folder.

Determinism: step ``k``'s pairs come from ``numpy.random.default_rng([seed, k])`` alone; the
image pixels are preprocessed per image; repeated images are gathered with a one-hot matmul
(deterministic backward); the model has no dropout. So the same command gives the same
weights, and ``--resume`` (model, optimiser, temperature, step and torch RNG state from
``DIR/checkpoint.pt``) ends with the same weights as an uninterrupted run (same device and
threads). Evaluation does not touch the training state, so ``--eval-*`` may change on resume.

Held-out evaluation (at the end, and every ``--eval-every`` steps): the same source with seed
``--eval-seed`` (default seed + 1000), ``--eval-images`` images; every sample gives a positive
and one hard negative (drawn from ``default_rng(eval_seed)``); ITM accuracy with the threshold
0.5 on the softmax match probability, also per positives / negatives and per negative kind;
and the GradCAM pointing game at ``--block-num`` (LAVIS recipe, as ``itm_gradcam``) on the
held-out positives that refer to objects: 1 when the heatmap's argmax cell overlaps them.

Outputs in ``--out DIR``: ``itm.safetensors`` (the state dict with LAVIS key names, plus
``temp``; ``load_blip_itm(preset, path)`` reads it), ``checkpoint.pt`` (resumable, atomic,
``weights_only``), ``loss.csv``, ``loss.png``, ``config.json`` (command lines, seeds, settings,
times), ``metrics.json`` (held-out ITM accuracy, its history, loss summary).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.common import (HeldOutSeed, TrainingResult, add_blip_model_options, add_checkpoint_option,
                             add_device_options, add_lr_decay_option, add_optimisation_options, add_output_options,
                             add_source_options, check_same_run, due, finish_run, finite_loss, mean_or_none,
                             parse_source_params, run_command, set_scheduled_lr, settings_identity, source_num_images,
                             start_run, weight_decay_groups)
from training.pairs import draw_pairs, positive_indices
from shapes.patch_labels import PatchLabels, build_probe, patch_label_loss

DEFAULT_STEPS = 300
CHECKPOINT_FORMAT = "pnpvqa-itm-training"
CHECKPOINT_VERSION = 1
EVAL_BATCH = 32  # pairs per evaluation forward
# settings that may differ between a run and its --resume continuation (the --init file is
# compared by its fingerprint; evaluation does not change the training)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "quiet", "out", "resume", "init", "weights", "image_cache",
                     "eval_every", "eval_seed", "eval_images")


@dataclass
class ItmSettings(HeldOutSeed):
    out: str
    preset: str = "tiny"
    init: str | None = None
    weights: str | None = None
    source: str = "shapes"
    seed: int = 0
    num_images: int | None = 16
    source_params: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    swap_fraction: float = 0.5
    steps: int = DEFAULT_STEPS
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: int = 0
    lr_decay: str = "constant"
    grad_clip: float = 1.0
    itc_weight: float = 1.0
    grounding_weight: float = 0.0
    patch_label_weight: float = 0.0
    patch_object_weight: float = 1.0
    block_num: int | None = None
    questions_per_image: int = 1
    temp: float = 0.07
    fixed_temp: bool = False
    checkpoint_every: int = 50
    eval_every: int = 0
    eval_seed: int | None = None
    eval_images: int | None = None
    image_cache: int = 1024
    device: str = "auto"
    resume: bool = False
    quiet: bool = False

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return settings_identity(self, RESUMABLE_CHANGES, {"lr_decay": "constant", "patch_object_weight": 1.0})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runtime train itm",
        description="Train a BLIP ITM model (all parameters) on image-question matching (ITM cross-entropy on "
                    "positives and hard negatives) + ITC (symmetric InfoNCE). Writes DIR/itm.safetensors (loadable "
                    "by load_blip_itm), DIR/checkpoint.pt, DIR/loss.csv, DIR/loss.png, DIR/config.json, "
                    "DIR/metrics.json (held-out ITM accuracy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_output_options(p)
    add_blip_model_options(p, architecture="BLIP ITM", init_help="initial weights (LAVIS .pth or itm.safetensors); "
                           "default: the preset's own (tiny: seeded random init; base/large: the standard file)")
    d = add_source_options(p)
    d.add_argument("--image-cache", type=int, default=1024, metavar="IMAGES",
                   help="preprocessed images kept in memory")
    t = add_optimisation_options(p, steps=DEFAULT_STEPS, batch_size=8, batch_help="positives per step (as many "
                                 "negatives)", lr=1e-4, lr_help="AdamW learning rate (after the warmup: constant)",
                                 weight_decay=0.05, weight_decay_help="on weight matrices only", warmup=True)
    t.add_argument("--itc-weight", type=float, default=1.0, help="weight of the ITC loss (0 = ITM only)")
    t.add_argument("--grounding-weight", type=float, default=0.0, help="weight of the grounding loss on the "
                   "cross-attention of --block-num (0 = off; needs ground-truth masks)")
    t.add_argument("--patch-label-weight", type=float, default=0.0, help="weight of the patch colour / shape "
                   "probe loss on the ViT tokens (0 = off; needs the scene column)")
    t.add_argument("--patch-object-weight", type=float, default=1.0, metavar="W", help="weight of an object "
                   "patch relative to a background patch in the probe loss")
    add_lr_decay_option(t)
    t.add_argument("--block-num", type=int, default=None, help="text layer of the grounding loss and of the "
                   "held-out GradCAM pointing game (as itm_gradcam's block_num; default: the preset's, 7 or shapes 2)")
    t.add_argument("--questions-per-image", type=int, default=1, metavar="Q",
                   help="positives per drawn image (batch = batch-size / Q images)")
    t.add_argument("--temp", type=float, default=0.07, help="initial ITC temperature")
    t.add_argument("--fixed-temp", action="store_true", help="keep the ITC temperature fixed")
    add_checkpoint_option(t)
    add_device_options(t)
    e = p.add_argument_group("held-out evaluation")
    e.add_argument("--eval-every", type=int, default=0, metavar="N", help="also evaluate every N steps (0 = only "
                   "at the start and the end)")
    e.add_argument("--eval-seed", type=int, help="source seed of the held-out set (default: seed + 1000)")
    e.add_argument("--eval-images", type=int, help="images of the held-out set (default: --num-images; "
                   "0 = no evaluation)")
    return p


def settings_from_args(args: argparse.Namespace) -> ItmSettings:
    extra = parse_source_params(args.source_param)
    num_images = source_num_images(args.source, args.num_images, extra)
    return ItmSettings(
        out=args.out, preset=args.preset, init=args.init, weights=args.weights, source=args.source,
        seed=args.seed, num_images=num_images, source_params=extra, limit=args.limit,
        swap_fraction=args.swap_fraction, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip, itc_weight=args.itc_weight,
        grounding_weight=args.grounding_weight, patch_label_weight=args.patch_label_weight,
        patch_object_weight=args.patch_object_weight, lr_decay=args.lr_decay, block_num=args.block_num,
        questions_per_image=args.questions_per_image,
        temp=args.temp, fixed_temp=args.fixed_temp, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, eval_seed=args.eval_seed, eval_images=args.eval_images,
        image_cache=args.image_cache, device=args.device, resume=args.resume, quiet=args.quiet)


def check_settings(s: ItmSettings) -> None:
    for name in ("steps", "batch_size", "image_cache", "questions_per_image"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("checkpoint_every", "eval_every", "warmup"):
        if getattr(s, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
    if s.eval_images is not None and s.eval_images < 0:
        raise ValueError(f"--eval-images must be >= 0, got {s.eval_images}")
    if not s.lr > 0 or min(s.weight_decay, s.grad_clip, s.itc_weight, s.grounding_weight, s.patch_label_weight) < 0:
        raise ValueError("--lr must be > 0, --weight-decay, --grad-clip, --itc-weight, --grounding-weight and "
                         "--patch-label-weight >= 0")
    if not s.patch_object_weight > 0:
        raise ValueError(f"--patch-object-weight must be > 0, got {s.patch_object_weight}")
    if s.lr_decay not in ("constant", "cosine"):
        raise ValueError(f"--lr-decay must be constant or cosine, got {s.lr_decay!r}")
    if not 0.001 <= s.temp <= 0.5:
        raise ValueError(f"--temp must be in [0.001, 0.5], got {s.temp}")
    if not 0.0 <= s.swap_fraction <= 1.0:
        raise ValueError(f"--swap-fraction must be in [0, 1], got {s.swap_fraction}")


class PixelStore:
    """BLIP pixels of the dataset's images (LAVIS preprocessing, as
    :func:`training.data.blip_pixels`), the resized uint8 images of the ``max_cached`` most
    recently used ones kept in memory. Each image is preprocessed alone, so a value never
    depends on the batch it first appeared in."""

    def __init__(self, data, image_size: int, max_cached: int) -> None:
        from collections import OrderedDict

        self.data, self.size, self.max_cached = data, image_size, max(1, max_cached)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _resized(self, i: int) -> np.ndarray:
        from PIL import Image

        from stages.images import FAMILIES, RESAMPLE
        from training.data import decode

        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        image = decode(self.data.images[i])
        resized = np.asarray(Image.fromarray(image).resize(
            (self.size, self.size), RESAMPLE[FAMILIES["blip"]["interpolation"]]))
        self._cache[i] = resized
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return resized

    def get(self, indices: Sequence[int]):
        """``[U, 3, S, S]`` float32 (normalised) of the images ``indices``."""
        import torch

        from stages.images import FAMILIES

        family = FAMILIES["blip"]
        x = np.stack([self._resized(int(i)) for i in indices]).astype(np.float32) / np.float32(255)
        x = (x - np.asarray(family["mean"], np.float32)) / np.asarray(family["std"], np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def itc_loss(model, image_embeds, rows, input_ids, attention_mask, cls_token_id: int, temp, images, questions):
    """Symmetric InfoNCE over the positives: ``image_embeds [U, 1+P, C]`` of the unique images,
    ``rows [B]`` (row ``b``'s image), ``input_ids``/``attention_mask [B, T]`` ([ENC] first; the
    text encoder gets [CLS] first). Targets: pairs of the same image or the same question."""
    import torch
    import torch.nn.functional as F

    from training.fusion import pair_rows

    ids = input_ids.clone()
    ids[:, 0] = cls_token_id
    text = model.text_encoder(ids, attention_mask).hidden[:, 0]
    text_feat = F.normalize(model.text_proj(text), dim=-1)                          # [B, E]
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)         # [U, E]
    image_feat = pair_rows(image_feat, rows)                                          # [B, E]
    sim = image_feat @ text_feat.t() / temp                                           # [B, B]
    same = torch.tensor([[a == b or qa == qb for b, qb in zip(images, questions)] for a, qa in zip(images, questions)],
                        dtype=sim.dtype, device=sim.device)
    targets = same / same.sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(sim, dim=1) * targets).sum(dim=1).mean()
    t2i = -(F.log_softmax(sim.t(), dim=1) * targets).sum(dim=1).mean()
    return (i2t + t2i) / 2


def evaluate(model, tokenizer, store: PixelStore, pairs, samples, device, step: int, block_num: int) -> dict[str, Any]:
    """ITM accuracy (softmax match probability > 0.5 = match) on the held-out pairs, and the
    GradCAM pointing game at ``block_num`` on the positives whose sample has ``cells``."""
    import torch

    from models.blip import tokenize_questions
    from training.fusion import pair_rows

    was_training = model.training
    model.eval()
    probs: list[float] = []
    pointing: list[float] = []
    n_pos = sum(pairs.labels)
    for start in range(0, len(pairs.images), EVAL_BATCH):
        images = pairs.images[start:start + EVAL_BATCH]
        unique = sorted(set(images))
        rows = torch.tensor([unique.index(i) for i in images], device=device)
        input_ids, attention_mask = tokenize_questions(tokenizer, pairs.questions[start:start + EVAL_BATCH])
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with torch.no_grad():
            embeds = pair_rows(model.encode_image(store.get(unique).to(device)), rows)
            logits = model.itm_logits(embeds, input_ids, attention_mask)
        probs += logits.float().softmax(dim=-1)[:, 1].cpu().tolist()
        cells = [samples[pairs.indices[k]].cells if k < n_pos else None
                 for k in range(start, start + len(images))]
        keep = [k for k, c in enumerate(cells) if c is not None and c.max() > 0]
        if keep:
            heatmap, _ = model.gradcam(embeds[keep], input_ids[keep], attention_mask[keep], block_num)
            best = heatmap.flatten(1).argmax(dim=1).cpu().numpy()
            pointing += [float(cells[k][b] > 0) for k, b in zip(keep, best)]
    model.train(was_training)
    p = np.asarray(probs)
    labels = np.asarray(pairs.labels)
    correct = (p > 0.5) == (labels == 1)
    kinds = np.asarray(["positive"] * n_pos + list(pairs.kinds))
    out: dict[str, Any] = {
        "step": step, "pairs": len(p), "itm_accuracy": float(correct.mean()),
        "positive_accuracy": float(correct[labels == 1].mean()),
        "negative_accuracy": float(correct[labels == 0].mean()),
        "mean_match_prob_positive": float(p[labels == 1].mean()),
        "mean_match_prob_negative": float(p[labels == 0].mean()),
        # ranking quality, threshold-free: P(prob of a positive > prob of a negative)
        "positive_above_negative": float((p[labels == 1][:, None] > p[labels == 0][None, :]).mean()),
        "pointing_game": float(np.mean(pointing)) if pointing else None,
        "pointing_samples": len(pointing), "block_num": block_num,
    }
    for kind in ("swap", "other_image"):
        mask = kinds == kind
        if mask.any():
            out[f"{kind}_accuracy"] = float(correct[mask].mean())
            out[f"{kind}_pairs"] = int(mask.sum())
    return out


def grounding_loss(probs, attention_mask, cells):
    """``-log`` of the cross-attention mass on the referred objects' patches.

    probs ``[N, heads, T, 1+P]`` (one layer's cross-attention of N positives), attention_mask
    ``[N, T]``, cells ``[N, P]`` (> 0 where the referred objects overlap a patch). The mass is
    averaged over heads and over the question tokens ``1..L-2`` (GradCAM's averaging)."""
    import torch

    mask = attention_mask.to(probs.dtype)
    count = mask.sum(dim=1) - 2
    position = torch.arange(mask.shape[1], device=mask.device)
    tokens = ((position[None, :] >= 1) & (position[None, :] <= count[:, None])).to(probs.dtype)   # [N, T]
    inside = (probs[..., 1:].mean(dim=1) * (cells > 0).to(probs.dtype)[:, None, :]).sum(dim=-1)   # [N, T]
    mass = (inside * tokens).sum(dim=1) / count.clamp(min=1)
    return -torch.log(mass.clamp(min=1e-6)).mean()


def check_metrics(weights: Path, *, seed: int = 7000, num_images: int = 24, block_num: int | None = None) -> dict[str, float]:
    """Held-out ITM accuracy (overall, swap negatives) and GradCAM pointing game of the shapes
    ITM ``weights`` on ``num_images`` shapes images of ``seed``: the quick, deterministic check
    that a shipped file still gives its manifest's numbers."""
    import torch

    from models.blip import load_blip_itm, load_blip_tokenizer_for
    from training.data import load_data, source_params

    model, _ = load_blip_itm("shapes", weights)
    block_num = model.config.gradcam_block if block_num is None else block_num
    data = load_data("shapes", source_params("shapes", seed, num_images, {}), mask_grid=model.grid)
    pairs = draw_pairs(data.samples, len(data.samples), np.random.default_rng(seed))
    result = evaluate(model, load_blip_tokenizer_for("shapes"), PixelStore(data, model.config.vit.image_size,
                      num_images), pairs, data.samples, torch.device("cpu"), 0, block_num)
    return {k: result[k] for k in ("itm_accuracy", "swap_accuracy", "pointing_game")}


def load_checkpoint(path: Path) -> dict[str, Any]:
    from training.outputs import load_checkpoint as load

    return load(path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, kind="an ITM")


def save_weights(model, temp, path: Path, metadata: dict[str, str]) -> None:
    """The model's state dict (LAVIS key names) and ``temp``, as safetensors, atomically."""
    from training.outputs import atomic_save_safetensors

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tensors["temp"] = temp.detach().cpu().reshape(()).clone()
    atomic_save_safetensors(tensors, path, metadata)


LOG_COLUMNS = ("loss", "itm_loss", "itc_loss", "grounding_loss", "patch_loss", "accuracy", "lr", "temp")
LOSS_CURVES = (("loss", "tab:blue"), ("itm_loss", "tab:orange"), ("itc_loss", "tab:green"),
               ("grounding_loss", "tab:red"), ("patch_loss", "tab:purple"))  # loss.png


def train(s: ItmSettings, command: Sequence[str] = ()) -> TrainingResult:
    """Run (or resume) a training; returns the per-step losses of the whole run and the metrics."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from models.blip import build_model, load_blip_tokenizer_for, tokenize_questions
    from training.common import initial_blip, initial_blip_fingerprint
    from training import outputs
    from training.data import load_data, source_params
    from training.fusion import pair_rows
    check_settings(s)
    out, ckpt_path, device, resume_state = start_run(s, load_checkpoint)
    init_fingerprint = initial_blip_fingerprint("itm", s.preset, s.init)
    model = (build_model("itm", s.preset, device, empty=True) if resume_state is not None
             else initial_blip("itm", s.preset, s.init, device))
    model.train()
    block_num = model.config.gradcam_block if s.block_num is None else s.block_num
    if s.grounding_weight > 0 or s.eval_images != 0:
        model.check_block_num(block_num)
    run_identity = json.dumps({**s.run_identity(), "init_weights": init_fingerprint}, sort_keys=True)
    check_same_run(resume_state, run_identity, ckpt_path, "--checkpoint-every, --eval-* and, without "
                   "--lr-decay cosine, --steps")

    params = source_params(s.source, s.seed, s.num_images, s.source_params)
    data = load_data(s.source, params, s.limit, mask_grid=model.grid)
    eval_data = eval_params = None
    eval_images = s.num_images if s.eval_images is None else s.eval_images
    held_out = True
    if eval_images != 0:
        fields = type(params).model_fields
        held_out = "seed" in fields
        eval_extra = {k: v for k, v in s.source_params.items() if k not in ("seed", "num_images")}
        eval_params = source_params(s.source, s.held_out_seed, eval_images if "num_images" in fields else None,
                                    eval_extra)
        eval_data = load_data(s.source, eval_params, s.limit, mask_grid=model.grid)
    if s.grounding_weight > 0 and not any(x.cells is not None for x in data.samples):
        raise ValueError(f"--grounding-weight needs ground-truth masks (gt_mask); source {s.source!r} has none")

    tokenizer = load_blip_tokenizer_for(s.preset)
    store = PixelStore(data, model.config.vit.image_size, s.image_cache)
    eval_store = eval_pairs = None
    if eval_data is not None:
        eval_store = PixelStore(eval_data, model.config.vit.image_size, s.image_cache)
        eval_pairs = draw_pairs(eval_data.samples, len(eval_data.samples), np.random.default_rng(s.held_out_seed),
                                s.swap_fraction)

    torch.manual_seed(s.seed)
    temp = torch.nn.Parameter(torch.tensor(float(s.temp), device=device), requires_grad=not s.fixed_temp)
    groups = weight_decay_groups(model, s.weight_decay)
    if not s.fixed_temp:
        groups.append({"params": [temp], "weight_decay": 0.0})
    probe = patch_targets = None
    if s.patch_label_weight > 0:
        if not any(data.scenes):
            raise ValueError(f"--patch-label-weight needs the scene column; source {s.source!r} has none")
        probe = build_probe(model.config.vit.width).to(device)
        groups.append({"params": list(probe.parameters()), "weight_decay": 0.0})
        patch_targets = PatchLabels(data.scenes, model.grid)
    optimizer = torch.optim.AdamW(groups, lr=s.lr)
    log: dict[str, list[float]] = {c: [] for c in LOG_COLUMNS}
    evals: list[dict[str, Any]] = []
    invocations: list[dict[str, Any]] = []
    train_seconds = 0.0
    start = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        model.reset_buffers()
        with torch.no_grad():
            temp.copy_(resume_state["temp"])
        if probe is not None:
            probe.load_state_dict(resume_state["probe"])
        optimizer.load_state_dict(resume_state["optimizer"])
        outputs.set_rng_state(resume_state["rng"], device)
        start = int(resume_state["step"])
        log = {c: resume_state["log"][:, i].tolist() for i, c in enumerate(LOG_COLUMNS)}
        evals = json.loads(resume_state["evals"])
        invocations = json.loads(resume_state["invocations"])
        train_seconds = float(resume_state["train_seconds"])
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    invocations.append({"command": "runtime train itm " + shlex.join(command), "started": started_at,
                        "from_step": start, "to_step": None, "finished": None})

    meta = {
        "training": {k: v for k, v in asdict(s).items() if k not in ("resume", "quiet")},
        "seeds": {"train": s.seed, "source": getattr(params, "seed", None), "eval": s.held_out_seed,
                  "pairs": f"numpy default_rng([{s.seed}, step])", "torch": s.seed},
        "model": {"preset": s.preset, "init": s.init, "init_fingerprint": init_fingerprint,
                  "config": model.config.to_dict(), "parameters": sum(p.numel() for p in model.parameters())},
        "source": {"name": s.source, "params": params.model_dump(mode="json"),
                   "samples": len(data.samples), "images": len(data.images)},
        "eval_source": None if eval_data is None else {
            "name": s.source, "params": eval_params.model_dump(mode="json"), "samples": len(eval_data.samples),
            "images": len(eval_data.images), "held_out": held_out},
        "device": str(device), "torch_threads": torch.get_num_threads(),
    }

    def run_eval(step: int) -> None:
        if eval_pairs is None or any(e["step"] == step for e in evals):
            return
        result = evaluate(model, tokenizer, eval_store, eval_pairs, eval_data.samples, device, step, block_num)
        evals.append(result)
        if not s.quiet:
            print(f"step {step}: held-out ITM accuracy {result['itm_accuracy']:.3f} "
                  f"(positives {result['positive_accuracy']:.3f}, negatives {result['negative_accuracy']:.3f}); "
                  f"pointing game {result['pointing_game']}",
                  file=sys.stderr)

    def save(step: int, final: bool, seconds: float) -> None:
        outputs.save_checkpoint(
            ckpt_path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, step=step,
            model={k: v.detach().cpu() for k, v in model.state_dict().items()}, temp=temp.detach().cpu(),
            probe={} if probe is None else {k: v.detach().cpu() for k, v in probe.state_dict().items()},
            optimizer=optimizer.state_dict(), rng=outputs.rng_state(device), run=run_identity,
            log=torch.tensor([log[c] for c in LOG_COLUMNS], dtype=torch.float64).t()
            .reshape(len(log["loss"]), len(LOG_COLUMNS)),
            evals=json.dumps(evals), invocations=json.dumps(invocations), train_seconds=seconds)
        save_weights(model, temp, out / "itm.safetensors",
                     {"format": "pnpvqa-blip-itm", "preset": s.preset, "step": str(step),
                      "config": json.dumps(model.config.to_dict(), sort_keys=True)})
        outputs.write_log_table_csv(out / "loss.csv", log, LOG_COLUMNS, general=("lr", "temp"))
        if final:
            title = (f"BLIP ITM {s.preset}: ITM + {s.itc_weight:g} x ITC, "
                     f"{len(data.images)} images")
            outputs.write_losses_plot(out / "loss.png", log, LOSS_CURVES, title)
        finished = final and step >= s.steps
        summary = {f"{key}_{end}": mean_or_none(log[key][:10] if end == "first" else log[key][-10:])
                   for key in ("loss", "itm_loss", "itc_loss", "grounding_loss", "patch_loss")
                   for end in ("first", "last")}
        summary.update(train_accuracy_last=mean_or_none(log["accuracy"][-10:]), temp=float(temp.detach()))
        final_eval = outputs.eval_at(evals, step)
        accuracy = {"held_out_itm_accuracy": None if final_eval is None else final_eval["itm_accuracy"]}
        outputs.write_run_records(
            out, meta, invocations, evals, step=step, finished=finished, seconds=seconds, eval_seed=s.held_out_seed,
            summary=summary, config_extra={"weights_fingerprint": outputs_fingerprint(out / "itm.safetensors"),
                                           **accuracy},
            metrics_extra={"held_out": held_out if eval_pairs is not None else None, **accuracy})

    if start == 0:
        run_eval(0)
    positives = positive_indices(data.samples)
    started = time.perf_counter()
    base_seconds = train_seconds
    cls_id = tokenizer.cls_token_id
    bar = tqdm(total=s.steps, initial=min(start, s.steps), desc=f"train itm {s.preset}", unit="step",
               disable=s.quiet, dynamic_ncols=True)
    try:
        for step in range(start, s.steps):
            lr = set_scheduled_lr(optimizer, s.lr, s.warmup, step, s.steps, s.lr_decay)
            batch = draw_pairs(data.samples, s.batch_size, np.random.default_rng([s.seed, step]), s.swap_fraction,
                               s.questions_per_image, positives)
            unique = sorted(set(batch.images))
            rows = torch.tensor([unique.index(i) for i in batch.images], device=device)
            input_ids, attention_mask = tokenize_questions(tokenizer, batch.questions)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            labels = torch.tensor(batch.labels, device=device)

            embeds = model.encode_image(store.get(unique).to(device))              # [U, 1+P, C]
            # keys / values once per image, then one copy per pair
            cross_kv = [(pair_rows(k, rows), pair_rows(v, rows)) for k, v in model.text_encoder.cross_kv(embeds)]
            n_pos = sum(batch.labels)
            cells = [data.samples[i].cells for i in batch.indices]
            grounded = [k for k, c in enumerate(cells) if c is not None and c.max() > 0]
            use_grounding = s.grounding_weight > 0 and bool(grounded)
            text = model.text_encoder(input_ids, attention_mask, cross_kv=cross_kv,
                                      probs_layer=block_num if use_grounding else None)
            logits = model.itm_head(text.hidden[:, 0])
            loss_itm = F.cross_entropy(logits.float(), labels)
            loss_ground = torch.zeros((), device=device)
            if use_grounding:
                target = torch.from_numpy(np.stack([cells[k] for k in grounded])).to(device)
                loss_ground = grounding_loss(text.cross_probs[grounded], attention_mask[grounded], target)
            if s.itc_weight > 0:
                loss_itc = itc_loss(model, embeds, rows[:n_pos], input_ids[:n_pos], attention_mask[:n_pos], cls_id,
                                    temp, batch.images[:n_pos], batch.questions[:n_pos])
                loss = loss_itm + s.itc_weight * loss_itc
            else:
                loss_itc, loss = torch.zeros(()), loss_itm
            loss_patch = torch.zeros((), device=device)
            if probe is not None:
                colour, shape = patch_targets(unique, device)
                logits_patch = probe(embeds[:, 1:])                                    # [U, P, CLASSES]
                loss_patch = patch_label_loss(logits_patch.flatten(0, 1).float(), colour.flatten(),
                                              shape.flatten(), s.patch_object_weight)
            loss = loss + s.grounding_weight * loss_ground + s.patch_label_weight * loss_patch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], s.grad_clip)
            optimizer.step()
            with torch.no_grad():
                temp.clamp_(0.001, 0.5)

            value = finite_loss(loss, step)
            log["loss"].append(value)
            log["itm_loss"].append(float(loss_itm.detach()))
            log["itc_loss"].append(float(loss_itc.detach()))
            log["grounding_loss"].append(float(loss_ground.detach()))
            log["patch_loss"].append(float(loss_patch.detach()))
            log["accuracy"].append(float((logits.argmax(dim=1) == labels).float().mean()))
            log["lr"].append(lr)
            log["temp"].append(float(temp.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", avg=f"{mean_or_none(log['loss'][-20:]):.4f}")
            done = step + 1
            if due(done, s.eval_every, s.steps):
                run_eval(done)
            if due(done, s.checkpoint_every, s.steps):
                save(done, final=False, seconds=base_seconds + time.perf_counter() - started)
    finally:
        bar.close()
    final_eval = finish_run(start=start, steps=s.steps, started=started, base_seconds=base_seconds,
                            run_eval=run_eval, save=save, invocations=invocations, evals=evals)
    return TrainingResult(out=out, steps=len(log["loss"]), losses=log["loss"], metrics=final_eval or {},
                     seconds=time.perf_counter() - started)


def outputs_fingerprint(path: Path) -> str:
    from models.weights import file_fingerprint

    return file_fingerprint(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``runtime train itm``; returns the exit status."""
    return run_command(argv, parser(), settings_from_args, train, "itm.safetensors",
                       lambda m: None if m.get("itm_accuracy") is None else f"held-out ITM accuracy {m['itm_accuracy']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
