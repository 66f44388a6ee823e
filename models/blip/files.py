"""Where BLIP weights are and what identifies them: checkpoint file names and where they are
published, the lookup in the weights folder, fingerprints. No torch: validation and cache
keys use this without importing the model code (``checkpoint.py`` loads the files).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from models.blip.config import PRESETS, TINY_TOKENIZER_DIR, BlipConfig, blip_config
from models.blip.hf_format import blip_config_of, check_architecture, has_tokenizer, is_hf_folder, weight_files
from models.hf_hub import local_path
from models.weights import WeightsError, file_fingerprint, find_weights, random_weights, shapes_weights

Kind = Literal["itm", "caption"]
KINDS = ("itm", "caption")
TINY_SEED = 0
TINY_INIT_VERSION = 1  # bump when the tiny initialisation changes (it is part of the fingerprint)
TOKENIZER_FOLDER = ("bert-base-uncased", "https://huggingface.co/google-bert/bert-base-uncased "
                    "(vocab.txt, tokenizer.json, tokenizer_config.json)")

_BLIP = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
_LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP/"
# standard file names (first = preferred) and where they are published; LAVIS configs
# blip_itm_{base,large}.yaml, blip_caption_{base,large}_coco.yaml, pnp-vqa/pnp_vqa_*.yaml
CHECKPOINT_FILES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "itm": {
        "base": (("model_base_retrieval_coco.pth", _BLIP + "model_base_retrieval_coco.pth"),),
        "large": (("model_large_retrieval_coco.pth", _BLIP + "model_large_retrieval_coco.pth"),
                  ("model_large_retrieval_coco_train2014.pth",  # PNP-VQA's own choice
                   _BLIP + "model_large_retrieval_coco_train2014.pth")),
    },
    "caption": {
        "base": (("blip_coco_caption_base.pth", _LAVIS + "blip_coco_caption_base.pth"),
                 ("model_base_capfilt_large.pth", _BLIP + "model_base_capfilt_large.pth")),
        "large": (("model_large_caption.pth", _BLIP + "model_large_caption.pth"),
                  ("model_large_caption_coco_train2014.pth",  # PNP-VQA's own choice
                   _BLIP + "model_large_caption_coco_train2014.pth")),
    },
}
SHAPES_TRAIN_COMMAND = {kind: f"bin/train-shapes {kind}" for kind in ("itm", "caption")}


def checkpoint_path(kind: Kind, preset: str) -> Path:
    """The checkpoint of a ``base`` / ``large`` model in the weights folder: the first of its
    accepted file names that exists, else a ``WeightsError`` naming the preferred one. For
    ``shapes``: the bundled file ``models/assets/shapes/blip_{kind}.safetensors``."""
    if preset == "shapes":
        return shapes_weights(f"blip_{kind}.safetensors", SHAPES_TRAIN_COMMAND[kind])
    candidates = _candidates(kind, preset)
    first_error = None
    for name, url in candidates:
        try:
            return find_weights(name, url)
        except WeightsError as exc:
            first_error = first_error or exc
    others = ", ".join(name for name, _ in candidates[1:])
    raise WeightsError(f"{first_error}" + (f" (also accepted: {others})" if others else "")) from None


def random_init_fingerprint(kind: Kind, preset: str) -> str:
    """Identifies the seeded random initialisation of ``preset`` (``build_model(empty=False)``)."""
    _check(kind, preset)
    spec = {"kind": kind, "config": blip_config(preset).to_dict(), "seed": TINY_SEED,
            "init_version": TINY_INIT_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def weights_fingerprint(kind: Kind, preset: str, path: str | Path | None = None) -> str:
    """Identifies the weights a load would give: for ``tiny`` without a file, its
    :func:`random_init_fingerprint`; otherwise the checkpoint file's fingerprint (a Hugging
    Face folder: its config and weight files')."""
    _check(kind, preset)
    if path is None and (preset == "tiny" or random_weights()):
        return random_init_fingerprint(kind, preset)
    found = find_checkpoint(kind, preset, path)
    if found.is_dir():
        parts = [file_fingerprint(f) for f in [found / "config.json", *weight_files(found)]]
        return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:32]
    return file_fingerprint(found)


