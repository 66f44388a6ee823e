"""``runtime train fusion``: train a BLIP + SAM fusion module with frozen BLIP ITM and SAM.

Objective: image-question matching. Each step draws ``batch_size`` samples; each gives a
positive pair (its image, its own question) and a hard negative (its image, a question with a
colour / shape word swapped to one absent from the scene, or the question of another image
whose answer differs; see :mod:`training.pairs`). The frozen ViT tokens and SAM embedding of
the image are fused by the trainable module, the frozen BLIP ITM text encoder + head score the
pairs, and the loss is the cross-entropy of the ITM logits against match / no match. Only the
fusion module's parameters get gradients (AdamW, constant learning rate, gradient clipping).

Determinism: the fusion's initialisation comes from ``--seed``; step ``k``'s pairs are drawn
from ``numpy.random.default_rng([seed, k])`` alone; frozen features are computed in fixed image
chunks. So the same command gives the same weights, and ``--resume`` (which restores the
model, optimizer, step and torch RNG state from ``DIR/checkpoint.pt``) ends with the same
weights as an uninterrupted run (on the same device and threads). Evaluation does not touch
the training state (no RNG draw, the module back in training mode after it), so ``--eval-*``
and ``--block-num`` may change on resume.

Held-out evaluation (at the start, the end and every ``--eval-every`` steps): the same source
with seed ``--eval-seed`` (default seed + 1000), ``--eval-images`` images; every sample gives a
positive and one hard negative (drawn from ``default_rng(eval_seed)``). The frozen ITM scores
each pair on the *fused* tokens: ITM accuracy with the threshold 0.5 on the softmax match
probability (also per positives / negatives and per negative kind: ``swap_accuracy`` on the
colour / shape swaps, ``other_image_accuracy``), the mean ITM cross-entropy, the threshold-free
``positive_above_negative``; and the GradCAM pointing game at ``--block-num`` (LAVIS recipe,
as ``itm_gradcam``, computed through the fused tokens as the ``fusion_gradcam`` graph does) on
the held-out positives that refer to objects: 1 when the heatmap's argmax cell overlaps them.
The same metrics on the *unfused* BLIP tokens (what the graph without fusion gets) are computed
once, as ``baseline`` in ``metrics.json``, with the ``gain`` of the final evaluation over it.
:func:`check_metrics` computes ``itm_accuracy``, ``swap_accuracy`` and ``pointing_game`` of a
weights file with the shapes ITM and SAM on a fixed small set for the shipped file's manifest.

Outputs in ``--out DIR``: ``fusion.safetensors`` (the weights a graph names; config in its
metadata), ``checkpoint.pt`` (resumable), ``loss.csv``, ``loss.png``, ``config.json`` (command
lines, seeds, settings, models, data, device, times), ``metrics.json`` (final held-out metrics,
their history, the unfused baseline, loss summary).
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

from training.common import (HeldOutSeed, TrainingResult, add_checkpoint_option, add_device_options,
                             add_optimisation_options, add_output_options, add_source_options, add_weights_option,
                             check_same_run, due, finish_run, finite_loss, mean_or_none, parse_source_params,
                             run_command, settings_identity, source_num_images, start_run)

DEFAULT_STEPS = 200
CHECKPOINT_FORMAT = "pnpvqa-fusion-training"
CHECKPOINT_VERSION = 1
EVAL_BATCH = 32  # pairs per evaluation forward
BLIP_PRESETS = ("tiny", "shapes", "base", "large")
SAM_PRESETS = ("tiny", "shapes", "vitt", "vits")
CHECK_KEYS = ("itm_accuracy", "swap_accuracy", "pointing_game")  # check_metrics, and the gain over the baseline
# settings that may differ between a run and its --resume continuation
# (the frozen models are compared by their weights' fingerprints, not by file paths;
# evaluation does not change the training)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "quiet", "out", "resume", "feature_cache", "weights",
                     "blip_checkpoint", "sam_checkpoint", "eval_every", "eval_seed", "eval_images", "block_num")


@dataclass
class TrainSettings(HeldOutSeed):
    out: str
    mode: str = "difnet"
    blip_preset: str = "tiny"
    blip_checkpoint: str | None = None
    sam_preset: str = "tiny"
    sam_checkpoint: str | None = None
    weights: str | None = None
    source: str = "shapes"
    seed: int = 0
    num_images: int | None = 16
    source_params: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    steps: int = DEFAULT_STEPS
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    swap_fraction: float = 0.5
    width: int | None = None
    heads: int = 8
    ffn_dim: int = 0
    dropout: float = 0.1
    sam_grid: int = 16
    Lf: int = 1
    T: int = 2
    N: int = 3
    sam_cls: str = "zero"
    formulation: str = "gated"
    identity_map_reordering: bool = False
    difnet_encoder: str | None = None
    checkpoint_every: int = 50
    feature_cache: int = 4096
    feature_batch: int = 16
    device: str = "auto"
    eval_every: int = 0
    eval_seed: int | None = None
    eval_images: int | None = None
    block_num: int | None = None
    resume: bool = False
    quiet: bool = False

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return settings_identity(self, RESUMABLE_CHANGES)


@dataclass
class TrainResult(TrainingResult):
    accuracies: list[float] = field(default_factory=list)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runtime train fusion",
        description="Train a BLIP + EfficientSAM fusion module (concat_conv, cross_attention or difnet) on "
                    "image-question matching with frozen BLIP ITM and SAM. Writes DIR/fusion.safetensors (the "
                    "weights a graph names), DIR/checkpoint.pt, DIR/loss.csv, DIR/loss.png, DIR/config.json, "
                    "DIR/metrics.json (held-out ITM accuracy and GradCAM pointing game on the fused tokens, and "
                    "on the unfused ones as the baseline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_output_options(p)
    m = p.add_argument_group("models")
    m.add_argument("--mode", choices=["concat_conv", "cross_attention", "difnet"], default="difnet")
    m.add_argument("--blip-preset", default="tiny", choices=list(BLIP_PRESETS), help="frozen BLIP ITM "
                   "(shapes: the bundled models/assets/shapes/blip_itm.safetensors)")
    m.add_argument("--blip-checkpoint", metavar="FILE", help="explicit BLIP ITM checkpoint file")
    m.add_argument("--sam-preset", default="tiny", choices=list(SAM_PRESETS), help="frozen EfficientSAM "
                   "(shapes: the bundled models/assets/shapes/efficient_sam.safetensors)")
    m.add_argument("--sam-checkpoint", metavar="FILE", help="explicit EfficientSAM checkpoint file")
    add_weights_option(m)
    f = p.add_argument_group("fusion module")
    f.add_argument("--width", type=int, help="fusion width (default: the BLIP width, at most 256)")
    f.add_argument("--heads", type=int, default=8)
    f.add_argument("--ffn-dim", type=int, default=0, help="DIFNet FFN width (0 = 4 * width)")
    f.add_argument("--dropout", type=float, default=0.1)
    f.add_argument("--sam-grid", type=int, default=16, help="cross_attention: SAM keys resized to this grid")
    f.add_argument("--Lf", type=int, default=1, help="DIFNet: layers per stream before the fusion layer")
    f.add_argument("--T", type=int, default=2, help="DIFNet: applications of each pre-fusion layer per stream")
    f.add_argument("--N", type=int, default=3, help="DIFNet: layers in all (N > Lf)")
    f.add_argument("--sam-cls", choices=["zero", "learned"], default="zero", help="DIFNet: SAM stream CLS slot")
    f.add_argument("--formulation", choices=["gated", "reference"], default="gated",
                   help="DIFNet: gated (one residual per sub-layer) or reference (the published encoder, layer for "
                   "layer; models/fusion/difnet_reference.py)")
    f.add_argument("--identity-map-reordering", action="store_true", help="DIFNet reference: the pre-norm variant")
    f.add_argument("--difnet-encoder", metavar="FILE", help="DIFNet reference: start the encoder from a published "
                   "mrwu-mac/DIFNet checkpoint (its encoder keys, e.g. encoder.layers.N.mhatt...; --width, --heads, "
                   "--ffn-dim, --N must match it)")
    add_source_options(p)
    t = add_optimisation_options(p, steps=DEFAULT_STEPS, batch_size=8, batch_help="positives per step (as many "
                                 "negatives)", lr=1e-3, lr_help="AdamW learning rate (constant)", weight_decay=0.01,
                                 weight_decay_help=None, warmup=False)
    add_checkpoint_option(t)
    t.add_argument("--feature-cache", type=int, default=4096, metavar="IMAGES",
                   help="images whose frozen features stay in memory (training and held-out sets each)")
    t.add_argument("--feature-batch", type=int, default=16, help="images per frozen-feature forward")
    add_device_options(t)
    e = p.add_argument_group("held-out evaluation")
    e.add_argument("--eval-every", type=int, default=0, metavar="N", help="also evaluate every N steps (0 = only "
                   "at the start and the end)")
    e.add_argument("--eval-seed", type=int, help="source seed of the held-out set (default: seed + 1000)")
    e.add_argument("--eval-images", type=int, help="images of the held-out set (default: --num-images; "
                   "0 = no evaluation)")
    e.add_argument("--block-num", type=int, default=None, help="text layer of the held-out GradCAM pointing game "
                   "(as itm_gradcam's block_num; default: the ITM preset's, 7 or shapes 2)")
    return p


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    extra = parse_source_params(args.source_param)
    num_images = source_num_images(args.source, args.num_images, extra)
    return TrainSettings(
        out=args.out, mode=args.mode, blip_preset=args.blip_preset, blip_checkpoint=args.blip_checkpoint,
        sam_preset=args.sam_preset, sam_checkpoint=args.sam_checkpoint, weights=args.weights, source=args.source,
        seed=args.seed, num_images=num_images, source_params=extra, limit=args.limit, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        swap_fraction=args.swap_fraction, width=args.width, heads=args.heads, ffn_dim=args.ffn_dim,
        dropout=args.dropout, sam_grid=args.sam_grid, Lf=args.Lf, T=args.T, N=args.N, sam_cls=args.sam_cls,
        formulation=args.formulation, identity_map_reordering=args.identity_map_reordering,
        difnet_encoder=args.difnet_encoder, checkpoint_every=args.checkpoint_every, feature_cache=args.feature_cache, feature_batch=args.feature_batch,
        device=args.device, eval_every=args.eval_every, eval_seed=args.eval_seed, eval_images=args.eval_images,
        block_num=args.block_num, resume=args.resume, quiet=args.quiet)


def check_settings(s: TrainSettings) -> None:
    for name in ("steps", "batch_size", "feature_cache", "feature_batch"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("checkpoint_every", "eval_every"):
        if getattr(s, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
    if s.eval_images is not None and s.eval_images < 0:
        raise ValueError(f"--eval-images must be >= 0, got {s.eval_images}")
    if not s.lr > 0 or s.weight_decay < 0 or s.grad_clip < 0:
        raise ValueError("--lr must be > 0, --weight-decay and --grad-clip >= 0")
    if not 0.0 <= s.swap_fraction <= 1.0:
        raise ValueError(f"--swap-fraction must be in [0, 1], got {s.swap_fraction}")


def load_checkpoint(path: Path) -> dict[str, Any]:
    from training.outputs import load_checkpoint as load

    return load(path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, kind="a fusion")


# --- held-out evaluation ------------------------------------------------------------------------

def evaluate(itm, tokenizer, fusion, store, pairs, samples, device, step: int, block_num: int) -> dict[str, Any]:
    """Metrics of the frozen ``itm`` on the held-out ``pairs`` (:class:`training.pairs.PairBatch`,
    positives first) with the image tokens of ``fusion(blip_tokens, sam_embed)`` (``fusion=None``:
    the unfused BLIP tokens, the baseline); ``store``: a :class:`training.data.FeatureStore` of
    the held-out images. ITM accuracy (softmax match probability > 0.5 = match), overall, per
    positives / negatives and per negative kind; mean ITM cross-entropy; and the GradCAM pointing
    game at ``block_num`` through the same tokens on the positives whose sample has ``cells``.

    Images are fused one feature chunk at a time (fixed chunks, always the same pairs per
    forward), so the result does not depend on what was evaluated before. No RNG is drawn and
    ``fusion`` gets its training mode back."""
    import torch
    import torch.nn.functional as F

    from models.blip import tokenize_questions

    was_training = fusion.training if fusion is not None else False
    if fusion is not None:
        fusion.eval()
    n = len(pairs.images)
    n_pos = sum(pairs.labels)
    probs, nll = np.zeros(n), np.zeros(n)
    hits = np.full(n, np.nan)
    by_chunk: dict[int, list[int]] = {}
    for k, image in enumerate(pairs.images):
        by_chunk.setdefault(int(image) // store.chunk, []).append(k)
    try:
        for c in sorted(by_chunk):
            chunk = by_chunk[c]
            unique = sorted({pairs.images[k] for k in chunk})
            with torch.no_grad():
                tokens, sam_embed = store.get(unique)
                image_tokens = fusion(tokens, sam_embed) if fusion is not None else tokens    # [U, 1+P, C]
            for start in range(0, len(chunk), EVAL_BATCH):
                batch = chunk[start:start + EVAL_BATCH]
                rows = torch.tensor([unique.index(pairs.images[k]) for k in batch], device=device)
                input_ids, attention_mask = tokenize_questions(tokenizer, [pairs.questions[k] for k in batch])
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                labels = torch.tensor([pairs.labels[k] for k in batch], device=device)
                embeds = image_tokens[rows]
                with torch.no_grad():
                    logits = itm.itm_logits(embeds, input_ids, attention_mask).float()
                probs[batch] = logits.softmax(dim=-1)[:, 1].cpu().numpy()
                nll[batch] = F.cross_entropy(logits, labels, reduction="none").cpu().numpy()
                cells = [samples[pairs.indices[k]].cells if k < n_pos else None for k in batch]
                keep = [j for j, cell in enumerate(cells) if cell is not None and cell.max() > 0]
                if keep:
                    heatmap, _ = itm.gradcam(embeds[keep], input_ids[keep], attention_mask[keep], block_num)
                    best = heatmap.flatten(1).argmax(dim=1).cpu().numpy()
                    for j, b in zip(keep, best):
                        hits[batch[j]] = float(cells[j][b] > 0)
    finally:
        if fusion is not None:
            fusion.train(was_training)
    labels = np.asarray(pairs.labels)
    correct = (probs > 0.5) == (labels == 1)
    kinds = np.asarray(["positive"] * n_pos + list(pairs.kinds))
    pointing = hits[~np.isnan(hits)]
    out: dict[str, Any] = {
        "step": step, "tokens": "fused" if fusion is not None else "unfused", "pairs": n,
        "itm_accuracy": float(correct.mean()),
        "positive_accuracy": float(correct[labels == 1].mean()),
        "negative_accuracy": float(correct[labels == 0].mean()),
        "itm_loss": float(nll.mean()),
        "mean_match_prob_positive": float(probs[labels == 1].mean()),
        "mean_match_prob_negative": float(probs[labels == 0].mean()),
        # ranking quality, threshold-free: P(prob of a positive > prob of a negative)
        "positive_above_negative": float((probs[labels == 1][:, None] > probs[labels == 0][None, :]).mean()),
        "pointing_game": float(pointing.mean()) if len(pointing) else None,
        "pointing_samples": int(len(pointing)), "block_num": block_num,
    }
    for kind in ("swap", "other_image"):
        mask = kinds == kind
        out[f"{kind}_accuracy"] = float(correct[mask].mean()) if mask.any() else None
        out[f"{kind}_pairs"] = int(mask.sum())
    return out


def gain(result: dict[str, Any] | None, baseline: dict[str, Any] | None) -> dict[str, float | None] | None:
    """``result - baseline`` for :data:`CHECK_KEYS` and ``positive_above_negative``."""
    if result is None or baseline is None:
        return None
    return {k: None if result.get(k) is None or baseline.get(k) is None else result[k] - baseline[k]
            for k in (*CHECK_KEYS, "positive_above_negative")}


def check_metrics(weights: Path, *, seed: int = 7000, num_images: int = 24) -> dict[str, float]:
    """Held-out ITM accuracy (overall, swap negatives) and GradCAM pointing game (block 7) of the
    fusion ``weights`` (its mode and config from the file) with the shapes ITM and SAM on
    ``num_images`` shapes images of ``seed`` (every question; negatives from ``default_rng(seed)``):
    the quick, deterministic check that a shipped file still gives its manifest's numbers."""
    return quick_metrics(weights, blip_preset="shapes", sam_preset="shapes", seed=seed, num_images=num_images)


