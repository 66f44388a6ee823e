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
:func:`check_metrics` computes ``itm_accuracy``, ``swap_accuracy`` and ``pointing_game`` of a
weights file with the shapes ITM and SAM on a fixed small set for the shipped file's manifest.

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
parser = FusionTrainer.parser

if __name__ == "__main__":
    raise SystemExit(main())
