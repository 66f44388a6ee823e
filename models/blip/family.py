"""The BLIP families (ITM and captioner, over the one preset table of ``config.py``): what
identifies their weights and where they are, besides the generic path of ``models.family``:
explicit Hugging Face folders (their own sizes, their kind checked), and the tokenizer folder.
No torch: validation and cache keys use this without importing the model code
(``checkpoint.py`` loads the files).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from models.blip.config import BERT_TOKENIZER, PRESETS, TINY_TOKENIZER_DIR, BlipConfig
from models.blip.hf_format import blip_config_of, check_architecture, has_tokenizer, is_hf_folder, weight_files
from models.family import Loaded, ModelFamily, Published, WeightsSource
from models.hf_hub import local_path
from models.weights import WeightsError, file_fingerprint, random_weights

Kind = Literal["itm", "caption"]


class BlipFamily(ModelFamily):
    """BLIP's ``kind`` of model (``itm`` or ``caption``): a LAVIS file or a Hugging Face folder."""

    def __init__(self, kind: Kind):
        super().__init__("BLIP", PRESETS, random_tag={"kind": kind})
        self.kind = kind

    def source(self, preset: str) -> WeightsSource:
        weights = super().source(preset)
        return weights[self.kind] if isinstance(weights, dict) else weights

    def config(self, preset: str, checkpoint: str | Path | None = None) -> BlipConfig:
        """A Hugging Face folder's own sizes, else the preset's (also when the checkpoint is
        missing: ``problems`` reports that before any work)."""
        path = _resolved(checkpoint)
        if path is not None and is_hf_folder(path):
            try:
                return blip_config_of(path)
            except WeightsError:  # reported by problems()
                pass
        return super().config(preset)

    def check_path(self, preset: str, path: str | Path) -> Path:
        """A LAVIS checkpoint file, a Hugging Face BLIP folder of this kind, or ``hf:ORG/NAME``."""
        path = local_path(path)
        if path.is_dir():
            if not is_hf_folder(path):
                raise WeightsError(f"{path} is a folder without config.json: give a checkpoint file or a Hugging "
                                   "Face BLIP folder (config.json + model.safetensors or pytorch_model.bin)")
            check_architecture(path, self.kind)
            weight_files(path)
            return path
        if not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist")
        return path

    def weight_files(self, found: Path) -> list[Path]:
        """A Hugging Face folder's weight file or the shards its index names."""
        return weight_files(found) if found.is_dir() else [found]

    def found_fingerprint(self, found: Path) -> str:
        if found.is_dir():  # a Hugging Face folder: its config and weight files
            parts = [file_fingerprint(f) for f in [found / "config.json", *weight_files(found)]]
            return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:32]
        return file_fingerprint(found)

    def build_random(self, preset: str, device) -> Loaded:
        from models.blip.checkpoint import build_model
        from models.weights import LoadReport

        return Loaded(build_model(self.kind, preset, device, empty=False).eval(), LoadReport())

    def load_found(self, preset: str, found: Path, device) -> Loaded:
        from models.blip.checkpoint import load_hf_folder, load_lavis_file

        model, report = (load_hf_folder if found.is_dir() else load_lavis_file)(self.kind, preset, found, device)
        return Loaded(model, report)

    # --- the tokenizer --------------------------------------------------------------------------
    def tokenizer_dir(self, preset: str, checkpoint: str | Path | None = None) -> Path:
        """The tokenizer of a Hugging Face folder that ships one (else ``bert-base-uncased``);
        the bundled tiny one under ``--random-weights`` (no real vocabulary needed); else the preset's."""
        path = _resolved(checkpoint)
        if path is not None and is_hf_folder(path):
            return path if has_tokenizer(path) else BERT_TOKENIZER.locate()
        if checkpoint is None and random_weights():
            return TINY_TOKENIZER_DIR
        return blip_tokenizer_dir(preset)

    def tokenizer_problems(self, preset: str, checkpoint: str | Path | None = None) -> list[tuple[str, str]]:
        try:
            self.tokenizer_dir(preset, checkpoint)
        except WeightsError as exc:
            return [("preset", str(exc))]
        return []


BLIP_ITM = BlipFamily("itm")
BLIP_CAPTION = BlipFamily("caption")
BLIP = {"itm": BLIP_ITM, "caption": BLIP_CAPTION}


def blip_tokenizer_dir(preset: str) -> Path:
    """The preset's tokenizer folder: bundled (``tiny``, ``shapes``), or ``bert-base-uncased/`` in
    the weights folder (``WeightsError`` naming it when absent)."""
    tokenizer = BLIP_ITM.preset(preset).tokenizer
    return tokenizer.locate() if isinstance(tokenizer, Published) else tokenizer


def _resolved(checkpoint: str | Path | None) -> Path | None:
    """The local path of a checkpoint; None when not given or not found (``problems`` says so)."""
    if checkpoint is None:
        return None
    try:
        return local_path(checkpoint)
    except WeightsError:
        return None