def quick_metrics(weights: Path, *, blip_preset: str, sam_preset: str, seed: int = 7000, num_images: int = 24,
                  block_num: int | None = None, blip_checkpoint: str | None = None,
                  sam_checkpoint: str | None = None) -> dict[str, float]:
    """:func:`check_metrics` with any frozen BLIP ITM and EfficientSAM (on the CPU)."""
    import torch

    from models.blip import load_blip_itm, load_blip_tokenizer_for
    from models.efficient_sam import load_efficient_sam
    from models.fusion import load_fusion
    from training.data import FeatureStore, load_data, source_params
    from training.pairs import draw_pairs

    device = torch.device("cpu")
    itm, _ = load_blip_itm(blip_preset, blip_checkpoint, device=device)
    sam, _ = load_efficient_sam(sam_preset, sam_checkpoint, device=device)
    for frozen in (itm, sam):
        frozen.eval().requires_grad_(False)
    block_num = itm.config.gradcam_block if block_num is None else block_num
    itm.check_block_num(block_num)
    fusion, _ = load_fusion(weights, {"blip_width": itm.config.vit.width, "grid": itm.grid,
                                      "sam_dim": sam.config.embed_dim}, device)
    fusion.requires_grad_(False)
    data = load_data("shapes", source_params("shapes", seed, num_images, {}), mask_grid=itm.grid)
    pairs = draw_pairs(data.samples, len(data.samples), np.random.default_rng(seed))
    store = FeatureStore(data, itm, sam, device, chunk=16, max_cached=max(16, len(data.images)))
    result = evaluate(itm, load_blip_tokenizer_for(blip_preset), fusion, store, pairs, data.samples, device, 0,
                      block_num)
    return {k: result[k] for k in CHECK_KEYS}