def find_checkpoint(kind: Kind, preset: str, path: str | Path | None = None) -> Path | None:
    """What a load would read: ``path`` (a LAVIS checkpoint file, a Hugging Face BLIP folder, or
    ``hf:ORG/NAME`` in the local Hugging Face cache), else the preset's standard file
    (:func:`checkpoint_path`), else ``None`` for ``tiny``. Raises ``WeightsError`` when missing."""
    _check(kind, preset)
    if path is not None:
        path = local_path(path)
        if path.is_dir():
            if not is_hf_folder(path):
                raise WeightsError(f"{path} is a folder without config.json: give a checkpoint file or a Hugging "
                                   "Face BLIP folder (config.json + model.safetensors or pytorch_model.bin)")
            check_architecture(path, kind)
            weight_files(path)
            return path
        if not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist")
        return path
    return None if preset == "tiny" or random_weights() else checkpoint_path(kind, preset)


def model_config(kind: Kind, preset: str, checkpoint: str | Path | None = None) -> BlipConfig:
    """The sizes of the model a load would give: a Hugging Face folder's own, else the preset's
    (also when the checkpoint is missing: ``problems`` reports that before any work)."""
    path = _resolved(checkpoint)
    if path is not None and is_hf_folder(path):
        try:
            return blip_config_of(path)
        except WeightsError:  # reported by problems()
            pass
    return blip_config(preset)


def _resolved(checkpoint: str | Path | None) -> Path | None:
    """The local path of a checkpoint; None when not given or not found (``problems`` says so)."""
    if checkpoint is None:
        return None
    try:
        return local_path(checkpoint)
    except WeightsError:
        return None


def itm_config(preset: str, checkpoint: str | Path | None = None) -> BlipConfig:
    return model_config("itm", preset, checkpoint)


def caption_config(preset: str, checkpoint: str | Path | None = None) -> BlipConfig:
    return model_config("caption", preset, checkpoint)


def find_itm_checkpoint(preset: str, path: str | Path | None = None) -> Path | None:
    return find_checkpoint("itm", preset, path)


def find_caption_checkpoint(preset: str, path: str | Path | None = None) -> Path | None:
    return find_checkpoint("caption", preset, path)


def itm_fingerprint(preset: str, path: str | Path | None = None) -> str:
    return weights_fingerprint("itm", preset, path)


def caption_fingerprint(preset: str, path: str | Path | None = None) -> str:
    return weights_fingerprint("caption", preset, path)


def _candidates(kind: Kind, preset: str) -> tuple[tuple[str, str], ...]:
    _check(kind, preset)
    if preset == "tiny":
        raise ValueError("the tiny preset has no checkpoint file")
    return CHECKPOINT_FILES[kind][preset]


def _check(kind: str, preset: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown BLIP model kind {kind!r}; choose 'itm' or 'caption'")
    if preset not in PRESETS:
        raise ValueError(f"unknown BLIP preset {preset!r}; choose one of {', '.join(PRESETS)}")


def tokenizer_dir(preset: str, checkpoint: str | Path | None = None) -> Path:
    """The tokenizer of a Hugging Face folder that ships one, else the preset's."""
    path = _resolved(checkpoint)
    if path is not None and is_hf_folder(path):
        return path if has_tokenizer(path) else blip_tokenizer_dir("base")
    if checkpoint is None and random_weights():  # random weights need no real vocabulary
        return TINY_TOKENIZER_DIR
    return blip_tokenizer_dir(preset)


def blip_tokenizer_dir(preset: str) -> Path:
    """The bundled tiny tokenizer for ``tiny`` and ``shapes``; ``bert-base-uncased/`` in the weights folder
    (``WeightsError`` naming it when absent) for ``base`` / ``large``."""
    if preset in ("tiny", "shapes"):
        return TINY_TOKENIZER_DIR
    if preset not in ("base", "large"):
        raise ValueError(f"unknown BLIP preset {preset!r}; choose one of tiny, shapes, base, large")
    return find_weights(*TOKENIZER_FOLDER)
