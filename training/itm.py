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
held-out positives that refer to objects: 1 when the heatmap's argmax cell overlaps them
(:mod:`training.itm_eval`).

Outputs in ``--out DIR``: ``itm.safetensors`` (the state dict with LAVIS key names, plus
``temp``; ``load_blip_itm(preset, path)`` reads it), ``checkpoint.pt`` (resumable, atomic,
``weights_only``), ``loss.csv``, ``loss.png``, ``config.json`` (command lines, seeds, settings,
times), ``metrics.json`` (held-out ITM accuracy, its history, loss summary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.common import BLIP_PRESETS, add_model_options, add_patch_label_options, check_patch_label_options
from training.data import PixelStore, SourceSettings
from training.loop import Options, Step, Trainer
from training.pairs import draw_pairs, positive_indices
from training.itm_eval import evaluate
from shapes.patch_labels import PatchLabels, build_probe, patch_label_loss


@dataclass
class ItmSettings(SourceSettings):
    preset: str = "tiny"
    init: str | None = None
    weights: str | None = None
    lr: float = 1e-4
    weight_decay: float = 0.05
    itc_weight: float = 1.0
    grounding_weight: float = 0.0
    patch_label_weight: float = 0.0
    patch_object_weight: float = 1.0
    block_num: int | None = None
    questions_per_image: int = 1
    temp: float = 0.07
    fixed_temp: bool = False
    image_cache: int = 1024


def itc_loss(model, image_embeds, rows, input_ids, attention_mask, cls_token_id: int, temp, images, questions):
    """Symmetric InfoNCE over the positives: ``image_embeds [U, 1+P, C]`` of the unique images,
    ``rows [B]`` (row ``b``'s image), ``input_ids``/``attention_mask [B, T]`` ([ENC] first; the
    text encoder gets [CLS] first). Targets: pairs of the same image or the same question."""
    import torch
    import torch.nn.functional as F

    from training.pairs import pair_rows

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


class ItmTrainer(Trainer):
    command = "itm"
    description = ("Train a BLIP ITM model (all parameters) on image-question matching (ITM cross-entropy on "
                   "positives and hard negatives) + ITC (symmetric InfoNCE). Writes DIR/itm.safetensors (loadable "
                   "by load_blip_itm), DIR/checkpoint.pt, DIR/loss.csv, DIR/loss.png, DIR/config.json, "
                   "DIR/metrics.json (held-out ITM accuracy).")
    settings = ItmSettings
    checkpoint_format, checkpoint_version, checkpoint_kind = "pnpvqa-itm-training", 1, "an ITM"
    weights_file = "itm.safetensors"
    log_columns = ("loss", "itm_loss", "itc_loss", "grounding_loss", "patch_loss", "accuracy", "lr", "temp")
    general_columns = ("temp",)
    summary_columns = ("loss", "itm_loss", "itc_loss", "grounding_loss", "patch_loss")
    plot_curves = (("loss", "tab:blue"), ("itm_loss", "tab:orange"), ("itc_loss", "tab:green"),
                   ("grounding_loss", "tab:red"), ("patch_loss", "tab:purple"))
    resumable = ("init", "image_cache")  # the --init file is compared by its fingerprint
    later_options = {"patch_object_weight": 1.0}
    batch_help = "positives per step (as many negatives)"

    @classmethod
    def add_options(cls, o: Options) -> None:
        add_model_options(o, BLIP_PRESETS, architecture="BLIP ITM", init_help="initial weights (LAVIS .pth or "
                          "itm.safetensors); default: the preset's own (tiny: seeded random init; base/large: the "
                          "standard file)")
        ItmSettings.add_options(o)
        o.add(o.data, "--image-cache", type=int, metavar="IMAGES", help="preprocessed images kept in memory")
        t = o.optimisation
        o.add(t, "--itc-weight", type=float, help="weight of the ITC loss (0 = ITM only)")
        o.add(t, "--grounding-weight", type=float, help="weight of the grounding loss on the cross-attention of "
              "--block-num (0 = off; needs ground-truth masks)")
        add_patch_label_options(o, "the ViT tokens (needs the scene column)")
        o.add(t, "--block-num", type=int, help="text layer of the grounding loss and of the held-out GradCAM "
              "pointing game (as itm_gradcam's block_num; default: the preset's, 7 or shapes 2)")
        o.add(t, "--questions-per-image", type=int, metavar="Q",
              help="positives per drawn image (batch = batch-size / Q images)")
        o.add(t, "--temp", type=float, help="initial ITC temperature")
        o.add(t, "--fixed-temp", action="store_true", help="keep the ITC temperature fixed")

    @classmethod
    def check(cls, s: ItmSettings) -> None:
        s.check_data()
        check_patch_label_options(s)
        for name in ("image_cache", "questions_per_image"):
            if getattr(s, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
        if min(s.itc_weight, s.grounding_weight) < 0:
            raise ValueError("--itc-weight and --grounding-weight must be >= 0")
        if not 0.001 <= s.temp <= 0.5:
            raise ValueError(f"--temp must be in [0.001, 0.5], got {s.temp}")

    @classmethod
    def run_identity(cls, s: ItmSettings) -> dict[str, Any]:
        from training.common import initial_blip_fingerprint

        return {**super().run_identity(s), "init_weights": initial_blip_fingerprint("itm", s.preset, s.init)}

    def __init__(self, s: ItmSettings, device, resuming: bool) -> None:
        from models.blip import build_model, load_blip_tokenizer_for
        from training.common import initial_blip
        from training.data import load_data

        super().__init__(s, device, resuming)
        model = build_model("itm", s.preset, device, empty=True) if resuming \
            else initial_blip("itm", s.preset, s.init, device)
        self.model = model.train()
        self.block_num = model.config.gradcam_block if s.block_num is None else s.block_num
        if s.grounding_weight > 0 or s.eval_images != 0:
            model.check_block_num(self.block_num)
        self.params = s.train_params()
        self.data = load_data(s.source, self.params, s.limit, mask_grid=model.grid)
        self.held_out = s.held_out_data(mask_grid=model.grid)
        if s.grounding_weight > 0 and not any(x.cells is not None for x in self.data.samples):
            raise ValueError(f"--grounding-weight needs ground-truth masks (gt_mask); source {s.source!r} has none")
        self.tokenizer = load_blip_tokenizer_for(s.preset)
        self.store = PixelStore(self.data, model.config.vit.image_size, s.image_cache)
        self.eval_store = self.eval_pairs = None
        if self.held_out is not None:
            samples = self.held_out.data.samples
            self.eval_store = PixelStore(self.held_out.data, model.config.vit.image_size, s.image_cache)
            self.eval_pairs = draw_pairs(samples, len(samples), np.random.default_rng(s.held_out_seed),
                                         s.swap_fraction)
        self.positives = positive_indices(self.data.samples)

    def trainable(self) -> list[dict[str, Any]]:
        import torch

        from training.common import weight_decay_groups

        s = self.s
        self.temp = torch.nn.Parameter(torch.tensor(float(s.temp), device=self.device),
                                       requires_grad=not s.fixed_temp)
        self.groups = weight_decay_groups(self.model, s.weight_decay)
        if not s.fixed_temp:
            self.groups.append({"params": [self.temp], "weight_decay": 0.0})
        self.probe = self.patch_targets = None
        if s.patch_label_weight > 0:
            if not any(self.data.scenes):
                raise ValueError(f"--patch-label-weight needs the scene column; source {s.source!r} has none")
            self.probe = build_probe(self.model.config.vit.width).to(self.device)
            self.groups.append({"params": list(self.probe.parameters()), "weight_decay": 0.0})
            self.patch_targets = PatchLabels(self.data.scenes, self.model.grid)
        return self.groups

    def modules(self) -> dict[str, Any]:
        return {"model": self.model, **({} if self.probe is None else {"probe": self.probe})}

    def clipped(self) -> list[Any]:
        return [p for g in self.groups for p in g["params"]]

    def state(self) -> dict[str, Any]:
        return {"temp": self.temp.detach().cpu()}

    def resumed(self, state) -> None:
        import torch

        self.model.reset_buffers()
        with torch.no_grad():
            self.temp.copy_(state["temp"])

    def step(self, step: int, rng: np.random.Generator) -> Step:
        import torch
        import torch.nn.functional as F

        from models.blip import tokenize_questions
        from training.pairs import pair_rows

        s, model, device = self.s, self.model, self.device
        batch = draw_pairs(self.data.samples, s.batch_size, rng, s.swap_fraction, s.questions_per_image,
                           self.positives)
        unique = sorted(set(batch.images))
        rows = torch.tensor([unique.index(i) for i in batch.images], device=device)
        input_ids, attention_mask = tokenize_questions(self.tokenizer, batch.questions)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        labels = torch.tensor(batch.labels, device=device)

        embeds = model.encode_image(self.store.get(unique).to(device))              # [U, 1+P, C]
        # keys / values once per image, then one copy per pair
        cross_kv = [(pair_rows(k, rows), pair_rows(v, rows)) for k, v in model.text_encoder.cross_kv(embeds)]
        n_pos = sum(batch.labels)
        cells = [self.data.samples[i].cells for i in batch.indices]
        grounded = [k for k, c in enumerate(cells) if c is not None and c.max() > 0]
        use_grounding = s.grounding_weight > 0 and bool(grounded)
        text = model.text_encoder(input_ids, attention_mask, cross_kv=cross_kv,
                                  probs_layer=self.block_num if use_grounding else None)
        logits = model.itm_head(text.hidden[:, 0])
        loss_itm = F.cross_entropy(logits.float(), labels)
        loss_ground = torch.zeros((), device=device)
        if use_grounding:
            target = torch.from_numpy(np.stack([cells[k] for k in grounded])).to(device)
            loss_ground = grounding_loss(text.cross_probs[grounded], attention_mask[grounded], target)
        if s.itc_weight > 0:
            loss_itc = itc_loss(model, embeds, rows[:n_pos], input_ids[:n_pos], attention_mask[:n_pos],
                                self.tokenizer.cls_token_id, self.temp, batch.images[:n_pos], batch.questions[:n_pos])
            loss = loss_itm + s.itc_weight * loss_itc
        else:
            loss_itc, loss = torch.zeros(()), loss_itm
        loss_patch = torch.zeros((), device=device)
        if self.probe is not None:
            colour, shape = self.patch_targets(unique, device)
            logits_patch = self.probe(embeds[:, 1:])                                    # [U, P, CLASSES]
            loss_patch = patch_label_loss(logits_patch.flatten(0, 1).float(), colour.flatten(), shape.flatten(),
                                          s.patch_object_weight)
        loss = loss + s.grounding_weight * loss_ground + s.patch_label_weight * loss_patch
        return Step(loss, {"loss": loss, "itm_loss": loss_itm.detach(), "itc_loss": loss_itc.detach(),
                           "grounding_loss": loss_ground.detach(), "patch_loss": loss_patch.detach(),
                           "accuracy": (logits.argmax(dim=1) == labels).float().mean()})

    def after_update(self) -> dict[str, float]:
        import torch

        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        return {"temp": float(self.temp.detach())}

    def evaluate(self, step: int) -> dict[str, Any] | None:
        if self.eval_pairs is None:
            return None
        return evaluate(self.model, self.tokenizer, self.eval_store, self.eval_pairs, self.held_out.data.samples,
                        self.device, step, self.block_num)

    @classmethod
    def describe(cls, r) -> str | None:
        if r.get("itm_accuracy") is None:
            return None
        return (f"ITM accuracy {r['itm_accuracy']:.3f} (positives {r['positive_accuracy']:.3f}, negatives "
                f"{r['negative_accuracy']:.3f}); pointing game {r['pointing_game']}")

    def save_weights(self, path: Path, step: int) -> None:
        """The state dict (LAVIS key names) and ``temp``."""
        from training.outputs import save_module_weights

        save_module_weights(self.model, path, {"format": "pnpvqa-blip-itm", "preset": self.s.preset, "step": str(step),
                                               "config": json.dumps(self.model.config.to_dict(), sort_keys=True)},
                            extra={"temp": self.temp.reshape(())})

    def plot_title(self) -> str:
        return f"BLIP ITM {self.s.preset}: ITM + {self.s.itc_weight:g} x ITC, {len(self.data.images)} images"

    def summary(self, log) -> dict[str, Any]:
        from training.common import mean_or_none

        return {**super().summary(log), "train_accuracy_last": mean_or_none(log["accuracy"][-10:]),
                "temp": float(self.temp.detach())}

    def records(self, step: int, evals) -> tuple[dict[str, Any], dict[str, Any]]:
        from training.outputs import eval_at

        final_eval = eval_at(evals, step)
        accuracy = {"held_out_itm_accuracy": None if final_eval is None else final_eval["itm_accuracy"]}
        held_out = None if self.held_out is None else self.held_out.held_out
        return accuracy, {"held_out": held_out, **accuracy}

    def meta(self) -> dict[str, Any]:
        from training.common import initial_blip_fingerprint

        s, data, h = self.s, self.data, self.held_out
        return {
            "seeds": {"train": s.seed, "source": getattr(self.params, "seed", None), "eval": s.held_out_seed,
                      "pairs": f"numpy default_rng([{s.seed}, step])", "torch": s.seed},
            "model": {"preset": s.preset, "init": s.init,
                      "init_fingerprint": initial_blip_fingerprint("itm", s.preset, s.init),
                      "config": self.model.config.to_dict(),
                      "parameters": sum(p.numel() for p in self.model.parameters())},
            "source": {"name": s.source, "params": self.params.model_dump(mode="json"),
                       "samples": len(data.samples), "images": len(data.images)},
            "eval_source": None if h is None else {
                "name": s.source, "params": h.params.model_dump(mode="json"), "samples": len(h.data.samples),
                "images": len(h.data.images), "held_out": h.held_out},
        }


main = ItmTrainer.main

if __name__ == "__main__":
    raise SystemExit(main())
