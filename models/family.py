"""Model families described as data: each family declares its presets once, as a table of
``preset -> Preset(config, weights source, doc)`` (as timm's ``default_cfgs``), and one generic
path finds, fingerprints, checks and loads any preset's weights.

Weights sources:

- :class:`RandomInit`: seeded random weights at the preset's config (``tiny``), no file;
- :class:`Shipped`: a file trained by the project and shipped in ``models/assets/shapes``;
- :class:`Published`: published files (or Hugging Face folders) found under their standard
  names in the ``--weights`` folder; with ``--random-weights`` they are replaced by the
  family's seeded random init at the same config.

What differs between families (a Hugging Face folder's own sizes, a zipped download, a folder's
required files, a second weights source) lives in the hooks a family subclass overrides, never
in conditions on preset names. No torch here: validation, cache keys and ``runtime stages`` use
the families without importing the model code; ``load`` imports it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from models.hf_hub import local_path
from models.weights import (WeightsError, check_safetensors_files, file_fingerprint, find_weights, random_weights,
                            shapes_weights, tree_fingerprint)


@dataclass(frozen=True)
class RandomInit:
    """Seeded random weights: the same in every process. ``init_version`` is bumped when the
    initialisation code changes (it is part of the fingerprint)."""

    seed: int = 0
    init_version: int = 1
    trained_on = None  # untrained


@dataclass(frozen=True)
class Shipped:
    """A ``shapes`` weights file in ``models/assets/shapes``, made by ``train_command``."""

    file: str
    train_command: str
    trained_on: str = "shapes"  # the source whose data the file was trained on (a ``Source.data`` value)

    def locate(self) -> Path:
        return shapes_weights(self.file, self.train_command)


@dataclass(frozen=True)
class Published:
    """Published files (or folders) as ``(name, where published)``: any of the names is found in
    the weights folder, the first preferred and named when none is there."""

    files: tuple[tuple[str, str], ...]
    trained_on = None  # real data: not known to differ from a run's

    def locate(self) -> Path:
        first_error = None
        for name, url in self.files:
            try:
                return find_weights(name, url)
            except WeightsError as exc:
                first_error = first_error or exc
        others = ", ".join(name for name, _ in self.files[1:])
        raise WeightsError(f"{first_error}" + (f" (also accepted: {others})" if others else "")) from None


WeightsSource = RandomInit | Shipped | Published


@dataclass(frozen=True)
class Preset:
    """One row of a family's table: the model's sizes, where its weights come from, a short doc."""

    config: Any
    weights: WeightsSource
    doc: str


@dataclass(frozen=True)
class Loaded:
    """What :meth:`ModelFamily.load` gives: the model in eval mode, what the loading did, and
    the tokenizer when the weights bring one (``None`` otherwise)."""

    model: Any
    report: Any
    tokenizer: Any = None


class ModelFamily:
    """The presets of one model and the generic find / fingerprint / problems / load path.

    ``title`` names the model in messages; ``random_tag`` is what the random-init fingerprint
    hashes besides the config, seed and init version (it tells families with equal configs
    apart). Subclasses implement :meth:`build_random` and :meth:`load_found` (they import torch)
    and override the other hooks where their files need it.
    """

    honours_random_weights = True  # --random-weights replaces the preset's files by its random init

    def __init__(self, title: str, presets: Mapping[str, Preset], random_tag: Mapping[str, str]):
        self.title = title
        self.presets = dict(presets)
        self.random_tag = dict(random_tag)

    # --- the table ---------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.presets)

    @property
    def built_in(self) -> tuple[str, ...]:
        """Presets whose architecture the project trains from its random init (not published)."""
        return tuple(name for name in self.presets if not isinstance(self.source(name), Published))

    def preset_type(self) -> Any:
        """The ``Literal`` of the preset names, for a stage param."""
        return Literal[self.names]

    def preset_doc(self, what: str) -> str:
        """``what`` followed by each preset's doc, for a stage param's description."""
        return f"{what}: " + "; ".join(f"{name} ({p.doc})" for name, p in self.presets.items())

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise ValueError(f"unknown {self.title} preset {name!r}; choose one of {', '.join(self.presets)}")
        return self.presets[name]

    def source(self, preset: str) -> WeightsSource:
        return self.preset(preset).weights

    def trained_on(self, preset: str, checkpoint: str | Path | None = None) -> str | None:
        """The data the weights a load would give were trained on, where the table knows it
        (``Shipped``: the synthetic shapes); None for an explicit checkpoint, published or random
        weights (``--random-weights`` included)."""
        if checkpoint is not None or (random_weights() and self.honours_random_weights):
            return None
        return self.source(preset).trained_on

    def config(self, preset: str, checkpoint: str | Path | None = None) -> Any:
        """The sizes of the model a load would give: the preset's (a family whose checkpoints
        carry their own sizes, e.g. Hugging Face folders, overrides this)."""
        return self.preset(preset).config

    def random_init(self, preset: str) -> RandomInit:
        """The seeded init of ``preset``: its own for a random preset, else the default one
        (``--random-weights``, and where training ``shapes`` from scratch starts)."""
        source = self.source(preset)
        return source if isinstance(source, RandomInit) else RandomInit()

    # --- files -------------------------------------------------------------------------------
    def find(self, preset: str, path: str | Path | None = None) -> Path | None:
        """What a load would read: ``path`` (checked by :meth:`check_path`), else the preset's
        file; ``None`` for random weights (a :class:`RandomInit` preset, or ``--random-weights``).
        ``WeightsError`` naming what is missing and where it is published, or a safetensors file
        that is cut short (its header checked against its size, no tensor read)."""
        source = self.source(preset)
        if path is not None:
            found = self.check_path(preset, path)
        elif isinstance(source, RandomInit) or (random_weights() and self.honours_random_weights):
            return None
        else:
            try:
                located = source.locate()
            except WeightsError as exc:
                raise WeightsError(f"{exc}{self.missing_hint(preset)}") from None
            found = self.check_found(preset, located)
        check_safetensors_files(self.weight_files(found))
        return found

    def fingerprint(self, preset: str, path: str | Path | None = None) -> str:
        """Identifies the weights a load would give: the random init's fingerprint, else the
        file's (or folder's) content fingerprint."""
        found = self.find(preset, path)
        return self.random_fingerprint(preset) if found is None else self.found_fingerprint(found)

    def random_fingerprint(self, preset: str) -> str:
        """Identifies the seeded random initialisation of ``preset``: a hash of the family tag,
        the preset's sizes, the seed and the init version."""
        init = self.random_init(preset)
        spec = {**self.random_tag, "config": self.preset(preset).config.to_dict(), "seed": init.seed,
                "init_version": init.init_version}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]

    def problems(self, preset: str, checkpoint: str | Path | None = None) -> list[tuple[str, str]]:
        """``(field, message)`` when the weights cannot be found: field ``checkpoint`` when one
        was given, else ``preset``."""
        try:
            self.find(preset, checkpoint)
        except WeightsError as exc:
            return [("checkpoint" if checkpoint else "preset", str(exc))]
        return []

    def load(self, preset: str, path: str | Path | None = None, device: Any = "cpu") -> Loaded:
        """The model of ``preset`` (weights from ``path`` or the preset's source) in eval mode."""
        found = self.find(preset, path)
        return self.build_random(preset, device) if found is None else self.load_found(preset, found, device)

    # --- hooks -------------------------------------------------------------------------------
    def check_path(self, preset: str, path: str | Path) -> Path:
        """An explicit checkpoint (``hf:ORG/NAME`` resolved in the local Hugging Face cache)."""
        found = local_path(path)
        if not found.exists():
            raise WeightsError(f"checkpoint {found} does not exist")
        return found

    def check_found(self, preset: str, found: Path) -> Path:
        """A preset's file as found; a family checks what a folder must hold here."""
        return found

    def weight_files(self, found: Path) -> list[Path]:
        """The files a load of ``found`` reads (a folder: its ``.safetensors`` files), whose
        safetensors headers :meth:`find` checks against their sizes."""
        return [found] if found.is_file() else sorted(found.glob("*.safetensors"))

    def missing_hint(self, preset: str) -> str:
        """Added to the message of a missing preset file (e.g. where a zipped download lies)."""
        return ""

    def found_fingerprint(self, found: Path) -> str:
        return tree_fingerprint(found) if found.is_dir() else file_fingerprint(found)

    def build_random(self, preset: str, device: Any) -> Loaded:
        raise NotImplementedError

    def load_found(self, preset: str, found: Path, device: Any) -> Loaded:
        raise NotImplementedError
