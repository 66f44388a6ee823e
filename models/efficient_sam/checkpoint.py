"""Build EfficientSAM models of a preset and load the published checkpoints into them.

``tiny``: random initialisation from a fixed seed (identical in every process), no file needed;
a ``path`` still loads a file into it. ``shapes``: the project's model trained on the synthetic
``shapes`` data (``runtime train sam``), shipped as ``models/assets/shapes/efficient_sam.safetensors``
(:func:`models.weights.shapes_weights`), or a ``path``; ``runtime train sam`` starts it from its
seeded random initialisation (:func:`random_init_fingerprint`). ``vitt`` / ``vits``: ``efficient_sam_vitt.pt`` /
``efficient_sam_vits.pt`` given as ``path`` or found in the weights folder
(:func:`models.weights.find_weights`); the model is then built on the meta device and
materialised, so no time goes into a random initialisation that the file overwrites.

The published files hold the state dict under ``"model"`` (278 entries); it must fit exactly:
no missing, unexpected or mismatched keys. ``pixel_mean`` / ``pixel_std`` are not in it (they
are non-persistent buffers). ``image_encoder.pos_embed`` stays at its 14x14 pretraining grid
and is resized at run time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from models.efficient_sam.config import PRESETS, sam_config
from models.weights import (LoadReport, WeightsError, apply_state_dict, file_fingerprint, find_weights,
                            load_checkpoint, random_weights, shapes_weights, weights_dir)

if TYPE_CHECKING:  # the model code (torch) is imported where a model is built: lookup and fingerprints need none
    import torch

    from models.efficient_sam.efficient_sam import EfficientSam

TINY_SEED = 0
TINY_INIT_VERSION = 1  # bump when the tiny initialisation changes (it is part of the fingerprint)
SHAPES_FILE = "efficient_sam.safetensors"
SHAPES_TRAIN_COMMAND = "bin/train-shapes sam"

_REPO = "https://github.com/yformer/EfficientSAM"
CHECKPOINT_FILES: dict[str, tuple[str, str]] = {
    "vitt": ("efficient_sam_vitt.pt", f"{_REPO} (weights/efficient_sam_vitt.pt)"),
    "vits": ("efficient_sam_vits.pt", f"{_REPO} (weights/efficient_sam_vits.pt.zip: distributed zipped, "
                                      "unzip it to efficient_sam_vits.pt)"),
}


def load_efficient_sam(preset: str, path: str | Path | None = None,
                       device: torch.device | str = "cpu") -> tuple[EfficientSam, LoadReport]:
    """The EfficientSAM of ``preset`` in eval mode and what the loading did."""
    path = find_efficient_sam(preset, path)
    if path is None:  # tiny without a file, or --random-weights: seeded random weights, nothing loaded
        return build_model(preset, device, empty=False).eval(), LoadReport()
    state = load_checkpoint(path)
    _check_is_sam(state, path, preset)
    model = build_model(preset, device, empty=True)
    report = apply_state_dict(model, state, f"checkpoint {path}")
    if report.unexpected:
        raise WeightsError(f"checkpoint {path} does not fit the EfficientSAM '{preset}' preset: "
                           f"{report.summary()}")
    return model.eval(), report


def find_efficient_sam(preset: str, path: str | Path | None = None) -> Path | None:
    """The file a load would read: ``path`` (which must exist), else the bundled file for
    ``shapes``, else the preset's standard file in the weights folder, else ``None`` for ``tiny``.
    Raises ``WeightsError`` when missing."""
    _check(preset)
    if path is not None:
        path = Path(path)
        if path.suffix == ".zip":
            raise WeightsError(f"{path} is a zip archive: unzip it and pass the .pt file inside "
                               f"(efficient_sam_vits.pt is published zipped at {_REPO})")
        if not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist")
        return path
    if preset == "tiny" or random_weights():
        return None
    if preset == "shapes":
        return shapes_weights(SHAPES_FILE, SHAPES_TRAIN_COMMAND)
    name, published = CHECKPOINT_FILES[preset]
    try:
        return find_weights(name, published)
    except WeightsError as exc:
        root = weights_dir()
        if root is not None and (root / f"{name}.zip").exists():
            raise WeightsError(f"{exc}. Found {root / (name + '.zip')}: unzip it into {root} "
                               f"(it holds {name})") from None
        raise


def random_init_fingerprint(preset: str) -> str:
    """Identifies the seeded random initialisation of ``preset`` (``build_model(empty=False)``):
    a hash of the preset's sizes, the seed and the init version."""
    _check(preset)
    spec = {"model": "efficient_sam", "config": sam_config(preset).to_dict(), "seed": TINY_SEED,
            "init_version": TINY_INIT_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def weights_fingerprint(preset: str, path: str | Path | None = None) -> str:
    """Identifies the weights a load would give: for ``tiny`` without a file, its
    :func:`random_init_fingerprint`; otherwise the checkpoint file's fingerprint (for ``shapes``
    without a file: the bundled one's)."""
    found = find_efficient_sam(preset, path)
    if found is None:
        return random_init_fingerprint(preset)
    return file_fingerprint(found)


def build_model(preset: str, device: torch.device | str = "cpu", *, empty: bool | None = None) -> EfficientSam:
    """A model of ``preset``. ``empty=False`` (default for ``tiny``; what ``runtime train sam``
    starts ``tiny`` and ``shapes`` from): seeded random init on the CPU, the same weights in every
    process and on every device. ``empty=True`` (default otherwise, ``shapes`` included, and
    whenever a checkpoint follows): built on the meta device and materialised uninitialised, the
    non-persistent buffers refilled; every parameter must then come from a checkpoint."""
    from models.build import build_preset
    from models.efficient_sam.efficient_sam import EfficientSam

    _check(preset)
    if empty is None:
        empty = preset != "tiny"
    return build_preset(lambda: EfficientSam.preset(preset), empty, device, TINY_SEED)


def _check_is_sam(state: dict[str, torch.Tensor], path: Path, preset: str) -> None:
    parts = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
    if not all(any(k.startswith(p) for k in state) for p in parts):
        shown = ", ".join(sorted(state)[:3])
        raise WeightsError(f"{path} is not an EfficientSAM checkpoint (expected image_encoder.*, prompt_encoder.* "
                           f"and mask_decoder.* keys; found {shown}{', ...' if len(state) > 3 else ''})")
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None and patch.shape[0] != sam_config(preset).encoder_width:
        fits = [p for p in PRESETS if sam_config(p).encoder_width == patch.shape[0]]
        raise WeightsError(f"{path} has an image encoder of width {patch.shape[0]} but the '{preset}' preset is "
                           f"{sam_config(preset).encoder_width} wide"
                           + (f": it is the '{fits[0]}' checkpoint (check --preset)" if fits else ""))


def _check(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown EfficientSAM preset {preset!r}; choose one of {', '.join(PRESETS)}")
