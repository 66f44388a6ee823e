"""Held-out evaluation of ``runtime train sam`` (:mod:`training.sam`), at the start, the end and
every ``--eval-every`` steps: ``--eval-images`` scenes of seed ``--eval-seed`` (default seed +
1000); for every object one 1-point and one 3-point prompt (foreground points drawn uniformly
from the object, from ``default_rng(eval_seed)``), decoded with the pipeline's call
(``predict_masks``, multimask, low-res logits); the candidate of best predicted IoU is kept, as
``sam_mask`` does. Metrics: ``miou_1pt`` / ``miou_3pt`` (mean IoU of the kept mask with the
object at the low-res size), ``iou50_1pt`` / ``iou50_3pt`` (share of prompts whose kept mask has
IoU >= 0.5), and, as diagnostics, ``oracle_miou_*`` (the best candidate's IoU) and
``iou_error_*`` (mean absolute error of the kept candidate's predicted IoU).
:func:`check_metrics` computes the first four on a fixed small set for the shipped file's
manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.sam import EVAL_BATCH, _recorded_preset, mask_iou
from training.sam_data import EVAL_POINTS, EvalPrompt, ShapesScenes, eval_prompts

HIT_IOU = 0.5             # iou50_*: share of prompts whose kept mask reaches this IoU
METRIC_KEYS = tuple(f"{m}_{n}pt" for n in EVAL_POINTS for m in ("miou", "iou50"))


def evaluate(model, scenes: ShapesScenes, prompts: Sequence[EvalPrompt], device, step: int) -> dict[str, Any]:
    """Held-out metrics of the kept (best predicted IoU) candidate, as ``sam_mask`` keeps it."""
    import torch

    was_training = model.training
    model.eval()
    size = scenes.params.image_size
    by_image: dict[int, list[int]] = {}
    for k, p in enumerate(prompts):
        by_image.setdefault(p.image, []).append(k)
    kept_iou = np.zeros(len(prompts))
    best_iou = np.zeros(len(prompts))
    iou_err = np.zeros(len(prompts))
    images = sorted(by_image)
    with torch.no_grad():
        for start in range(0, len(images), EVAL_BATCH):
            chunk = images[start:start + EVAL_BATCH]
            emb = model.embed(model.preprocess(np.stack([scenes[i].image for i in chunk]), channels_last=True))
            index = [k for i in chunk for k in by_image[i]]
            rows = torch.tensor([chunk.index(prompts[k].image) for k in index], device=device)
            points = torch.from_numpy(np.stack([prompts[k].points for k in index])[:, None]).to(device)
            labels = torch.from_numpy(np.stack([prompts[k].labels for k in index])[:, None]).to(device)
            logits, iou = model.predict_masks(emb[rows], points, labels, input_size=(size, size))
            logits, iou = logits[:, 0].float(), iou[:, 0].float()                    # [P, 3, L, L], [P, 3]
            targets = torch.from_numpy(np.stack([scenes[prompts[k].image].targets[prompts[k].obj]
                                                 for k in index])).to(device)[:, None]
            actual = mask_iou(logits, targets)                                        # [P, 3]
            choice = iou.argmax(dim=1, keepdim=True)
            kept = actual.gather(1, choice)[:, 0]
            kept_iou[index] = kept.cpu().numpy()
            best_iou[index] = actual.max(dim=1).values.cpu().numpy()
            iou_err[index] = (iou.gather(1, choice)[:, 0] - kept).abs().cpu().numpy()
    model.train(was_training)
    result: dict[str, Any] = {"step": step, "images": len(images), "prompts": len(prompts)}
    for n in EVAL_POINTS:
        sel = np.array([p.num_points == n for p in prompts], bool)
        any_ = bool(sel.any())
        result[f"miou_{n}pt"] = float(kept_iou[sel].mean()) if any_ else None
        result[f"iou50_{n}pt"] = float((kept_iou[sel] >= HIT_IOU).mean()) if any_ else None
        result[f"oracle_miou_{n}pt"] = float(best_iou[sel].mean()) if any_ else None
        result[f"iou_error_{n}pt"] = float(iou_err[sel].mean()) if any_ else None
    return result


def check_metrics(weights: Path, *, seed: int = 7000, num_images: int = 24, preset: str | None = None,
                  ) -> dict[str, float]:
    """Held-out mIoU and IoU >= 0.5 share of the kept mask for 1- and 3-point prompts of the
    EfficientSAM ``weights`` on every object of ``num_images`` shapes scenes of ``seed`` (prompts
    from ``default_rng(seed)``): the quick, deterministic check that a shipped file still gives
    its manifest's numbers. ``preset``: default the one recorded in the file (else ``shapes``)."""
    import torch

    from models.efficient_sam.checkpoint import load_efficient_sam
    from training.data import source_params

    weights = Path(weights)
    if preset is None:
        preset = _recorded_preset(weights) or "shapes"
    model, _ = load_efficient_sam(preset, weights)
    scenes = ShapesScenes(source_params("shapes", seed, num_images, {}), num_images,
                          model.config.low_res_size, keep=True)
    prompts = eval_prompts(scenes, np.random.default_rng(seed), model.config.max_points)
    with _threads(1):
        result = evaluate(model, scenes, prompts, torch.device("cpu"), 0)
    return {k: result[k] for k in METRIC_KEYS}


class _threads:
    """Run with ``n`` torch threads (the quick check is fastest and reproducible so)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        import torch

        torch.set_num_threads(self.before)
