"""``runtime train caption``: train the BLIP captioner (ViT + decoder) to caption sampled patches.

PNP-VQA's ``caption`` stage feeds the decoder only ``num_patches`` (20) patch tokens of the
image (sampled from the question-guided heatmap; index + 1 skips the ViT's CLS) after the prompt
``[DEC] a picture of``. This command trains the captioner for exactly that input on the
synthetic ``shapes`` data: each sample is an image and a random subset of ``--num-patches``
patches (uniform, or with ``--object-bias B`` drawn with weight ``1 + B`` on patches an object
covers), and the target is the caption of the objects visible in those patches
(:func:`caption_for_patches`), e.g. ``"a picture of a red circle and a blue square"``, or
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
visible in the subset) and recall (visible objects that are mentioned), micro-averaged.

Outputs in ``--out DIR``: ``caption.safetensors`` (state dict with LAVIS key names;
``load_blip_caption(preset, path)`` reads it), ``checkpoint.pt`` (resumable, atomic,
``weights_only``), ``loss.csv`` (loss, teacher-forced token accuracy), ``loss.png``,
``config.json``, ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.common import (HeldOutSeed, TrainingResult, add_blip_model_options, add_checkpoint_option,
                             add_device_options, add_lr_decay_option, add_optimisation_options, add_output_options,
                             check_same_run, due, finish_run, finite_loss, mean_or_none, parse_source_params,
                             run_command, set_scheduled_lr, settings_identity, start_run, weight_decay_groups)
from shapes.captions import (MIN_OVERLAP, PROMPT, caption_for_patches, mentioned_objects,  # noqa: F401
                             object_coverage, visible_objects)
from shapes.patch_labels import PatchLabels, build_probe, patch_label_loss

DEFAULT_STEPS = 300
CHECKPOINT_FORMAT = "pnpvqa-caption-training"
CHECKPOINT_VERSION = 1
EVAL_BATCH = 64
GENERATE_MAX_LENGTH = 24  # prompt (4) + 4 objects x 3 words + 3 "and" + [SEP] = 20, with room
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "quiet", "out", "resume", "init", "vision_from", "weights",
                     "eval_every", "eval_seed", "eval_images", "eval_subsets")


# --- settings ---------------------------------------------------------------------------------

@dataclass
class CaptionSettings(HeldOutSeed):
    out: str
    preset: str = "tiny"
    init: str | None = None
    vision_from: str | None = None
    freeze_vision: bool = False
    weights: str | None = None
    seed: int = 0
    num_images: int = 16
    source_params: dict[str, Any] = field(default_factory=dict)
    num_patches: int = 20
    object_bias: float = 0.0
    subsets_per_image: int = 1
    min_overlap: float = MIN_OVERLAP
    steps: int = DEFAULT_STEPS
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 0
    lr_decay: str = "constant"
    grad_clip: float = 1.0
    patch_label_weight: float = 0.0
    patch_object_weight: float = 1.0
    checkpoint_every: int = 50
    eval_every: int = 0
    eval_seed: int | None = None
    eval_images: int = 16
    eval_subsets: int = 4
    device: str = "auto"
    resume: bool = False
    quiet: bool = False

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return settings_identity(self, RESUMABLE_CHANGES, {"lr_decay": "constant", "patch_label_weight": 0.0,
                                                           "patch_object_weight": 1.0})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runtime train caption",
        description="Train the BLIP captioner (ViT + decoder) to caption random patch subsets of shapes images "
                    "(the objects those patches show), as PNP-VQA feeds it sampled patches. Writes "
                    "DIR/caption.safetensors (loadable by load_blip_caption), DIR/checkpoint.pt, DIR/loss.csv, "
                    "DIR/loss.png, DIR/config.json, DIR/metrics.json (held-out greedy-caption accuracy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_output_options(p)
    add_blip_model_options(p, architecture="BLIP captioner", init_help="initial weights (LAVIS caption .pth or "
                           "caption.safetensors); default: the preset's own (tiny: seeded random init; base/large: "
                           "the standard file)")
    m = p.add_argument_group("vision encoder")
    m.add_argument("--vision-from", metavar="FILE", help="take the ViT (visual_encoder.*) from this BLIP checkpoint, "
                   "e.g. a trained itm.safetensors of the same preset")
    m.add_argument("--freeze-vision", action="store_true", help="keep the ViT fixed (train the decoder only)")
    d = p.add_argument_group("data (the shapes source)")
    d.add_argument("--seed", type=int, default=0, help="training seed (and the source's seed)")
    d.add_argument("--num-images", type=int, default=16, help="shapes images to train on")
    d.add_argument("--source-param", action="append", default=[], metavar="KEY=VALUE",
                   help="other shapes parameter (VALUE parsed as YAML); repeatable")
    d.add_argument("--num-patches", type=int, default=20, help="patches fed to the decoder per caption")
    d.add_argument("--object-bias", type=float, default=0.0, metavar="B",
                   help="patch sampling weight 1 + B on patches an object covers (0 = uniform)")
    d.add_argument("--subsets-per-image", type=int, default=1, metavar="S",
                   help="patch subsets per drawn image in a step (batch = batch-size / S images, each encoded once)")
    d.add_argument("--min-overlap", type=float, default=MIN_OVERLAP,
                   help="share of a patch an object must cover to be visible in it")
    t = add_optimisation_options(p, steps=DEFAULT_STEPS, batch_size=16, batch_help="(image, patch subset) "
                                 "samples per step", lr=1e-3, lr_help="AdamW learning rate (after the warmup: "
                                 "constant)", weight_decay=0.01, weight_decay_help="on weight matrices only",
                                 warmup=True)
    add_lr_decay_option(t)
    t.add_argument("--patch-label-weight", type=float, default=0.0, help="weight of the patch colour / shape "
                   "probe loss on the ViT tokens (0 = off)")
    t.add_argument("--patch-object-weight", type=float, default=1.0, metavar="W", help="weight of an object "
                   "patch relative to a background patch in the probe loss")
    add_checkpoint_option(t)
    add_device_options(t)
    e = p.add_argument_group("held-out evaluation")
    e.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also evaluate every N steps (0 = only at the start and the end)")
    e.add_argument("--eval-seed", type=int, help="shapes seed of the held-out images (default: seed + 1000)")
    e.add_argument("--eval-images", type=int, default=16, help="held-out images (0 = no evaluation)")
    e.add_argument("--eval-subsets", type=int, default=4, help="patch subsets captioned per held-out image")
    return p


def settings_from_args(args: argparse.Namespace) -> CaptionSettings:
    extra = parse_source_params(args.source_param)
    names = ("out", "preset", "init", "vision_from", "freeze_vision", "weights", "seed", "num_images", "num_patches",
             "object_bias", "subsets_per_image", "min_overlap", "steps", "batch_size", "lr", "weight_decay", "warmup",
             "lr_decay", "grad_clip", "patch_label_weight", "patch_object_weight", "checkpoint_every", "eval_every",
             "eval_seed", "eval_images", "eval_subsets", "device", "resume", "quiet")
    return CaptionSettings(source_params=extra, **{n: getattr(args, n) for n in names})


def check_settings(s: CaptionSettings) -> None:
    for name in ("steps", "batch_size", "num_images", "num_patches", "eval_subsets", "subsets_per_image"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("checkpoint_every", "eval_every", "warmup", "eval_images"):
        if getattr(s, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
    if not s.lr > 0 or min(s.weight_decay, s.grad_clip, s.object_bias, s.patch_label_weight) < 0:
        raise ValueError("--lr must be > 0, --weight-decay, --grad-clip, --object-bias and --patch-label-weight >= 0")
    if not s.patch_object_weight > 0:
        raise ValueError(f"--patch-object-weight must be > 0, got {s.patch_object_weight}")
    if s.lr_decay not in ("constant", "cosine"):
        raise ValueError(f"--lr-decay must be constant or cosine, got {s.lr_decay!r}")
    if s.patch_label_weight > 0 and s.freeze_vision:
        raise ValueError("--patch-label-weight trains the ViT: it cannot go with --freeze-vision")
    if not 0.0 < s.min_overlap <= 1.0:
        raise ValueError(f"--min-overlap must be in (0, 1], got {s.min_overlap}")
    if {"seed", "num_images"} & set(s.source_params):
        raise ValueError("set the seed and the number of images with --seed / --num-images, not --source-param")


# --- data -------------------------------------------------------------------------------------

class ShapesImages:
    """Rendered shapes scenes of one seed, with their per-patch object coverage, by index."""

    def __init__(self, params, count: int, grid: int, image_size: int, min_overlap: float) -> None:
        from shapes.dataset import render_scene

        self.grid, self.image_size, self.min_overlap = grid, image_size, min_overlap
        self.scenes, self.images, self.coverage = [], [], []
        for i in range(count):
            scene = render_scene(params.seed, i, params)
            self.images.append(scene.image)
            self.scenes.append(json.loads(scene.to_json()))
            self.coverage.append(object_coverage(self.scenes[-1], grid, masks=scene.masks))

    def __len__(self) -> int:
        return len(self.scenes)

    def pixels(self, indices: Sequence[int]):
        from training.data import blip_pixels

        return blip_pixels([self.images[i] for i in indices], self.image_size)

    def sample_patches(self, i: int, rng: np.random.Generator, k: int, object_bias: float) -> np.ndarray:
        """``[k]`` sorted distinct patch indices of image ``i`` (Gumbel-top-k on the weights)."""
        from stages.grid import sample_patch_sets

        cover = self.coverage[i]
        on_object = (cover >= self.min_overlap).any(axis=0) if len(cover) else np.zeros(self.grid ** 2, bool)
        weights = 1.0 + object_bias * on_object.astype(np.float64)
        return sample_patch_sets(weights[None], [rng], 1, k)[0, 0]

    def caption(self, i: int, patches: Sequence[int]) -> str:
        return caption_for_patches(self.scenes[i], patches, self.grid, min_overlap=self.min_overlap,
                                   coverage=self.coverage[i])

    def visible(self, i: int, patches: Sequence[int]) -> list[tuple[str, str]]:
        return visible_objects(self.scenes[i], patches, self.grid, min_overlap=self.min_overlap,
                               coverage=self.coverage[i])


def patch_states(tokens, patches):
    """``tokens [B, 1+P, C]``, ``patches [B, K]`` (CLS excluded) -> ``[B, K, C]`` (index + 1)."""
    import torch

    index = (patches + 1)[..., None].expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, index)


def caption_batch(tokenizer, captions: Sequence[str], prompt_length: int):
    """``input_ids [B, T]`` (``[DEC]`` first) and ``targets [B, T]`` (-100 on the prompt and padding)."""
    enc = tokenizer(list(captions), padding="longest", return_tensors="pt")
    input_ids = enc["input_ids"].clone()
    input_ids[:, 0] = tokenizer.bos_token_id
    targets = input_ids.masked_fill(enc["attention_mask"] == 0, -100)
    targets[:, :prompt_length] = -100
    return input_ids, targets


# --- evaluation -------------------------------------------------------------------------------

def evaluate(model, tokenizer, images: ShapesImages, subsets: list[tuple[int, np.ndarray]], prompt_ids,
             device, step: int) -> dict[str, Any]:
    """Greedy captions of the held-out patch subsets against :func:`caption_for_patches`."""
    import torch

    was_training = model.training
    model.eval()
    texts: list[str] = []
    with torch.no_grad():
        for s in range(0, len(subsets), EVAL_BATCH):
            chunk = subsets[s:s + EVAL_BATCH]
            tokens = model.encode_image(images.pixels([i for i, _ in chunk]).to(device))
            patches = torch.from_numpy(np.stack([p for _, p in chunk])).to(device).long()
            ids = model.generate(patch_states(tokens, patches), prompt_ids.to(device), None,
                                 max_length=GENERATE_MAX_LENGTH, min_length=0,
                                 eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(ids[:, len(prompt_ids):], skip_special_tokens=True)
    model.train(was_training)
    exact = mentioned = mentioned_ok = visible_total = visible_found = empty = empty_ok = 0
    examples = []
    for (i, patches), text in zip(subsets, texts):
        target = images.caption(i, patches)[len(PROMPT):]
        text = " ".join(text.split())
        exact += text == target
        seen = set(images.visible(i, patches))
        named = mentioned_objects(text)
        mentioned += len(named)
        mentioned_ok += sum(o in seen for o in named)
        visible_total += len(seen)
        visible_found += len(seen & set(named))
        if not seen:
            empty += 1
            empty_ok += text == target
        if len(examples) < 8:
            examples.append({"image": int(i), "target": PROMPT + target, "generated": PROMPT + text})
    n = len(subsets)
    return {"step": step, "subsets": n, "exact_match": exact / n if n else None,
            "object_precision": mentioned_ok / mentioned if mentioned else None,
            "object_recall": visible_found / visible_total if visible_total else None,
            "mentioned_objects": mentioned, "visible_objects": visible_total,
            "empty_subsets": empty, "empty_exact_match": empty_ok / empty if empty else None,
            "examples": examples}


def check_metrics(weights: Path, *, seed: int = 7000, num_images: int = 24, subsets: int = 4,
                  num_patches: int = 20, object_bias: float = 3.0) -> dict[str, float]:
    """Held-out greedy-caption exact match and object precision / recall of the shapes captioner
    ``weights`` on ``subsets`` patch subsets of each of ``num_images`` shapes images of ``seed``:
    the quick, deterministic check that a shipped file still gives its manifest's numbers."""
    import torch

    from models.blip.checkpoint import load_blip_caption
    from models.blip.tokenizer import caption_prompt_ids, load_blip_tokenizer_for
    from training.data import source_params

    model, _ = load_blip_caption("shapes", weights)
    tokenizer = load_blip_tokenizer_for("shapes")
    images = ShapesImages(source_params("shapes", seed, num_images, {}), num_images, model.grid,
                          model.config.vit.image_size, MIN_OVERLAP)
    rng = np.random.default_rng(seed)
    chosen = [(i, images.sample_patches(i, rng, num_patches, object_bias)) for i in range(num_images)
              for _ in range(subsets)]
    result = evaluate(model, tokenizer, images, chosen, caption_prompt_ids(tokenizer, PROMPT), torch.device("cpu"), 0)
    return {k: result[k] for k in ("exact_match", "object_precision", "object_recall")}


