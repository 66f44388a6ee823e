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
weights as an uninterrupted run (on the same device and threads).

Outputs in ``--out DIR``: ``fusion.safetensors`` (the weights a graph names; config in its
metadata), ``checkpoint.pt`` (resumable), ``loss.csv``, ``loss.png``, ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.common import (add_checkpoint_option, add_device_options, add_optimisation_options,
                             add_output_options, add_source_options, check_same_run, finite_loss, mean_or_none,
                             add_weights_option, parse_source_params, source_num_images, start_run)

DEFAULT_STEPS = 200
CHECKPOINT_FORMAT = "pnpvqa-fusion-training"
CHECKPOINT_VERSION = 1
# settings that may differ between a run and its --resume continuation
# (the frozen models are compared by their weights' fingerprints, not by file paths)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "quiet", "out", "resume", "feature_cache", "weights",
                     "blip_checkpoint", "sam_checkpoint")


@dataclass
class TrainSettings:
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
    checkpoint_every: int = 50
    feature_cache: int = 4096
    feature_batch: int = 16
    device: str = "auto"
    resume: bool = False
    quiet: bool = False

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in asdict(self).items() if k not in RESUMABLE_CHANGES}


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float]
    accuracies: list[float]
    seconds: float


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runtime train fusion",
        description="Train a BLIP + EfficientSAM fusion module (concat_conv, cross_attention or difnet) on "
                    "image-question matching with frozen BLIP ITM and SAM. Writes DIR/fusion.safetensors (the "
                    "weights a graph names), DIR/checkpoint.pt, DIR/loss.csv, DIR/loss.png, DIR/config.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_output_options(p)
    m = p.add_argument_group("models")
    m.add_argument("--mode", choices=["concat_conv", "cross_attention", "difnet"], default="difnet")
    m.add_argument("--blip-preset", default="tiny", choices=["tiny", "base", "large"], help="frozen BLIP ITM")
    m.add_argument("--blip-checkpoint", metavar="FILE", help="explicit BLIP ITM checkpoint file")
    m.add_argument("--sam-preset", default="tiny", choices=["tiny", "vitt", "vits"], help="frozen EfficientSAM")
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
    add_source_options(p)
    t = add_optimisation_options(p, steps=DEFAULT_STEPS, batch_size=8, batch_help="positives per step (as many "
                                 "negatives)", lr=1e-3, lr_help="AdamW learning rate (constant)", weight_decay=0.01,
                                 weight_decay_help=None, warmup=False)
    add_checkpoint_option(t)
    t.add_argument("--feature-cache", type=int, default=4096, metavar="IMAGES",
                   help="images whose frozen features stay in memory")
    t.add_argument("--feature-batch", type=int, default=16, help="images per frozen-feature forward")
    add_device_options(t)
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
        checkpoint_every=args.checkpoint_every, feature_cache=args.feature_cache, feature_batch=args.feature_batch,
        device=args.device, resume=args.resume, quiet=args.quiet)


