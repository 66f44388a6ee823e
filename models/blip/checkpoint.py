"""Build BLIP models of a preset and load LAVIS checkpoints into them.

The files are found by the families of ``family.py`` (``BLIP_ITM``, ``BLIP_CAPTION``), whose
``load`` calls :func:`build_model` (``tiny``: random initialisation from a fixed seed, identical
in every process), :func:`load_lavis_file` or :func:`load_hf_folder`. ``base`` / ``large``: the
LAVIS ``.pth`` file given as ``path`` or found under its standard name in the weights folder.
The model is then built on the meta device and materialised, so no time goes into a random
initialisation that the file overwrites.

Checkpoint conventions handled here: the state dict may be wrapped under ``"model"``;
momentum copies (``*_m.*``), queues and the ITC temperature (``temp``) are ignored and
reported; ``*.embeddings.position_ids`` may be absent; the caption decoder's output weight is
tied to the word embeddings (its key may be absent); ``visual_encoder.pos_embed`` is resized
when the checkpoint was trained at another image size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from models.blip.caption import BlipCaption
from models.blip.family import BLIP, Kind
from models.blip.hf_format import blip_config_of, rename_key
from models.blip.hf_format import weight_files as hf_weight_files
from models.blip.itm import BlipITM
from models.blip.vit import resize_pos_embed
from models.build import build_preset
from models.family import RandomInit
from models.weights import LoadReport, WeightsError, apply_state_dict, load_checkpoint

log = logging.getLogger(__name__)


IGNORED_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "temp")
_OWN_PART = {"itm": "text_encoder.", "caption": "text_decoder."}
_MODELS: dict[str, type[nn.Module]] = {"itm": BlipITM, "caption": BlipCaption}


def load_blip_itm(preset: str, path: str | Path | None = None,
                  device: torch.device | str = "cpu") -> tuple[BlipITM, LoadReport]:
    """The ITM model of ``preset`` in eval mode and what the loading did."""
    return load_blip("itm", preset, path, device)  # type: ignore[return-value]


def load_blip_caption(preset: str, path: str | Path | None = None,
                      device: torch.device | str = "cpu") -> tuple[BlipCaption, LoadReport]:
    """The caption model of ``preset`` in eval mode and what the loading did."""
    return load_blip("caption", preset, path, device)  # type: ignore[return-value]


def build_model(kind: Kind, preset: str, device: torch.device | str = "cpu", *,
                empty: bool | None = None) -> nn.Module:
    """A model of ``preset``. ``empty=False`` (default for ``tiny``): seeded random init, the same
    weights in every process. ``empty=True`` (default for ``base``/``large``, and used whenever a
    checkpoint follows): built on the meta device and materialised uninitialised, buffers
    recomputed and tied weights re-tied; every parameter must then come from a checkpoint."""
    family = BLIP[kind]
    config = family.config(preset)
    if empty is None:
        empty = not isinstance(family.source(preset), RandomInit)
    model = build_preset(lambda: _MODELS[kind](config), empty, device, family.random_init(preset).seed)
    if empty and isinstance(model, BlipCaption):
        model.tie_weights()
    return model


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize ``visual_encoder.pos_embed`` to the model's grid when the lengths differ."""
    key = "visual_encoder.pos_embed"
    own = model.state_dict().get(key)
    theirs = state.get(key)
    if own is not None and theirs is not None and theirs.shape[1] != own.shape[1] \
            and theirs.shape[-1] == own.shape[-1]:
        grid = model.visual_encoder.patch_embed.grid_size[0]
        state = dict(state)
        state[key] = resize_pos_embed(theirs, grid)
        log.info("resized %s from %d to %d positions", key, theirs.shape[1], own.shape[1])
    return state


def load_blip(kind: Kind, preset: str, path: str | Path | None, device) -> tuple[nn.Module, LoadReport]:
    """The ``kind`` model of ``preset`` (weights from ``path`` or the preset's) and the load report."""
    loaded = BLIP[kind].load(preset, path, device)
    return loaded.model, loaded.report


def load_lavis_file(kind: Kind, preset: str, path: Path, device) -> tuple[nn.Module, LoadReport]:
    """A LAVIS ``.pth`` (or ``.safetensors``) state dict in the ``preset`` architecture."""
    state = load_checkpoint(path)
    _check_kind(state, kind, path)
    model = build_model(kind, preset, device, empty=True)
    state = adapt_state_dict(state, model)
    momentum = sorted({key.split(".")[0] + "." for key in state if key.split(".")[0].endswith("_m")})
    prefix = _OWN_PART[kind]
    optional = [prefix + ("bert." if kind == "caption" else "") + "embeddings.position_ids"]
    if kind == "caption":  # tied to the word embeddings / to cls.predictions.bias
        optional += ["text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"]
    report = apply_state_dict(model, state, f"checkpoint {path}", ignore=momentum + list(IGNORED_KEYS),
                              optional=optional)
    return model.eval(), report


def load_hf_folder(kind: Kind, preset: str, folder: Path, device) -> tuple[nn.Module, LoadReport]:
    """A Hugging Face BLIP folder (``save_pretrained``), sizes from its ``config.json`` (not the
    preset's), the ViT's keys renamed to this project's (``models.blip.hf_format``)."""
    config = blip_config_of(folder)
    state: dict[str, torch.Tensor] = {}
    for file in hf_weight_files(folder):
        state.update(load_checkpoint(file))
    state = {rename_key(k): v for k, v in state.items()}
    model = build_preset(lambda: _MODELS[kind](config), True, device, seed=0)  # empty: the seed is unused
    optional = [_OWN_PART[kind] + ("bert." if kind == "caption" else "") + "embeddings.position_ids"]
    if kind == "caption":
        model.tie_weights()
        optional += ["text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"]
    report = apply_state_dict(model, state, f"Hugging Face folder {folder}", optional=optional)
    return model.eval(), report


def _check_kind(state: dict[str, torch.Tensor], kind: Kind, path: Path) -> None:
    has_encoder = any(k.startswith("text_encoder.") for k in state)
    has_decoder = any(k.startswith("text_decoder.") for k in state)
    if kind == "itm" and has_decoder and not has_encoder:
        raise WeightsError(f"{path} is a BLIP caption checkpoint (text_decoder.*, no text_encoder.*); the "
                           "ITM model needs a retrieval checkpoint such as model_large_retrieval_coco.pth")
    if kind == "caption" and has_encoder and not has_decoder:
        raise WeightsError(f"{path} is a BLIP ITM/retrieval checkpoint (text_encoder.*, no text_decoder.*); "
                           "the captioner needs a caption checkpoint such as model_large_caption.pth")


