"""The EfficientSAM family: presets -> models, the published and bundled (shapes) checkpoints.

``tiny``: random initialisation from a fixed seed (identical in every process), no file needed;
a ``path`` still loads a file into it. ``shapes``: the project's model trained on the synthetic
``shapes`` data (``runtime train sam``), shipped as ``models/assets/shapes/efficient_sam.safetensors``,
or a ``path``; ``runtime train sam`` starts it from its seeded random initialisation
(``EFFICIENT_SAM.random_fingerprint``). ``vitt`` / ``vits``: ``efficient_sam_vitt.pt`` /
``efficient_sam_vits.pt`` given as ``path`` or found in the weights folder; the model is then
built on the meta device and materialised, so no time goes into a random initialisation that
the file overwrites.

The published files hold the state dict under ``"model"`` (278 entries); it must fit exactly:
no missing, unexpected or mismatched keys. ``pixel_mean`` / ``pixel_std`` are not in it (they
are non-persistent buffers). ``image_encoder.pos_embed`` stays at its 14x14 pretraining grid
and is resized at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from models.efficient_sam.config import PRESETS, REPO
from models.family import Loaded, ModelFamily, Published, RandomInit
from models.weights import LoadReport, WeightsError, apply_state_dict, load_checkpoint, weights_dir

if TYPE_CHECKING:  # the model code (torch) is imported where a model is built: lookup and fingerprints need none
    import torch

    from models.efficient_sam.efficient_sam import EfficientSam


class EfficientSamFamily(ModelFamily):
    """EfficientSAM's files: a single ``.pt`` / ``.safetensors`` file, never the published ``.zip``."""

    def check_path(self, preset: str, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix == ".zip":
            raise WeightsError(f"{path} is a zip archive: unzip it and pass the .pt file inside "
                               f"(efficient_sam_vits.pt is published zipped at {REPO})")
        if not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist")
        return path

    def missing_hint(self, preset: str) -> str:
        root, source = weights_dir(), self.source(preset)
        name = source.files[0][0] if isinstance(source, Published) else None
        if root is not None and name and (root / f"{name}.zip").exists():
            return f". Found {root / (name + '.zip')}: unzip it into {root} (it holds {name})"
        return ""

    def build_random(self, preset: str, device) -> Loaded:
        return Loaded(build_model(preset, device, empty=False).eval(), LoadReport())

    def load_found(self, preset: str, found: Path, device) -> Loaded:
        state = load_checkpoint(found)
        _check_is_sam(state, found, preset)
        model = build_model(preset, device, empty=True)
        report = apply_state_dict(model, state, f"checkpoint {found}")
        if report.unexpected:
            raise WeightsError(f"checkpoint {found} does not fit the EfficientSAM '{preset}' preset: "
                               f"{report.summary()}")
        return Loaded(model.eval(), report)


EFFICIENT_SAM = EfficientSamFamily("EfficientSAM", PRESETS, random_tag={"model": "efficient_sam"})


def load_efficient_sam(preset: str, path: str | Path | None = None,
                       device: torch.device | str = "cpu") -> tuple[EfficientSam, LoadReport]:
    """The EfficientSAM of ``preset`` in eval mode and what the loading did."""
    loaded = EFFICIENT_SAM.load(preset, path, device)
    return loaded.model, loaded.report


def build_model(preset: str, device: torch.device | str = "cpu", *, empty: bool | None = None) -> EfficientSam:
    """A model of ``preset``. ``empty=False`` (default for ``tiny``; what ``runtime train sam``
    starts ``tiny`` and ``shapes`` from): seeded random init on the CPU, the same weights in every
    process and on every device. ``empty=True`` (default otherwise, ``shapes`` included, and
    whenever a checkpoint follows): built on the meta device and materialised uninitialised, the
    non-persistent buffers refilled; every parameter must then come from a checkpoint."""
    from models.build import build_preset
    from models.efficient_sam.efficient_sam import EfficientSam

    config = EFFICIENT_SAM.config(preset)
    if empty is None:
        empty = not isinstance(EFFICIENT_SAM.source(preset), RandomInit)
    return build_preset(lambda: EfficientSam(config), empty, device, EFFICIENT_SAM.random_init(preset).seed)


def _check_is_sam(state: dict[str, torch.Tensor], path: Path, preset: str) -> None:
    parts = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
    if not all(any(k.startswith(p) for k in state) for p in parts):
        shown = ", ".join(sorted(state)[:3])
        raise WeightsError(f"{path} is not an EfficientSAM checkpoint (expected image_encoder.*, prompt_encoder.* "
                           f"and mask_decoder.* keys; found {shown}{', ...' if len(state) > 3 else ''})")
    patch = state.get("image_encoder.patch_embed.proj.weight")
    width = EFFICIENT_SAM.config(preset).encoder_width
    if patch is not None and patch.shape[0] != width:
        fits = [name for name, p in PRESETS.items() if p.config.encoder_width == patch.shape[0]]
        raise WeightsError(f"{path} has an image encoder of width {patch.shape[0]} but the '{preset}' preset is "
                           f"{width} wide" + (f": it is the '{fits[0]}' checkpoint (check --preset)" if fits else ""))
