"""``runtime train caption``: train the BLIP captioner (ViT + decoder) to caption sampled patches.

PNP-VQA's ``caption`` stage feeds the decoder only ``num_patches`` (20) patch tokens of the
image (sampled from the question-guided heatmap; index + 1 skips the ViT's CLS) after the prompt
``[DEC] a picture of``. This command trains the captioner for exactly that input on the
synthetic ``shapes`` data: each sample is an image and a random subset of ``--num-patches``
patches (uniform, or with ``--object-bias B`` drawn with weight ``1 + B`` on patches an object
covers), and the target is the caption of the objects visible in those patches
(:func:`shapes.captions.caption_for_patches`), e.g. ``"a picture of a red circle and a blue square"``, or
``"a picture of a plain background"`` / ``"a picture of a textured background"`` when the
subset shows no object. Loss: teacher-forced cross-entropy on the caption tokens after the
prompt (and its ``[SEP]``), as LAVIS's ``BlipCaption`` (prompt tokens masked with -100).
Every parameter is trained; AdamW (no weight decay on biases / norms), linear warmup over
``--warmup`` steps then a constant learning rate (``--lr-decay cosine``: a cosine decay to 0 at
``--steps``), gradient clipping. ``--patch-label-weight`` adds the ITM's training-only patch
probe loss on the ViT tokens (colour and shape per patch, :mod:`shapes.patch_labels`;
``--patch-object-weight`` weighs object patches against background ones), so the captioner's
ViT is told which shape each patch belongs to, not only through the caption tokens.

Initialisation: ``--preset tiny`` / ``shapes`` without ``--init`` is the preset's seeded
random init; ``--init FILE`` loads a LAVIS caption ``.pth`` or a previous
``caption.safetensors``; ``base`` / ``large`` need ``--init`` or their standard file in the
weights folder. ``--vision-from FILE`` then replaces the ViT (``visual_encoder.*``) with the
one of another BLIP checkpoint, e.g. the ITM's, and ``--freeze-vision`` keeps it fixed (only
the decoder learns; the ViT runs without autograd; a captioner sharing the ITM's ViT reads
tokens fused by a fusion module trained against that ViT as the ITM does). The shipped
``shapes`` captioner starts from the shapes ITM's ViT and trains it further (docs/training.md).

Determinism: step ``k``'s images and patch subsets come from ``numpy.random.default_rng([seed,
k])`` alone; images are rendered and preprocessed per image; the model has no dropout and the
patch gather has distinct indices per row (deterministic backward). So ``--resume`` (model,
optimiser, step and torch RNG state from ``DIR/checkpoint.pt``) ends with the same weights as
an uninterrupted run (same device and threads). Evaluation does not touch the training state.

Held-out evaluation (at the start, the end and every ``--eval-every`` steps): ``--eval-images``
shapes images of seed ``--eval-seed`` (default seed + 1000), ``--eval-subsets`` patch subsets
each (drawn from ``default_rng(eval_seed)``, same sampling as training), greedy captions
compared with the builder's: exact-match rate, object precision (mentioned objects that are
visible in the subset) and recall (visible objects that are mentioned), micro-averaged
(:mod:`training.caption_eval`).

Outputs in ``--out DIR``: ``caption.safetensors`` (state dict with LAVIS key names;
``load_blip_caption(preset, path)`` reads it), ``checkpoint.pt`` (resumable, atomic,
``weights_only``), ``loss.csv`` (loss, teacher-forced token accuracy), ``loss.png``,
``config.json``, ``metrics.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.common import BLIP_PRESETS, add_model_options, add_patch_label_options, check_patch_label_options
from training.data import ShapesSettings
from training.loop import Options, Step, Trainer
from training.caption_data import ShapesImages, caption_batch, patch_states
from training.caption_eval import evaluate
from shapes.captions import MIN_OVERLAP, PROMPT
from shapes.patch_labels import PatchLabels, build_probe, patch_label_loss


# --- settings ---------------------------------------------------------------------------------

@dataclass
class CaptionSettings(ShapesSettings):
    preset: str = "tiny"
    init: str | None = None
    vision_from: str | None = None
    freeze_vision: bool = False
    weights: str | None = None
    num_patches: int = 20
    object_bias: float = 0.0
    subsets_per_image: int = 1
    min_overlap: float = MIN_OVERLAP
    batch_size: int = 16
    patch_label_weight: float = 0.0
    patch_object_weight: float = 1.0
    eval_subsets: int = 4


# --- files ------------------------------------------------------------------------------------

def load_vision(model, path: Path) -> None:
    """Copy the ``visual_encoder.*`` tensors of the BLIP checkpoint ``path`` into ``model``."""
    from models.blip.checkpoint import adapt_state_dict
    from models.weights import WeightsError, apply_state_dict, load_checkpoint as read

    state = {k: v for k, v in read(path).items() if k.startswith("visual_encoder.")}
    if not state:
        raise WeightsError(f"{path} holds no visual_encoder.* tensors (not a BLIP checkpoint?)")
    apply_state_dict(model.visual_encoder, {k.removeprefix("visual_encoder."): v
                                            for k, v in adapt_state_dict(state, model).items()},
                     f"the ViT of {path}")


# --- the trainer ------------------------------------------------------------------------------

class CaptionTrainer(Trainer):
    command = "caption"
    description = ("Train the BLIP captioner (ViT + decoder) to caption random patch subsets of shapes images "
                   "(the objects those patches show), as PNP-VQA feeds it sampled patches. Writes "
                   "DIR/caption.safetensors (loadable by load_blip_caption), DIR/checkpoint.pt, DIR/loss.csv, "
                   "DIR/loss.png, DIR/config.json, DIR/metrics.json (held-out greedy-caption accuracy).")
    settings = CaptionSettings
    # version 2: the per-step log as one [steps, columns] table (version 1 kept losses and accuracies apart)
    checkpoint_format, checkpoint_version, checkpoint_kind = "pnpvqa-caption-training", 2, "a caption"
    weights_file = "caption.safetensors"
    log_columns = ("loss", "accuracy")  # the caption loss (without the probe's) and teacher-forced token accuracy
    plot_ylabel = "caption cross-entropy (per token)"
    resumable = ("init", "vision_from", "eval_subsets")  # the files are compared by their fingerprints
    later_options = {"patch_label_weight": 0.0, "patch_object_weight": 1.0}
    data_title = "data (the shapes source)"
    batch_help = "(image, patch subset) samples per step"

    @classmethod
    def add_options(cls, o: Options) -> None:
        add_model_options(o, BLIP_PRESETS, architecture="BLIP captioner", init_help="initial weights (LAVIS "
                          "caption .pth or caption.safetensors); default: the preset's own (tiny: seeded random init; "
                          "base/large: the standard file)")
        o.add(o.model, "--vision-from", metavar="FILE", help="take the ViT (visual_encoder.*) from this BLIP "
              "checkpoint, e.g. a trained itm.safetensors of the same preset")
        o.add(o.model, "--freeze-vision", action="store_true", help="keep the ViT fixed (train the decoder only)")
        d = o.data
        CaptionSettings.add_options(o, images="shapes images to train on")
        o.add(d, "--num-patches", type=int, help="patches fed to the decoder per caption")
        o.add(d, "--object-bias", type=float, metavar="B",
              help="patch sampling weight 1 + B on patches an object covers (0 = uniform)")
        o.add(d, "--subsets-per-image", type=int, metavar="S",
              help="patch subsets per drawn image in a step (batch = batch-size / S images, each encoded once)")
        o.add(d, "--min-overlap", type=float, help="share of a patch an object must cover to be visible in it")
        add_patch_label_options(o, "the ViT tokens")
        o.add(o.evaluation, "--eval-images", type=int, help="held-out images (0 = no evaluation)")
        o.add(o.evaluation, "--eval-subsets", type=int, help="patch subsets captioned per held-out image")

    @classmethod
    def check(cls, s: CaptionSettings) -> None:
        s.check_data()
        check_patch_label_options(s)
        for name in ("num_patches", "eval_subsets", "subsets_per_image"):
            if getattr(s, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
        if s.object_bias < 0:
            raise ValueError(f"--object-bias must be >= 0, got {s.object_bias}")
        if s.patch_label_weight > 0 and s.freeze_vision:
            raise ValueError("--patch-label-weight trains the ViT: it cannot go with --freeze-vision")
        if not 0.0 < s.min_overlap <= 1.0:
            raise ValueError(f"--min-overlap must be in (0, 1], got {s.min_overlap}")

    @classmethod
    def run_identity(cls, s: CaptionSettings) -> dict[str, Any]:
        from models.weights import file_fingerprint
        from training.common import initial_blip_fingerprint

        return {**super().run_identity(s), "init_weights": initial_blip_fingerprint("caption", s.preset, s.init),
                "vision_weights": None if s.vision_from is None else file_fingerprint(Path(s.vision_from))}

    def __init__(self, s: CaptionSettings, device, resuming: bool) -> None:
        from models.blip.checkpoint import build_model
        from models.blip.tokenizer import caption_prompt_ids, load_blip_tokenizer_for
        from training.common import initial_blip

        super().__init__(s, device, resuming)
        self.resuming = resuming
        model = build_model("caption", s.preset, device, empty=True) if resuming \
            else initial_blip("caption", s.preset, s.init, device)
        self.model = model.train()
        grid, image_size = model.grid, model.config.vit.image_size
        if s.num_patches > grid * grid:
            raise ValueError(f"--num-patches {s.num_patches} exceeds the {grid}x{grid} patch grid")
        self.tokenizer = load_blip_tokenizer_for(s.preset)
        self.prompt_ids = caption_prompt_ids(self.tokenizer, PROMPT)
        self.params = s.shapes_params()
        self.data = ShapesImages(self.params, s.num_images, grid, image_size, s.min_overlap)
        self.eval_data = self.eval_subsets = self.eval_params = None
        if s.eval_images:
            self.eval_params = s.shapes_params(held_out=True)
            self.eval_data = ShapesImages(self.eval_params, s.eval_images, grid, image_size, s.min_overlap)
            rng = np.random.default_rng(s.held_out_seed)
            self.eval_subsets = [(i, self.eval_data.sample_patches(i, rng, s.num_patches, s.object_bias))
                                 for i in range(s.eval_images) for _ in range(s.eval_subsets)]

    def trainable(self) -> list[dict[str, Any]]:
        from training.common import weight_decay_groups

        s, model = self.s, self.model
        if s.vision_from is not None and not self.resuming:
            load_vision(model, Path(s.vision_from))
        if s.freeze_vision:
            model.visual_encoder.requires_grad_(False)
        groups = weight_decay_groups(model, s.weight_decay)
        self.probe = self.patch_targets = None
        if s.patch_label_weight > 0:
            self.probe = build_probe(model.config.vit.width).to(self.device)
            groups.append({"params": list(self.probe.parameters()), "weight_decay": 0.0})
            self.patch_targets = PatchLabels(self.data.scenes, model.grid)
        return groups

    def modules(self) -> dict[str, Any]:
        return {"model": self.model, **({} if self.probe is None else {"probe": self.probe})}

    def resumed(self, state) -> None:
        self.model.reset_buffers()

    def step(self, step: int, rng: np.random.Generator) -> Step:
        import torch
        import torch.nn.functional as F

        from training.pairs import pair_rows

        s, data, model, device = self.s, self.data, self.model, self.device
        drawn = rng.integers(0, len(data), size=-(-s.batch_size // s.subsets_per_image))
        chosen = np.repeat(drawn, s.subsets_per_image)[:s.batch_size]
        patches = np.stack([data.sample_patches(int(i), rng, s.num_patches, s.object_bias) for i in chosen])
        captions = [data.caption(int(i), p) for i, p in zip(chosen, patches)]
        input_ids, targets = caption_batch(self.tokenizer, captions, len(self.prompt_ids))
        input_ids, targets = input_ids.to(device), targets.to(device)

        with torch.set_grad_enabled(not s.freeze_vision):
            tokens_image = model.encode_image(data.pixels([int(i) for i in drawn]).to(device))  # [U, 1+P, C]
        rows = torch.arange(len(drawn), device=device).repeat_interleave(s.subsets_per_image)[:s.batch_size]
        tokens = pair_rows(tokens_image, rows)                                          # [B, 1+P, C]
        states = patch_states(tokens, torch.from_numpy(patches).to(device).long())      # [B, K, C]
        logits = model.decoder_logits(input_ids, states)[:, :-1].float()               # [B, T-1, V]
        labels = targets[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        objective = loss
        if self.probe is not None:
            colour, shape = self.patch_targets([int(i) for i in drawn], device)
            logits_patch = self.probe(tokens_image[:, 1:]).flatten(0, 1).float()         # [U * P, CLASSES]
            objective = loss + s.patch_label_weight * patch_label_loss(logits_patch, colour.flatten(), shape.flatten(),
                                                                       s.patch_object_weight)
        mask = labels != -100
        return Step(objective, {"loss": loss, "accuracy": ((logits.argmax(-1) == labels) & mask).sum() / mask.sum()})

    def evaluate(self, step: int) -> dict[str, Any] | None:
        if self.eval_subsets is None:
            return None
        return evaluate(self.model, self.tokenizer, self.eval_data, self.eval_subsets, self.prompt_ids, self.device,
                        step)

    @classmethod
    def describe(cls, r) -> str:
        return (f"exact match {r['exact_match']:.3f}, object precision {_fmt(r['object_precision'])}, recall "
                f"{_fmt(r['object_recall'])}")

    def save_weights(self, path: Path, step: int) -> None:
        """The state dict (LAVIS key names)."""
        from training.outputs import save_module_weights

        save_module_weights(self.model, path, {"format": "pnpvqa-blip-caption", "preset": self.s.preset,
                                               "step": str(step), "prompt": PROMPT,
                                               "config": json.dumps(self.model.config.to_dict(), sort_keys=True)})

    def plot_title(self) -> str:
        return f"BLIP caption {self.s.preset}: {self.s.num_patches} patches, {len(self.data)} images"

    def summary(self, log) -> dict[str, Any]:
        from training.common import mean_or_none

        return {**super().summary(log), "token_accuracy_last": mean_or_none(log["accuracy"][-10:])}

    def meta(self) -> dict[str, Any]:
        s, model = self.s, self.model
        identity = self.run_identity(s)
        return {
            "seeds": {"train": s.seed, "source": self.params.seed, "eval": s.held_out_seed,
                      "batches": f"numpy default_rng([{s.seed}, step])",
                      "eval_subsets": f"numpy default_rng({s.held_out_seed})", "torch": s.seed},
            "model": {"preset": s.preset, "init": s.init, "init_fingerprint": identity["init_weights"],
                      "vision_from": s.vision_from, "vision_fingerprint": identity["vision_weights"],
                      "freeze_vision": s.freeze_vision, "config": model.config.to_dict(),
                      "parameters": sum(p.numel() for p in model.parameters()), "grid": model.grid},
            "prompt": PROMPT,
            "source": {"name": "shapes", "params": self.params.model_dump(mode="json"), "images": len(self.data)},
            "eval_source": None if self.eval_params is None else {
                "name": "shapes", "params": self.eval_params.model_dump(mode="json"), "images": len(self.eval_data),
                "subsets": len(self.eval_subsets)},
        }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


main = CaptionTrainer.main

if __name__ == "__main__":
    raise SystemExit(main())
