"""Held-out evaluation of ``runtime train qavit`` (:mod:`training.qavit`), at the start, the end
and every ``--eval-every`` steps: the shapes source with seed ``--eval-seed`` (default seed +
1000), ``--eval-images`` images, every question. The heatmaps are the stage's
(``qavit_attention`` with mode layer, block_num -1): pointing game (the argmax cell of the heatmap
at the model grid overlaps the referred mask), energy in mask (``heatmap_metrics``' definition),
both also at the captioner's 24x24 grid after the stage's bilinear resampling, per question type,
against the chance level of a random cell; how much the heatmaps of an image's questions differ
(total variation); and the answer head's accuracy. :func:`check_metrics` is the quick check of a
shipped ``qavit.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.qavit import EVAL_IMAGES_PER_BATCH, OUTPUT_GRID
from training.qavit_data import EvalSet, eval_set, make_batch




def evaluate(qavit, tokenizer, preset: str, data: EvalSet, device, step: int, *, answer_head=None,
             max_question_tokens: int = 30) -> dict[str, Any]:
    """Held-out metrics of the stage's heatmap (``qavit_attention``, mode layer, block_num -1) and,
    with ``answer_head``, of the answers. Does not change the model's state (mode restored)."""
    from grids import pool_to_grid
    from stages.qavit import QAViTAttention, resample_heatmaps

    stage = QAViTAttention(QAViTAttention.Params(preset=preset, mode="layer", block_num=-1,
                                                 max_question_tokens=max_question_tokens))
    stage.model, stage.tokenizer, stage.device = qavit, tokenizer, str(device)
    grid = qavit.config.grid
    was_training = qavit.training
    qavit.eval()
    if answer_head is not None:
        answer_head.eval()
    rows: dict[str, list] = {k: [] for k in ("type", "grounded", "pointing", "energy", "pointing_24", "energy_24",
                                             "chance", "correct")}
    spreads: list[float] = []
    try:
        for start in range(0, len(data.rendered), EVAL_IMAGES_PER_BATCH):
            chunk = data.rendered[start:start + EVAL_IMAGES_PER_BATCH]
            batch = make_batch(chunk, qavit.config.image_size, grid)
            if not batch.questions:
                continue
            native = stage.native_heatmaps(batch.pixels, batch.questions, batch.image_rows)   # [B, g, g]
            heat = native.reshape(len(native), -1).astype(np.float64)
            heat24 = resample_heatmaps(native, OUTPUT_GRID).reshape(len(native), -1).astype(np.float64)
            for b, mask in enumerate(batch.masks):
                rows["type"].append(batch.types[b])
                rows["grounded"].append(mask is not None)
                if mask is None:
                    for key in ("pointing", "energy", "pointing_24", "energy_24", "chance"):
                        rows[key].append(np.nan)
                    continue
                for key, h, frac in (("", heat[b], batch.cells[b].astype(np.float64)),
                                     ("_24", heat24[b], pool_to_grid(mask[None], OUTPUT_GRID).reshape(-1))):
                    positive = np.clip(h, 0, None)
                    rows["pointing" + key].append(float(frac[int(h.argmax())] > 0))
                    rows["energy" + key].append(float((positive * frac).sum() / positive.sum())
                                                if positive.sum() > 0 else np.nan)
                rows["chance"].append(float((batch.cells[b] > 0).mean()))
            for u in range(len(chunk)):  # how much an image's heatmaps differ between its questions
                maps = np.clip(heat[batch.image_rows == u], 0, None)
                maps = maps / np.maximum(maps.sum(axis=1, keepdims=True), 1e-12)
                if len(maps) > 1:
                    i, j = np.triu_indices(len(maps), k=1)
                    spreads.append(float(0.5 * np.abs(maps[i] - maps[j]).sum(axis=1).mean()))
            if answer_head is not None:
                enc = tokenizer(batch.questions, padding="longest", truncation=True, max_length=max_question_tokens,
                                return_tensors="pt")
                with torch.no_grad():
                    states, qmask = qavit.encode_question(enc["input_ids"].to(device), enc["attention_mask"].to(device))
                    out = qavit(torch.from_numpy(batch.pixels).to(device), states, qmask, output_attentions=False,
                                image_rows=torch.from_numpy(batch.image_rows).to(device))
                    cls = qavit.vision.vision_model.post_layernorm(out.last_hidden_state[:, 0])
                    predicted = answer_head(cls).argmax(dim=1).cpu().numpy()
                rows["correct"] += (predicted == batch.answers).astype(float).tolist()
    finally:
        qavit.train(was_training)
        if answer_head is not None:
            answer_head.train(was_training)

    types = np.asarray(rows["type"])
    grounded = np.asarray(rows["grounded"], bool)

    def mean(key: str, select=None) -> float | None:
        values = np.asarray(rows[key], np.float64)
        if select is not None:
            values = values[select]
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else None

    result: dict[str, Any] = {
        "step": step, "questions": len(types), "grounded_questions": int(grounded.sum()), "grid": grid,
        "pointing_game": mean("pointing"), "energy_in_mask": mean("energy"),
        "pointing_game_24": mean("pointing_24"), "energy_in_mask_24": mean("energy_24"),
        "pointing_chance": mean("chance"),
        "question_spread": float(np.mean(spreads)) if spreads else None,
        "answer_accuracy": mean("correct") if answer_head is not None else None,
    }
    for kind in sorted(set(types.tolist())):
        select = types == kind
        result[f"pointing_game_{kind}"] = mean("pointing", select)
        if answer_head is not None:
            result[f"answer_accuracy_{kind}"] = mean("correct", select)
    return result


def check_metrics(weights: Path, *, seed: int = 7000, num_images: int = 24) -> dict[str, float]:
    """Pointing game and energy in mask of the stage's heatmap (mode layer, block_num -1, at the
    model grid) and the answer accuracy (when the file has an answer head) of the QA-ViT
    ``weights`` (a ``qavit.safetensors`` of ``runtime train qavit``; its preset from the file's
    metadata, default ``shapes``) on ``num_images`` held-out shapes images of ``seed`` (every
    question): the quick, deterministic check that a shipped file still gives its manifest's
    numbers."""
    from models.qavit.checkpoint import safetensors_metadata, load_qavit
    from models.weights import load_checkpoint

    weights = Path(weights)
    meta = safetensors_metadata(weights)
    preset = meta.get("preset", "shapes")
    model, tokenizer, _ = load_qavit(preset, weights)
    state = load_checkpoint(weights)
    head = None
    if "answer_head.weight" in state:
        head = torch.nn.Linear(state["answer_head.weight"].shape[1], state["answer_head.weight"].shape[0])
        head.load_state_dict({"weight": state["answer_head.weight"], "bias": state["answer_head.bias"]})
        head.eval()
    result = evaluate(model, tokenizer, preset, eval_set(seed, num_images), torch.device("cpu"), 0, answer_head=head,
                      max_question_tokens=int(meta.get("max_question_tokens", 30)))
    keys = ("pointing_game", "energy_in_mask") + (("answer_accuracy",) if head is not None else ())
    return {k: float(result[k]) for k in keys if result[k] is not None}
