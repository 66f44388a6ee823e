"""Held-out evaluation of ``runtime train fusion`` (:mod:`training.fusion`): the frozen ITM's
metrics on held-out pairs through the fused tokens (or the unfused ones, the baseline), the gain
of one over the other, and :func:`check_metrics` / :func:`quick_metrics`, the quick check of a
``fusion.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.fusion import CHECK_KEYS, EVAL_BATCH


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