def check_settings(s: TrainSettings) -> None:
    for name in ("steps", "batch_size", "feature_cache", "feature_batch"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {s.checkpoint_every}")
    if not s.lr > 0 or s.weight_decay < 0 or s.grad_clip < 0:
        raise ValueError("--lr must be > 0, --weight-decay and --grad-clip >= 0")
    if not 0.0 <= s.swap_fraction <= 1.0:
        raise ValueError(f"--swap-fraction must be in [0, 1], got {s.swap_fraction}")


def load_checkpoint(path: Path) -> dict[str, Any]:
    from training.outputs import load_checkpoint as load

    return load(path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, kind="a fusion")


def train(s: TrainSettings) -> TrainResult:
    """Run (or resume) a training; returns the per-step losses of the whole run."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from models.blip import load_blip_itm, load_blip_tokenizer_for, tokenize_questions
    from models.blip.checkpoint import itm_fingerprint
    from models.efficient_sam import load_efficient_sam
    from models.efficient_sam import weights_fingerprint as sam_fingerprint
    from models.fusion import FusionConfig, build_fusion, fusion_fingerprint, save_fusion
    from training import outputs
    from training.data import FeatureStore, load_data, source_params
    from training.pairs import draw_pairs

    check_settings(s)
    out, ckpt_path, device, resume_state = start_run(s, load_checkpoint)
    fingerprints = {"blip_weights": itm_fingerprint(s.blip_preset, s.blip_checkpoint),
                    "sam_weights": sam_fingerprint(s.sam_preset, s.sam_checkpoint)}
    run_identity = json.dumps({**s.run_identity(), **fingerprints}, sort_keys=True)
    check_same_run(resume_state, run_identity, ckpt_path, "--steps and --checkpoint-every")

    # frozen models, eval mode, no gradients
    itm, _ = load_blip_itm(s.blip_preset, s.blip_checkpoint, device=device)
    sam, _ = load_efficient_sam(s.sam_preset, s.sam_checkpoint, device=device)
    for frozen in (itm, sam):
        frozen.eval().requires_grad_(False)
    tokenizer = load_blip_tokenizer_for(s.blip_preset)

    blip_width = itm.config.vit.width
    config = FusionConfig(mode=s.mode, blip_width=blip_width, sam_dim=sam.config.embed_dim, grid=itm.grid,
                          width=s.width or min(blip_width, 256), heads=s.heads, ffn_dim=s.ffn_dim,
                          dropout=s.dropout, sam_grid=s.sam_grid, Lf=s.Lf, T=s.T, N=s.N, sam_cls=s.sam_cls)
    params = source_params(s.source, s.seed, s.num_images, s.source_params)
    data = load_data(s.source, params, s.limit)
    store = FeatureStore(data, itm, sam, device, chunk=s.feature_batch, max_cached=s.feature_cache)

    torch.manual_seed(s.seed)
    model = build_fusion(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    losses: list[float] = []
    accuracies: list[float] = []
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

    meta = {
        "fusion": config.to_dict(),
        "training": {k: v for k, v in asdict(s).items() if k not in ("resume", "quiet")},
        "blip": {"preset": s.blip_preset, "checkpoint": s.blip_checkpoint,
                 "fingerprint": fingerprints["blip_weights"]},
        "sam": {"preset": s.sam_preset, "checkpoint": s.sam_checkpoint, "fingerprint": fingerprints["sam_weights"]},
        "source": {"name": s.source, "params": params.model_dump(mode="json"),
                   "samples": len(data.samples), "images": len(data.images)},
        "device": str(device),
    }

    def save(step: int, final: bool) -> None:
        outputs.save_checkpoint(
            ckpt_path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, step=step,
            model={k: v.detach().cpu() for k, v in model.state_dict().items()},
            optimizer=optimizer.state_dict(), rng=outputs.rng_state(device), fusion_config=config.to_json(),
            run=run_identity, losses=torch.tensor(list(losses), dtype=torch.float64),
            accuracies=torch.tensor(list(accuracies), dtype=torch.float64))
        save_fusion(model, config, out / "fusion.safetensors")
        outputs.write_loss_csv(out / "loss.csv", losses, accuracies)
        if final:
            outputs.write_loss_plot(out / "loss.png", losses, f"fusion {s.mode}: BLIP {s.blip_preset} + "
                                    f"SAM {s.sam_preset}, {len(data.images)} images", "ITM cross-entropy")
        summary = {**meta, "steps_done": step, "finished": final and step >= s.steps,
                   "fusion_fingerprint": fusion_fingerprint(out / "fusion.safetensors"),
                   "loss_first": mean_or_none(losses[:10]), "loss_last": mean_or_none(losses[-10:])}
        outputs.write_json(out / "config.json", summary)

    started = time.perf_counter()
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
            if s.checkpoint_every and done % s.checkpoint_every == 0 and done < s.steps:
                save(done, final=False)
    finally:
        bar.close()
    save(max(start, s.steps), final=True)
    return TrainResult(out=out, steps=len(losses), losses=losses, accuracies=accuracies,
                       seconds=time.perf_counter() - started)


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
    from models.weights import WeightsError
    from training.outputs import MissingDependency

    args = parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        result = train(settings)
    except KeyboardInterrupt:
        print("interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, WeightsError, FloatingPointError, MissingDependency) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first = result.losses[:10]
    last = result.losses[-10:]
    print(f"trained {result.steps} steps in {result.seconds:.1f} s: loss {np.mean(first):.4f} (first "
          f"{len(first)}) -> {np.mean(last):.4f} (last {len(last)}); weights {result.out / 'fusion.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