# --- training -----------------------------------------------------------------------------------

def train(s: TrainSettings, command: Sequence[str] = ()) -> TrainResult:
    """Run (or resume) a training; returns the per-step losses of the whole run and the final
    held-out metrics."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from models.blip import load_blip_itm, load_blip_tokenizer_for, tokenize_questions
    from models.blip.checkpoint import itm_fingerprint
    from models.efficient_sam import load_efficient_sam
    from models.efficient_sam import weights_fingerprint as sam_fingerprint
    from models.fusion import FusionConfig, build_fusion, fusion_fingerprint, load_reference_encoder, save_fusion
    from models.weights import load_checkpoint as load_weights_file
    from training import outputs
    from training.data import FeatureStore, load_data, source_params
    from training.pairs import draw_pairs

    check_settings(s)
    out, ckpt_path, device, resume_state = start_run(s, load_checkpoint)
    fingerprints = {"blip_weights": itm_fingerprint(s.blip_preset, s.blip_checkpoint),
                    "sam_weights": sam_fingerprint(s.sam_preset, s.sam_checkpoint)}
    run_identity = json.dumps({**s.run_identity(), **fingerprints}, sort_keys=True)
    check_same_run(resume_state, run_identity, ckpt_path, "--steps, --checkpoint-every, --eval-* and --block-num")

    # frozen models, eval mode, no gradients
    itm, _ = load_blip_itm(s.blip_preset, s.blip_checkpoint, device=device)
    sam, _ = load_efficient_sam(s.sam_preset, s.sam_checkpoint, device=device)
    for frozen in (itm, sam):
        frozen.eval().requires_grad_(False)
    tokenizer = load_blip_tokenizer_for(s.blip_preset)

    blip_width = itm.config.vit.width
    config = FusionConfig(mode=s.mode, blip_width=blip_width, sam_dim=sam.config.embed_dim, grid=itm.grid,
                          width=s.width or min(blip_width, 256), heads=s.heads, ffn_dim=s.ffn_dim,
                          dropout=s.dropout, sam_grid=s.sam_grid, Lf=s.Lf, T=s.T, N=s.N, sam_cls=s.sam_cls,
                          formulation=s.formulation if s.mode == "difnet" else "gated",
                          identity_map_reordering=s.identity_map_reordering)
    params = source_params(s.source, s.seed, s.num_images, s.source_params)
    data = load_data(s.source, params, s.limit)
    store = FeatureStore(data, itm, sam, device, chunk=s.feature_batch, max_cached=s.feature_cache)

    # the held-out set: the same source with another seed (the training data when it has none)
    eval_data = eval_params = eval_store = eval_pairs = None
    eval_images = s.num_images if s.eval_images is None else s.eval_images
    held_out = True
    block_num = itm.config.gradcam_block if s.block_num is None else s.block_num
    if eval_images != 0:
        itm.check_block_num(block_num)
        fields = type(params).model_fields
        held_out = "seed" in fields
        eval_extra = {k: v for k, v in s.source_params.items() if k not in ("seed", "num_images")}
        eval_params = source_params(s.source, s.held_out_seed, eval_images if "num_images" in fields else None,
                                    eval_extra)
        eval_data = load_data(s.source, eval_params, s.limit, mask_grid=itm.grid)
        eval_store = FeatureStore(eval_data, itm, sam, device, chunk=s.feature_batch, max_cached=s.feature_cache)
        eval_pairs = draw_pairs(eval_data.samples, len(eval_data.samples), np.random.default_rng(s.held_out_seed),
                                s.swap_fraction)

    torch.manual_seed(s.seed)
    model = build_fusion(config)
    if s.difnet_encoder:
        report = load_reference_encoder(model, load_weights_file(s.difnet_encoder), s.difnet_encoder)
        print(f"DIFNet encoder from {s.difnet_encoder}: {report.summary()}", file=sys.stderr)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    losses: list[float] = []
    accuracies: list[float] = []
    evals: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    invocations: list[dict[str, Any]] = []
    train_seconds = 0.0
    start = 0
    if resume_state is not None:
        if resume_state["fusion_config"] != config.to_json():
            raise ValueError(f"--resume: {ckpt_path} holds a fusion module of another configuration")
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        outputs.set_rng_state(resume_state["rng"], device)
        start = int(resume_state["step"])
        losses = resume_state["losses"].tolist()
        accuracies = resume_state["accuracies"].tolist()
        # checkpoints written before the held-out evaluation existed have none of these
        evals = json.loads(resume_state.get("evals", "[]"))
        baseline = json.loads(resume_state.get("baseline", "null"))
        invocations = json.loads(resume_state.get("invocations", "[]"))
        train_seconds = float(resume_state.get("train_seconds", 0.0))
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    invocations.append({"command": "runtime train fusion " + shlex.join(command), "started": started_at,
                        "from_step": start, "to_step": None, "finished": None})

    blip_meta = {"preset": s.blip_preset, "checkpoint": s.blip_checkpoint, "fingerprint": fingerprints["blip_weights"],
                 "config": itm.config.to_dict()}
    sam_meta = {"preset": s.sam_preset, "checkpoint": s.sam_checkpoint, "fingerprint": fingerprints["sam_weights"],
                "config": sam.config.to_dict()}
    meta = {
        "fusion": config.to_dict(),
        "training": {k: v for k, v in asdict(s).items() if k not in ("resume", "quiet")},
        "seeds": {"train": s.seed, "source": getattr(params, "seed", None), "eval": s.held_out_seed,
                  "pairs": f"numpy default_rng([{s.seed}, step])",
                  "eval_pairs": f"numpy default_rng({s.held_out_seed})", "torch": s.seed},
        "model": {"mode": s.mode, "config": config.to_dict(),
                  "parameters": sum(p.numel() for p in model.parameters()), "blip": blip_meta, "sam": sam_meta},
        "blip": blip_meta,
        "sam": sam_meta,
        "source": {"name": s.source, "params": params.model_dump(mode="json"),
                   "samples": len(data.samples), "images": len(data.images)},
        "eval_source": None if eval_data is None else {
            "name": s.source, "params": eval_params.model_dump(mode="json"), "samples": len(eval_data.samples),
            "images": len(eval_data.images), "pairs": len(eval_pairs.images), "held_out": held_out},
        "device": str(device), "torch_threads": torch.get_num_threads(),
    }

    def report(result: dict[str, Any], what: str) -> None:
        if not s.quiet:
            print(f"{what}: held-out ITM accuracy {_fmt(result['itm_accuracy'])} (positives "
                  f"{_fmt(result['positive_accuracy'])}, negatives {_fmt(result['negative_accuracy'])}, swap "
                  f"negatives {_fmt(result['swap_accuracy'])}); pointing game {_fmt(result['pointing_game'])}",
                  file=sys.stderr)

    def run_eval(step: int) -> None:
        nonlocal baseline
        if eval_pairs is None:
            return
        if baseline is None:
            baseline = evaluate(itm, tokenizer, None, eval_store, eval_pairs, eval_data.samples, device, step,
                                block_num)
            report(baseline, "unfused BLIP tokens (baseline)")
        if any(e["step"] == step for e in evals):
            return
        result = evaluate(itm, tokenizer, model, eval_store, eval_pairs, eval_data.samples, device, step,
                          block_num)
        evals.append(result)
        report(result, f"step {step}")

    def save(step: int, final: bool, seconds: float) -> None:
        outputs.save_checkpoint(
            ckpt_path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, step=step,
            model={k: v.detach().cpu() for k, v in model.state_dict().items()},
            optimizer=optimizer.state_dict(), rng=outputs.rng_state(device), fusion_config=config.to_json(),
            run=run_identity, losses=torch.tensor(list(losses), dtype=torch.float64),
            accuracies=torch.tensor(list(accuracies), dtype=torch.float64),
            evals=json.dumps(evals), baseline=json.dumps(baseline), invocations=json.dumps(invocations),
            train_seconds=seconds)
        save_fusion(model, config, out / "fusion.safetensors")
        outputs.write_loss_csv(out / "loss.csv", losses, accuracies)
        if final:
            outputs.write_loss_plot(out / "loss.png", losses, f"fusion {s.mode}: BLIP {s.blip_preset} + "
                                    f"SAM {s.sam_preset}, {len(data.images)} images", "ITM cross-entropy")
        finished = final and step >= s.steps
        summary = {"loss_first": mean_or_none(losses[:10]), "loss_last": mean_or_none(losses[-10:]),
                   "train_accuracy_last": mean_or_none(accuracies[-10:])}
        final_eval = outputs.eval_at(evals, step)
        accuracy = {"held_out_itm_accuracy": None if final_eval is None else final_eval["itm_accuracy"]}
        outputs.write_run_records(
            out, meta, invocations, evals, step=step, finished=finished, seconds=seconds, eval_seed=s.held_out_seed,
            summary=summary, config_extra={"fusion_fingerprint": fusion_fingerprint(out / "fusion.safetensors"),
                                           **accuracy},
            metrics_extra={"held_out": held_out if eval_pairs is not None else None, "baseline": baseline,
                           "gain": gain(final_eval, baseline), **accuracy})

    if start == 0:
        run_eval(0)
    started = time.perf_counter()
    base_seconds = train_seconds
    bar = tqdm(total=s.steps, initial=min(start, s.steps), desc=f"train fusion {s.mode}", unit="step",
               disable=s.quiet, dynamic_ncols=True)
    try:
        for step in range(start, s.steps):
            batch = draw_pairs(data.samples, s.batch_size, np.random.default_rng([s.seed, step]), s.swap_fraction)
            unique = sorted(set(batch.images))
            rows = torch.tensor([unique.index(i) for i in batch.images], device=device)
            blip_tokens, sam_embed = store.get(unique)
            input_ids, attention_mask = tokenize_questions(tokenizer, batch.questions)
            labels = torch.tensor(batch.labels, device=device)

            fused = model(blip_tokens, sam_embed)                             # [U, 1+P, C1]
            logits = itm.itm_logits(pair_rows(fused, rows), input_ids.to(device), attention_mask.to(device))
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()

            value = finite_loss(loss, step)
            losses.append(value)
            accuracies.append(float((logits.argmax(dim=1) == labels).float().mean()))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", avg=f"{mean_or_none(losses[-20:]):.4f}")
            done = step + 1
            if due(done, s.eval_every, s.steps):
                run_eval(done)
            if due(done, s.checkpoint_every, s.steps):
                save(done, final=False, seconds=base_seconds + time.perf_counter() - started)
    finally:
        bar.close()
    final_eval = finish_run(start=start, steps=s.steps, started=started, base_seconds=base_seconds,
                            run_eval=run_eval, save=save, invocations=invocations, evals=evals)
    return TrainResult(out=out, steps=len(losses), losses=losses, accuracies=accuracies,
                       seconds=time.perf_counter() - started, metrics=final_eval or {})


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def pair_rows(fused, rows):
    """``fused [U, 1+P, C]`` -> ``[R, 1+P, C]`` with row ``r = fused[rows[r]]``, as a one-hot
    matmul: the values are exact copies, and the backward pass (a sum per image) is
    deterministic, unlike the backward of ``fused[rows]`` (``index_put_`` with accumulation,
    whose multi-threaded CPU kernel adds the repeated rows in a varying order)."""
    import torch.nn.functional as F

    onehot = F.one_hot(rows, fused.shape[0]).to(fused.dtype)                 # [R, U]
    return (onehot @ fused.flatten(1)).view(rows.shape[0], *fused.shape[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``runtime train fusion``; returns the exit status."""
    return run_command(argv, parser(), settings_from_args, train, "fusion.safetensors",
                       lambda m: None if m.get("itm_accuracy") is None else f"held-out ITM accuracy {m['itm_accuracy']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