# --- files ------------------------------------------------------------------------------------

def load_checkpoint(path: Path) -> dict[str, Any]:
    from training.outputs import load_checkpoint as load

    return load(path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, kind="a caption")


def save_weights(model, path: Path, metadata: dict[str, str]) -> None:
    """The model's state dict (LAVIS key names) as safetensors, atomically."""
    from training.outputs import atomic_save_safetensors

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_save_safetensors(tensors, path, metadata)


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


# --- training ---------------------------------------------------------------------------------

def train(s: CaptionSettings, command: Sequence[str] = ()) -> TrainingResult:
    """Run (or resume) a training; returns the per-step losses of the whole run and the metrics."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from models.blip.checkpoint import build_model
    from training.common import initial_blip, initial_blip_fingerprint
    from models.blip.tokenizer import caption_prompt_ids, load_blip_tokenizer_for
    from models.weights import file_fingerprint
    from training import outputs
    from training.data import source_params
    from training.fusion import pair_rows

    check_settings(s)
    out, ckpt_path, device, resume_state = start_run(s, load_checkpoint)
    init_fingerprint = initial_blip_fingerprint("caption", s.preset, s.init)
    vision_fingerprint = None if s.vision_from is None else file_fingerprint(Path(s.vision_from))
    run_identity = json.dumps({**s.run_identity(), "init_weights": init_fingerprint,
                               "vision_weights": vision_fingerprint}, sort_keys=True)
    check_same_run(resume_state, run_identity, ckpt_path, "--checkpoint-every, --eval-* and, without "
                   "--lr-decay cosine, --steps")

    model = (build_model("caption", s.preset, device, empty=True) if resume_state is not None
             else initial_blip("caption", s.preset, s.init, device))
    model.train()
    grid, image_size = model.grid, model.config.vit.image_size
    if s.num_patches > grid * grid:
        raise ValueError(f"--num-patches {s.num_patches} exceeds the {grid}x{grid} patch grid")
    tokenizer = load_blip_tokenizer_for(s.preset)
    prompt_ids = caption_prompt_ids(tokenizer, PROMPT)

    params = source_params("shapes", s.seed, s.num_images, s.source_params)
    data = ShapesImages(params, s.num_images, grid, image_size, s.min_overlap)
    eval_data = eval_subsets = eval_params = None
    if s.eval_images:
        eval_params = source_params("shapes", s.held_out_seed, s.eval_images, s.source_params)
        eval_data = ShapesImages(eval_params, s.eval_images, grid, image_size, s.min_overlap)
        rng = np.random.default_rng(s.held_out_seed)
        eval_subsets = [(i, eval_data.sample_patches(i, rng, s.num_patches, s.object_bias))
                        for i in range(s.eval_images) for _ in range(s.eval_subsets)]

    torch.manual_seed(s.seed)
    if s.vision_from is not None and resume_state is None:
        load_vision(model, Path(s.vision_from))
    if s.freeze_vision:
        model.visual_encoder.requires_grad_(False)
    groups = weight_decay_groups(model, s.weight_decay)
    probe = patch_targets = None
    if s.patch_label_weight > 0:
        probe = build_probe(model.config.vit.width).to(device)
        groups.append({"params": list(probe.parameters()), "weight_decay": 0.0})
        patch_targets = PatchLabels(data.scenes, grid)
    optimizer = torch.optim.AdamW(groups, lr=s.lr)
    losses: list[float] = []
    accuracies: list[float] = []
    evals: list[dict[str, Any]] = []
    invocations: list[dict[str, Any]] = []
    train_seconds = 0.0
    start = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        model.reset_buffers()
        if probe is not None:
            probe.load_state_dict(resume_state["probe"])
        optimizer.load_state_dict(resume_state["optimizer"])
        outputs.set_rng_state(resume_state["rng"], device)
        start = int(resume_state["step"])
        losses = resume_state["losses"].tolist()
        accuracies = resume_state["accuracies"].tolist()
        evals = json.loads(resume_state["evals"])
        invocations = json.loads(resume_state["invocations"])
        train_seconds = float(resume_state["train_seconds"])
    invocations.append({"command": "runtime train caption " + shlex.join(command), "from_step": start,
                        "to_step": None})

    meta = {
        "training": {k: v for k, v in asdict(s).items() if k not in ("resume", "quiet")},
        "seeds": {"train": s.seed, "source": params.seed, "eval": s.held_out_seed,
                  "batches": f"numpy default_rng([{s.seed}, step])",
                  "eval_subsets": f"numpy default_rng({s.held_out_seed})"},
        "model": {"preset": s.preset, "init": s.init, "init_fingerprint": init_fingerprint,
                  "vision_from": s.vision_from, "vision_fingerprint": vision_fingerprint,
                  "freeze_vision": s.freeze_vision,
                  "config": model.config.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
                  "grid": grid},
        "prompt": PROMPT,
        "source": {"name": "shapes", "params": params.model_dump(mode="json"), "images": len(data)},
        "eval_source": None if eval_params is None else {
            "name": "shapes", "params": eval_params.model_dump(mode="json"), "images": len(eval_data),
            "subsets": len(eval_subsets)},
        "device": str(device), "torch_threads": torch.get_num_threads(),
    }

    def run_eval(step: int) -> None:
        if eval_subsets is None or any(e["step"] == step for e in evals):
            return
        result = evaluate(model, tokenizer, eval_data, eval_subsets, prompt_ids, device, step)
        evals.append(result)
        if not s.quiet:
            print(f"step {step}: held-out exact match {result['exact_match']:.3f}, object precision "
                  f"{_fmt(result['object_precision'])}, recall {_fmt(result['object_recall'])}", file=sys.stderr)

    def save(step: int, final: bool, seconds: float) -> None:
        outputs.save_checkpoint(
            ckpt_path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, step=step,
            model={k: v.detach().cpu() for k, v in model.state_dict().items()},
            probe={} if probe is None else {k: v.detach().cpu() for k, v in probe.state_dict().items()},
            optimizer=optimizer.state_dict(), rng=outputs.rng_state(device), run=run_identity,
            losses=torch.tensor(losses, dtype=torch.float64), accuracies=torch.tensor(accuracies, dtype=torch.float64),
            evals=json.dumps(evals), invocations=json.dumps(invocations), train_seconds=seconds)
        save_weights(model, out / "caption.safetensors",
                     {"format": "pnpvqa-blip-caption", "preset": s.preset, "step": str(step), "prompt": PROMPT,
                      "config": json.dumps(model.config.to_dict(), sort_keys=True)})
        outputs.write_loss_csv(out / "loss.csv", losses, accuracies)
        if final:
            outputs.write_loss_plot(out / "loss.png", losses, f"BLIP caption {s.preset}: {s.num_patches} "
                                    f"patches, {len(data)} images", "caption cross-entropy (per token)")
        finished = final and step >= s.steps
        summary = {"loss_first": mean_or_none(losses[:10]), "loss_last": mean_or_none(losses[-10:]),
                   "token_accuracy_last": mean_or_none(accuracies[-10:])}
        outputs.write_run_records(out, meta, invocations, evals, step=step, finished=finished, seconds=seconds,
                                  eval_seed=s.held_out_seed, summary=summary,
                                  config_extra={"weights_fingerprint": file_fingerprint(out / "caption.safetensors")})

    if start == 0:
        run_eval(0)
    started = time.perf_counter()
    base_seconds = train_seconds
    prompt_length = len(prompt_ids)
    bar = tqdm(total=s.steps, initial=min(start, s.steps), desc=f"train caption {s.preset}", unit="step",
               disable=s.quiet, dynamic_ncols=True)
    try:
        for step in range(start, s.steps):
            set_scheduled_lr(optimizer, s.lr, s.warmup, step, s.steps, s.lr_decay)
            rng = np.random.default_rng([s.seed, step])
            drawn = rng.integers(0, len(data), size=-(-s.batch_size // s.subsets_per_image))
            chosen = np.repeat(drawn, s.subsets_per_image)[:s.batch_size]
            patches = np.stack([data.sample_patches(int(i), rng, s.num_patches, s.object_bias) for i in chosen])
            captions = [data.caption(int(i), p) for i, p in zip(chosen, patches)]
            input_ids, targets = caption_batch(tokenizer, captions, prompt_length)
            input_ids, targets = input_ids.to(device), targets.to(device)

            with torch.set_grad_enabled(not s.freeze_vision):
                tokens_image = model.encode_image(data.pixels([int(i) for i in drawn]).to(device))  # [U, 1+P, C]
            rows = torch.arange(len(drawn), device=device).repeat_interleave(s.subsets_per_image)[:s.batch_size]
            tokens = pair_rows(tokens_image, rows)                                          # [B, 1+P, C]
            states = patch_states(tokens, torch.from_numpy(patches).to(device).long())      # [B, K, C]
            logits = model.decoder_logits(input_ids, states)[:, :-1].float()               # [B, T-1, V]
            labels = targets[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            value = finite_loss(loss, step)  # the caption loss is what the log shows
            if probe is not None:
                colour, shape = patch_targets([int(i) for i in drawn], device)
                logits_patch = probe(tokens_image[:, 1:]).flatten(0, 1).float()         # [U * P, CLASSES]
                loss = loss + s.patch_label_weight * patch_label_loss(logits_patch, colour.flatten(), shape.flatten(),
                                                                      s.patch_object_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                trained = list(model.parameters()) + ([] if probe is None else list(probe.parameters()))
                torch.nn.utils.clip_grad_norm_(trained, s.grad_clip)
            optimizer.step()

            mask = labels != -100
            losses.append(value)
            accuracies.append(float(((logits.argmax(-1) == labels) & mask).sum() / mask.sum()))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", avg=f"{mean_or_none(losses[-20:]):.4f}")
            done = step + 1
            if due(done, s.eval_every, s.steps):
                run_eval(done)
            if due(done, s.checkpoint_every, s.steps):
                save(done, final=False, seconds=base_seconds + time.perf_counter() - started)
    finally:
        bar.close()
    final_eval = finish_run(start=start, steps=s.steps, started=started, base_seconds=base_seconds,
                            run_eval=run_eval, save=save, invocations=invocations, evals=evals)
    return TrainingResult(out=out, steps=len(losses), losses=losses, metrics=final_eval or {},
                         seconds=time.perf_counter() - started)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``runtime train caption``; returns the exit status."""
    return run_command(argv, parser(), settings_from_args, train, "caption.safetensors",
                       lambda m: (f"held-out exact match {m['exact_match']:.3f}, object precision "
                       f"{_fmt(m['object_precision'])}, recall {_fmt(m['object_recall'])}") if m else None)


if __name__ == "__main__":
    raise SystemExit(main())
