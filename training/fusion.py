"""``runtime train fusion``: train a BLIP + SAM fusion module with frozen BLIP ITM and SAM.

Objective: image-question matching. Each step draws ``batch_size`` samples; each gives a
positive pair (its image, its own question) and a hard negative (its image, a question with a
colour / shape word swapped to one absent from the scene, or the question of another image
whose answer differs; see :mod:`training.pairs`). The frozen ViT tokens and SAM embedding of
the image are fused by the trainable module, the frozen BLIP ITM text encoder + head score the
pairs, and the loss is the cross-entropy of the ITM logits against match / no match. Only the
fusion module's parameters get gradients (AdamW with weight decay on every parameter, a constant
learning rate unless ``--warmup`` / ``--lr-decay`` say otherwise, gradient clipping).

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
The evaluation is :mod:`training.fusion_eval`'s; its ``check_metrics`` computes ``itm_accuracy``,
``swap_accuracy`` and ``pointing_game`` of a weights file with the shapes ITM and SAM on a fixed
small set for the shipped file's manifest.

Outputs in ``--out DIR``: ``fusion.safetensors`` (the weights a graph names; config in its
metadata), ``checkpoint.pt`` (resumable), ``loss.csv``, ``loss.png``, ``config.json`` (command
lines, seeds, settings, models, data, device, times), ``metrics.json`` (final held-out metrics,
their history, the unfused baseline, loss summary).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.efficient_sam.config import PRESETS as SAM_PRESETS
from training.common import BLIP_PRESETS
from training.data import SourceSettings
from training.loop import Options, Step, Trainer

EVAL_BATCH = 32  # pairs per evaluation forward
CHECK_KEYS = ("itm_accuracy", "swap_accuracy", "pointing_game")  # check_metrics, and the gain over the baseline


@dataclass
class FusionSettings(SourceSettings):
    mode: str = "difnet"
    blip_preset: str = "tiny"
    blip_checkpoint: str | None = None
    sam_preset: str = "tiny"
    sam_checkpoint: str | None = None
    weights: str | None = None
    steps: int = 200
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
    feature_cache: int = 4096
    feature_batch: int = 16
    block_num: int | None = None


# --- the trainer ------------------------------------------------------------------------------

class FusionTrainer(Trainer):
    command = "fusion"
    description = ("Train a BLIP + EfficientSAM fusion module (concat_conv, cross_attention or difnet) on "
                   "image-question matching with frozen BLIP ITM and SAM. Writes DIR/fusion.safetensors (the "
                   "weights a graph names), DIR/checkpoint.pt, DIR/loss.csv, DIR/loss.png, DIR/config.json, "
                   "DIR/metrics.json (held-out ITM accuracy and GradCAM pointing game on the fused tokens, and "
                   "on the unfused ones as the baseline).")
    settings = FusionSettings
    # version 2: the per-step log as one [steps, columns] table (version 1 kept losses and accuracies apart)
    checkpoint_format, checkpoint_version, checkpoint_kind = "pnpvqa-fusion-training", 2, "a fusion"
    weights_file = "fusion.safetensors"
    log_columns = ("loss", "accuracy")
    plot_ylabel = "ITM cross-entropy"
    # the frozen models are compared by their weights' fingerprints, not by file paths
    resumable = ("feature_cache", "blip_checkpoint", "sam_checkpoint", "block_num")
    batch_help = "positives per step (as many negatives)"
    weight_decay_help = "AdamW weight decay, on every parameter"

    @classmethod
    def add_options(cls, o: Options) -> None:
        m = o.model
        o.add(m, "--mode", choices=["concat_conv", "cross_attention", "difnet"], help="fusion module")
        o.add(m, "--blip-preset", choices=list(BLIP_PRESETS), help="frozen BLIP ITM (shapes: the bundled "
              "models/assets/shapes/blip_itm.safetensors)")
        o.add(m, "--blip-checkpoint", metavar="FILE", help="explicit BLIP ITM checkpoint file")
        o.add(m, "--sam-preset", choices=list(SAM_PRESETS), help="frozen EfficientSAM (shapes: the bundled "
              "models/assets/shapes/efficient_sam.safetensors)")
        o.add(m, "--sam-checkpoint", metavar="FILE", help="explicit EfficientSAM checkpoint file")
        o.add(m, "--weights", metavar="DIR", help="folder of real checkpoints (sets $PNPVQA_WEIGHTS)")
        o.add(m, "--width", type=int, help="fusion width (default: the BLIP width, at most 256)")
        o.add(m, "--heads", type=int, help="attention heads")
        o.add(m, "--ffn-dim", type=int, help="DIFNet FFN width (0 = 4 * width)")
        o.add(m, "--dropout", type=float, help="dropout of the fusion module")
        o.add(m, "--sam-grid", type=int, help="cross_attention: SAM keys resized to this grid")
        o.add(m, "--Lf", type=int, help="DIFNet: layers per stream before the fusion layer")
        o.add(m, "--T", type=int, help="DIFNet: applications of each pre-fusion layer per stream")
        o.add(m, "--N", type=int, help="DIFNet: layers in all (N > Lf)")
        o.add(m, "--sam-cls", choices=["zero", "learned"], help="DIFNet: SAM stream CLS slot")
        o.add(m, "--formulation", choices=["gated", "reference"], help="DIFNet: gated (one residual per sub-layer) "
              "or reference (the published encoder, layer for layer; models/fusion/difnet_reference.py)")
        o.add(m, "--identity-map-reordering", action="store_true", help="DIFNet reference: the pre-norm variant")
        o.add(m, "--difnet-encoder", metavar="FILE", help="DIFNet reference: start the encoder from a published "
              "mrwu-mac/DIFNet checkpoint (its encoder keys, e.g. encoder.layers.N.mhatt...; --width, --heads, "
              "--ffn-dim, --N must match it)")
        FusionSettings.add_options(o)
        o.add(o.data, "--feature-cache", type=int, metavar="IMAGES",
              help="images whose frozen features stay in memory (training and held-out sets each)")
        o.add(o.data, "--feature-batch", type=int, help="images per frozen-feature forward")
        o.add(o.evaluation, "--block-num", type=int, help="text layer of the held-out GradCAM pointing game (as "
              "itm_gradcam's block_num; default: the ITM preset's, 7 or shapes 2)")

    @classmethod
    def check(cls, s: FusionSettings) -> None:
        s.check_data()
        for name in ("feature_cache", "feature_batch"):
            if getattr(s, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")

    @classmethod
    def run_identity(cls, s: FusionSettings) -> dict[str, Any]:
        return {**super().run_identity(s), **cls.fingerprints(s)}

    @staticmethod
    def fingerprints(s: FusionSettings) -> dict[str, str]:
        """The frozen models' weights."""
        from models.blip.family import BLIP_ITM
        from models.efficient_sam import EFFICIENT_SAM

        return {"blip_weights": BLIP_ITM.fingerprint(s.blip_preset, s.blip_checkpoint),
                "sam_weights": EFFICIENT_SAM.fingerprint(s.sam_preset, s.sam_checkpoint)}

    def __init__(self, s: FusionSettings, device, resuming: bool) -> None:
        from models.blip import load_blip_itm, load_blip_tokenizer_for
        from models.efficient_sam import load_efficient_sam
        from models.fusion import FusionConfig
        from training.data import FeatureStore, load_data
        from training.pairs import draw_pairs

        super().__init__(s, device, resuming)
        # frozen models, eval mode, no gradients
        self.itm, _ = load_blip_itm(s.blip_preset, s.blip_checkpoint, device=device)
        self.sam, _ = load_efficient_sam(s.sam_preset, s.sam_checkpoint, device=device)
        for frozen in (self.itm, self.sam):
            frozen.eval().requires_grad_(False)
        self.tokenizer = load_blip_tokenizer_for(s.blip_preset)
        itm, sam = self.itm, self.sam
        blip_width = itm.config.vit.width
        self.config = FusionConfig(
            mode=s.mode, blip_width=blip_width, sam_dim=sam.config.embed_dim, grid=itm.grid,
            width=s.width or min(blip_width, 256), heads=s.heads, ffn_dim=s.ffn_dim, dropout=s.dropout,
            sam_grid=s.sam_grid, Lf=s.Lf, T=s.T, N=s.N, sam_cls=s.sam_cls,
            formulation=s.formulation if s.mode == "difnet" else "gated",
            identity_map_reordering=s.identity_map_reordering)
        self.params = s.train_params()
        self.data = load_data(s.source, self.params, s.limit)
        self.store = FeatureStore(self.data, itm, sam, device, chunk=s.feature_batch, max_cached=s.feature_cache)
        # the held-out set: the same source with another seed (the training data when it has none)
        self.block_num = itm.config.gradcam_block if s.block_num is None else s.block_num
        self.held_out = s.held_out_data(mask_grid=itm.grid)
        self.eval_store = self.eval_pairs = None
        if self.held_out is not None:
            itm.check_block_num(self.block_num)
            samples = self.held_out.data.samples
            self.eval_store = FeatureStore(self.held_out.data, itm, sam, device, chunk=s.feature_batch,
                                           max_cached=s.feature_cache)
            self.eval_pairs = draw_pairs(samples, len(samples), np.random.default_rng(s.held_out_seed),
                                         s.swap_fraction)
        self.baseline: dict[str, Any] | None = None

    def trainable(self) -> list[dict[str, Any]]:
        from models.fusion import build_fusion, load_reference_encoder
        from models.weights import load_checkpoint as load_weights_file

        s = self.s
        model = build_fusion(self.config)
        if s.difnet_encoder:
            report = load_reference_encoder(model, load_weights_file(s.difnet_encoder), s.difnet_encoder)
            print(f"DIFNet encoder from {s.difnet_encoder}: {report.summary()}", file=sys.stderr)
        self.model = model.to(self.device).train()
        return [{"params": list(self.model.parameters()), "weight_decay": s.weight_decay}]

    def modules(self) -> dict[str, Any]:
        return {"model": self.model}

    def state(self) -> dict[str, Any]:
        return {"baseline": json.dumps(self.baseline)}

    def resumed(self, state) -> None:
        self.baseline = json.loads(state["baseline"])

    def step(self, step: int, rng: np.random.Generator) -> Step:
        import torch
        import torch.nn.functional as F

        from models.blip import tokenize_questions
        from training.pairs import draw_pairs, pair_rows

        s, device = self.s, self.device
        batch = draw_pairs(self.data.samples, s.batch_size, rng, s.swap_fraction)
        unique = sorted(set(batch.images))
        rows = torch.tensor([unique.index(i) for i in batch.images], device=device)
        blip_tokens, sam_embed = self.store.get(unique)
        input_ids, attention_mask = tokenize_questions(self.tokenizer, batch.questions)
        labels = torch.tensor(batch.labels, device=device)

        fused = self.model(blip_tokens, sam_embed)                             # [U, 1+P, C1]
        logits = self.itm.itm_logits(pair_rows(fused, rows), input_ids.to(device), attention_mask.to(device))
        loss = F.cross_entropy(logits.float(), labels)
        return Step(loss, {"loss": loss, "accuracy": (logits.argmax(dim=1) == labels).float().mean()})

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """The fused tokens' metrics; the unfused baseline's first, once per run."""
        from training.fusion_eval import evaluate

        if self.eval_pairs is None:
            return None

        def run(fusion):
            return evaluate(self.itm, self.tokenizer, fusion, self.eval_store, self.eval_pairs,
                            self.held_out.data.samples, self.device, step, self.block_num)

        if self.baseline is None:
            self.baseline = run(None)
            if not self.s.quiet:
                print(f"unfused BLIP tokens (baseline): held-out {self.describe(self.baseline)}", file=sys.stderr)
        return run(self.model)

    @classmethod
    def describe(cls, r) -> str | None:
        if r.get("itm_accuracy") is None:
            return None
        return (f"ITM accuracy {_fmt(r['itm_accuracy'])} (positives {_fmt(r['positive_accuracy'])}, negatives "
                f"{_fmt(r['negative_accuracy'])}, swap negatives {_fmt(r['swap_accuracy'])}); pointing game "
                f"{_fmt(r['pointing_game'])}")

    def save_weights(self, path: Path, step: int) -> None:
        from models.fusion import save_fusion

        save_fusion(self.model, self.config, path)

    def plot_title(self) -> str:
        s = self.s
        return f"fusion {s.mode}: BLIP {s.blip_preset} + SAM {s.sam_preset}, {len(self.data.images)} images"

    def summary(self, log) -> dict[str, Any]:
        from training.common import mean_or_none

        return {**super().summary(log), "train_accuracy_last": mean_or_none(log["accuracy"][-10:])}

    def records(self, step: int, evals) -> tuple[dict[str, Any], dict[str, Any]]:
        from training.fusion_eval import gain
        from training.outputs import eval_at

        final_eval = eval_at(evals, step)
        accuracy = {"held_out_itm_accuracy": None if final_eval is None else final_eval["itm_accuracy"]}
        held_out = None if self.held_out is None else self.held_out.held_out
        return accuracy, {"held_out": held_out, "baseline": self.baseline, "gain": gain(final_eval, self.baseline),
                          **accuracy}

    def meta(self) -> dict[str, Any]:
        s, h = self.s, self.held_out
        fingerprints = self.fingerprints(s)
        blip = {"preset": s.blip_preset, "checkpoint": s.blip_checkpoint, "fingerprint": fingerprints["blip_weights"],
                "config": self.itm.config.to_dict()}
        sam = {"preset": s.sam_preset, "checkpoint": s.sam_checkpoint, "fingerprint": fingerprints["sam_weights"],
               "config": self.sam.config.to_dict()}
        return {
            "fusion": self.config.to_dict(),
            "seeds": {"train": s.seed, "source": getattr(self.params, "seed", None), "eval": s.held_out_seed,
                      "pairs": f"numpy default_rng([{s.seed}, step])",
                      "eval_pairs": f"numpy default_rng({s.held_out_seed})", "torch": s.seed},
            "model": {"mode": s.mode, "config": self.config.to_dict(),
                      "parameters": sum(p.numel() for p in self.model.parameters()), "blip": blip, "sam": sam},
            "blip": blip,
            "sam": sam,
            "source": {"name": s.source, "params": self.params.model_dump(mode="json"),
                       "samples": len(self.data.samples), "images": len(self.data.images)},
            "eval_source": None if h is None else {
                "name": s.source, "params": h.params.model_dump(mode="json"), "samples": len(h.data.samples),
                "images": len(h.data.images), "pairs": len(self.eval_pairs.images), "held_out": h.held_out},
        }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


main = FusionTrainer.main

if __name__ == "__main__":
    raise SystemExit(main())
