"""Held-out evaluation of ``runtime train itm`` (:mod:`training.itm`): ITM accuracy on held-out
pairs (positives and hard negatives) and the GradCAM pointing game on the positives that refer
to objects."""

from __future__ import annotations

from typing import Any

import numpy as np

from training.data import PixelStore

EVAL_BATCH = 32  # pairs per evaluation forward


def evaluate(model, tokenizer, store: PixelStore, pairs, samples, device, step: int, block_num: int) -> dict[str, Any]:
    """ITM accuracy (softmax match probability > 0.5 = match) on the held-out pairs, and the
    GradCAM pointing game at ``block_num`` on the positives whose sample has ``cells``."""
    import torch

    from models.blip import tokenize_questions
    from training.pairs import pair_rows

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
