"""``runtime train sam``: train EfficientSAM (every parameter) to segment the object under point prompts.

The pipeline's ``sam_mask`` stage prompts EfficientSAM with the question heatmap's peak points
(1-5 foreground points, usually on one object, sometimes background points) and keeps the
candidate mask of best predicted IoU. This command trains for exactly that on the synthetic
``shapes`` scenes (:func:`shapes.dataset.render_scene`: flat-coloured shapes on plain or
textured backgrounds with exact per-object masks).

Prompt sampling, per step: ``--batch-size`` images drawn uniformly (with replacement) from the
``--num-images`` training scenes, each encoded once; ``--prompts-per-image`` prompt sets per image
on its objects (a random permutation of the objects, repeated to fill the prompts). A prompt set
is ``1..--max-points`` foreground points (label 1; the count uniform) drawn uniformly from the
object's pixels, plus, with probability ``--negative-fraction``, one background point (label 0)
drawn uniformly from the pixels off the object; it is padded to the model's ``max_points`` with
label -1 at (-1, -1), as :meth:`EfficientSam.prepare_points` pads. Points are pixel coordinates
``(x, y) = (column, row)`` of the scene.

Losses, at the decoder's low-res size (``low_res_size``: 64 for ``tiny`` / ``shapes``) against
the object's mask area-pooled to that size and thresholded at 0.5:

- mask loss: per candidate mask, the mean per-pixel binary cross-entropy on the logits plus the
  soft Dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` of the sigmoid; the minimum over the 3
  multimask candidates (as SAM: only the best candidate is pulled to the target, so the
  candidates can cover several plausible masks), plus the same loss of the single-mask output
  (``multimask=False``) so that it is trained too;
- IoU loss (weight ``--iou-weight``): mean squared error between the predicted IoU of each of
  the 4 outputs and the actual IoU of its binarised mask (logit > 0) with the target.

Every parameter is trained, the image encoder included (from scratch for ``tiny`` / ``shapes``).
AdamW (no weight decay on biases / norms), linear warmup over ``--warmup`` steps then a
constant learning rate (``--lr-decay cosine``: a cosine decay to 0 at ``--steps``), gradient
clipping.

Initialisation: ``tiny`` / ``shapes`` without ``--init`` start from the preset's seeded random
init (the same in every process); ``--init FILE`` loads a checkpoint (``efficient_sam_*.pt`` or
a previous ``efficient_sam.safetensors``) into the preset; ``vitt`` / ``vits`` need ``--init`` or
their standard file in the weights folder.

Determinism: step ``k``'s images and prompts come from ``numpy.random.default_rng([seed, k])``
alone; scenes are rendered per image, preprocessed per image; the model has no dropout and no
random op. So the same command gives the same weights, and ``--resume`` (model, optimiser, step
and torch RNG state from ``DIR/checkpoint.pt``) ends with the same weights as an uninterrupted
run (same device and threads). Evaluation does not touch the training state.

Held-out evaluation (at the start, the end and every ``--eval-every`` steps; every object of
``--eval-images`` scenes of seed ``--eval-seed`` under 1- and 3-point prompts): :mod:`training.sam_eval`.
Data and prompts: :mod:`training.sam_data`.

Outputs in ``--out DIR``: ``efficient_sam.safetensors`` (the state dict with the published key
names; ``load_efficient_sam(preset, path)`` reads it), ``checkpoint.pt`` (resumable, atomic,
``weights_only``), ``loss.csv`` (loss, mask loss, IoU loss, training mIoU of the kept mask, learning
rate), ``loss.png``, ``config.json`` (command lines, seeds, settings, model, data, device, times),
``metrics.json`` (final held-out metrics, their history, loss summary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.efficient_sam.config import PRESETS
from training.common import add_model_options
from training.data import ShapesSettings
from training.loop import Options, Step, Trainer
from training.sam_data import EVAL_POINTS, ShapesScenes, StepBatch, draw_batch, eval_prompts

EVAL_BATCH = 8            # held-out images per embedding call


# --- settings ---------------------------------------------------------------------------------

@dataclass
class SamSettings(ShapesSettings):
    preset: str = "tiny"
    init: str | None = None
    weights: str | None = None
    prompts_per_image: int = 4
    max_points: int = 3
    negative_fraction: float = 0.2
    iou_weight: float = 1.0


# --- losses and metrics -----------------------------------------------------------------------

def mask_iou(logits, targets):
    """IoU of ``logits > 0`` with 0/1 ``targets`` (broadcast), over the last two axes (no grad);
    1 where both are empty."""
    import torch

    with torch.no_grad():
        pred = logits > 0
        tgt = targets > 0.5
        inter = (pred & tgt).sum((-2, -1)).float()
        union = (pred | tgt).sum((-2, -1)).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_losses(logits, targets):
    """Per mask: mean BCE on the logits + soft Dice of the sigmoid; ``logits [..., L, L]``,
    ``targets`` broadcastable -> ``[...]``."""
    import torch.nn.functional as F

    targets = targets.expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((-2, -1))
    prob = logits.sigmoid()
    inter = (prob * targets).sum((-2, -1))
    dice = 1 - (2 * inter + 1) / (prob.sum((-2, -1)) + targets.sum((-2, -1)) + 1)
    return bce + dice


def decode_all(model, embeddings, points, labels, input_size):
    """Every decoder output for ``Q`` prompt sets per image: masks ``[B, Q, 4, L, L]`` (output 0 the
    single-mask one, 1..3 the multimask candidates) and predicted IoU ``[B, Q, 4]``. The same
    computation as :meth:`EfficientSam.predict_masks` (low-res, no upsampling), all outputs kept."""
    scaled, labels = model.prepare_points(points, labels, input_size)
    b, q, n, _ = scaled.shape
    tokens = model.prompt_encoder(scaled.reshape(b * q, n, 2), labels.reshape(b * q, n)).to(embeddings.dtype)
    image = embeddings.repeat_interleave(q, dim=0)
    pe = model.prompt_encoder.dense_pe().to(embeddings.dtype)
    masks, iou = model.mask_decoder.predict(image, pe, tokens)
    return masks.reshape(b, q, *masks.shape[1:]), iou.reshape(b, q, -1)


def training_loss(model, embeddings, batch: StepBatch, input_size, iou_weight: float, device):
    """``(loss, mask loss, IoU loss, mean IoU of the candidate of best predicted IoU)``."""
    import torch
    import torch.nn.functional as F

    points = torch.from_numpy(batch.points).to(device)
    labels = torch.from_numpy(batch.labels).to(device)
    targets = torch.from_numpy(batch.targets).to(device)[:, :, None]             # [B, Q, 1, L, L]
    masks, iou_pred = decode_all(model, embeddings, points, labels, input_size)  # [B, Q, 4, L, L], [B, Q, 4]
    masks, iou_pred = masks.float(), iou_pred.float()
    per_mask = mask_losses(masks, targets)                                       # [B, Q, 4]
    mask_loss = per_mask[..., 1:].min(dim=-1).values.mean() + per_mask[..., 0].mean()
    actual = mask_iou(masks, targets)                                            # [B, Q, 4]
    iou_loss = F.mse_loss(iou_pred, actual)
    kept = iou_pred[..., 1:].argmax(dim=-1, keepdim=True)
    train_miou = float(actual[..., 1:].gather(-1, kept).mean())
    return mask_loss + iou_weight * iou_loss, mask_loss, iou_loss, train_miou


def _recorded_preset(path: Path) -> str | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        preset = (fh.metadata() or {}).get("preset")
    return preset if preset in PRESETS else None


# --- the trainer ------------------------------------------------------------------------------

def initial_fingerprint(preset: str, init: str | None) -> str:
    """Identifies the weights :func:`initial_model` starts from."""
    from models.efficient_sam.checkpoint import EFFICIENT_SAM

    if init is None and preset in EFFICIENT_SAM.built_in:
        return EFFICIENT_SAM.random_fingerprint(preset)
    return EFFICIENT_SAM.fingerprint(preset, init)


def initial_model(preset: str, init: str | None, device):
    """``init`` when given, else the seeded random init for ``tiny`` / ``shapes``, else the
    preset's standard checkpoint (``vitt`` / ``vits``)."""
    from models.efficient_sam.checkpoint import EFFICIENT_SAM, build_model, load_efficient_sam

    if init is None and preset in EFFICIENT_SAM.built_in:
        return build_model(preset, device, empty=False)
    return load_efficient_sam(preset, init, device)[0]


class SamTrainer(Trainer):
    command = "sam"
    description = ("Train EfficientSAM (all parameters) to segment the object under 1..N point prompts on "
                   "synthetic shapes scenes: BCE + Dice on the best of the 3 candidate masks (and on the single-mask "
                   "output) + MSE of the predicted IoU. Writes DIR/efficient_sam.safetensors (loadable by "
                   "load_efficient_sam), DIR/checkpoint.pt, DIR/loss.csv, DIR/loss.png, DIR/config.json, "
                   "DIR/metrics.json (held-out mIoU of the kept mask for 1- and 3-point prompts).")
    settings = SamSettings
    checkpoint_format, checkpoint_version, checkpoint_kind = "pnpvqa-sam-training", 1, "an EfficientSAM"
    weights_file = "efficient_sam.safetensors"
    log_columns = ("loss", "mask_loss", "iou_loss", "train_miou", "lr")
    summary_columns = ("loss", "mask_loss", "iou_loss", "train_miou")
    progress_columns = ("train_miou",)
    plot_curves = (("loss", "tab:blue"), ("mask_loss", "tab:orange"), ("iou_loss", "tab:green"))
    resumable = ("init",)  # the --init file is compared by its fingerprint
    data_title = "data (the shapes source)"
    batch_help = "images per step (each with --prompts-per-image prompt sets)"

    @classmethod
    def add_options(cls, o: Options) -> None:
        add_model_options(o, PRESETS, architecture="EfficientSAM", init_help="initial weights (efficient_sam_*.pt "
                          "or efficient_sam.safetensors); default: tiny / shapes: the seeded random init; vitt / vits: "
                          "the standard file")
        SamSettings.add_options(o, images="shapes scenes to train on")
        o.add(o.data, "--prompts-per-image", type=int, metavar="Q",
              help="prompt sets per image in a step (each image is encoded once)")
        o.add(o.data, "--max-points", type=int, help="most foreground points of a prompt set (1..N, uniform)")
        o.add(o.data, "--negative-fraction", type=float,
              help="share of prompt sets with one background point (label 0) off the object")
        o.add(o.optimisation, "--iou-weight", type=float, help="weight of the IoU-prediction MSE")
        o.add(o.evaluation, "--eval-images", type=int, help="held-out scenes (0 = no evaluation)")

    @classmethod
    def check(cls, s: SamSettings) -> None:
        from models.efficient_sam.checkpoint import EFFICIENT_SAM

        s.check_data()
        if s.preset not in PRESETS:
            raise ValueError(f"--preset {s.preset!r}: choose one of {', '.join(PRESETS)}")
        for name in ("prompts_per_image", "max_points"):
            if getattr(s, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
        if s.iou_weight < 0:
            raise ValueError("--iou-weight must be >= 0")
        if not 0.0 <= s.negative_fraction <= 1.0:
            raise ValueError(f"--negative-fraction must be in [0, 1], got {s.negative_fraction}")
        capacity = EFFICIENT_SAM.config(s.preset).max_points
        needed = s.max_points + (1 if s.negative_fraction > 0 else 0)
        if needed > capacity:
            raise ValueError(f"--max-points {s.max_points}" + (" plus the background point" if s.negative_fraction > 0
                             else "") + f" exceeds the {capacity} prompt points EfficientSAM takes")

    @classmethod
    def run_identity(cls, s: SamSettings) -> dict[str, Any]:
        return {**super().run_identity(s), "init_weights": initial_fingerprint(s.preset, s.init)}

    def __init__(self, s: SamSettings, device, resuming: bool) -> None:
        from models.efficient_sam.checkpoint import build_model

        super().__init__(s, device, resuming)
        self.model = build_model(s.preset, device, empty=True) if resuming else initial_model(s.preset, s.init, device)
        self.model.train()
        cfg = self.model.config
        self.params = s.shapes_params()
        self.data = ShapesScenes(self.params, s.num_images, cfg.low_res_size)
        self.eval_data = self.eval_list = self.eval_params = None
        if s.eval_images:
            self.eval_params = s.shapes_params(held_out=True)
            self.eval_data = ShapesScenes(self.eval_params, s.eval_images, cfg.low_res_size, keep=True)
            self.eval_list = eval_prompts(self.eval_data, np.random.default_rng(s.held_out_seed), cfg.max_points)

    def trainable(self) -> list[dict[str, Any]]:
        from training.common import weight_decay_groups

        return weight_decay_groups(self.model, self.s.weight_decay)

    def modules(self) -> dict[str, Any]:
        return {"model": self.model}

    def resumed(self, state) -> None:
        self.model.reset_buffers()

    def step(self, step: int, rng: np.random.Generator) -> Step:
        s, model = self.s, self.model
        size = self.params.image_size
        batch = draw_batch(self.data, rng, s, model.config.max_points)
        pixels = model.preprocess([self.data[int(i)].image for i in batch.images], channels_last=True)
        embeddings = model.embed(pixels)                                           # [B, C, g, g]
        loss, mask_loss, iou_loss, train_miou = training_loss(model, embeddings, batch, (size, size), s.iou_weight,
                                                              self.device)
        return Step(loss, {"loss": loss, "mask_loss": mask_loss.detach(), "iou_loss": iou_loss.detach(),
                           "train_miou": train_miou})

    def evaluate(self, step: int) -> dict[str, Any] | None:
        from training.sam_eval import evaluate

        if self.eval_list is None:
            return None
        return evaluate(self.model, self.eval_data, self.eval_list, self.device, step)

    @classmethod
    def describe(cls, r) -> str:
        return (f"mIoU 1 point {r['miou_1pt']:.3f} (IoU>=0.5: {r['iou50_1pt']:.3f}), 3 points {r['miou_3pt']:.3f} "
                f"(IoU>=0.5: {r['iou50_3pt']:.3f})")

    def save_weights(self, path: Path, step: int) -> None:
        from training.outputs import save_module_weights

        cfg = self.model.config
        save_module_weights(self.model, path, {"format": "pnpvqa-efficient-sam", "preset": self.s.preset,
                                               "step": str(step), "config": json.dumps(cfg.to_dict(), sort_keys=True)})

    def plot_title(self) -> str:
        s = self.s
        return f"EfficientSAM {s.preset}: BCE + Dice + {s.iou_weight:g} x IoU MSE, {len(self.data)} images"

    def meta(self) -> dict[str, Any]:
        s, cfg = self.s, self.model.config
        return {
            "seeds": {"train": s.seed, "source": self.params.seed, "eval": s.held_out_seed,
                      "batches": f"numpy default_rng([{s.seed}, step])",
                      "eval_prompts": f"numpy default_rng({s.held_out_seed})", "torch": s.seed},
            "model": {"preset": s.preset, "init": s.init, "init_fingerprint": initial_fingerprint(s.preset, s.init),
                      "config": cfg.to_dict(), "parameters": sum(p.numel() for p in self.model.parameters()),
                      "low_res_size": cfg.low_res_size},
            "prompts": {"per_image": s.prompts_per_image, "max_points": s.max_points,
                        "negative_fraction": s.negative_fraction, "padded_to": cfg.max_points},
            "loss": "min over the 3 candidates of (BCE + Dice) + (BCE + Dice) of the single-mask output "
                    f"+ {s.iou_weight:g} x MSE(predicted IoU, actual IoU)",
            "source": {"name": "shapes", "params": self.params.model_dump(mode="json"), "images": len(self.data)},
            "eval_source": None if self.eval_params is None else {
                "name": "shapes", "params": self.eval_params.model_dump(mode="json"), "images": len(self.eval_data),
                "prompts": len(self.eval_list), "points": list(EVAL_POINTS)},
        }


main = SamTrainer.main

if __name__ == "__main__":
    raise SystemExit(main())
