"""Build QA-ViT models of a preset and load their weights.

Vision weights (``checkpoint``), detected by their content:

- the published QA-ViT layout (``InstructCLIPVisionModel`` state dict: plain CLIP vision names plus
  ``self_attn.instruction_*`` and ``instruct_dim_reduce.*`` in the instruction layers), alone or
  inside a VisualT5 checkpoint (under ``vision.vision_tower.``, or
  ``base_model.model.vision.vision_tower.`` as the published PEFT-wrapped ``qavit-*.pth`` files
  hold it, wrapped under ``"model"``): the prefix is stripped and the other keys (the language
  model) are ignored and reported. The integration point is read from the layers that carry
  instruction modules.
- plain CLIP vision weights: a Hugging Face folder (``CLIPModel`` or ``CLIPVisionModel``, e.g.
  ``clip-vit-large-patch14-336``; ``*.safetensors`` or ``pytorch_model.bin``, sharded or not) or a
  state-dict file with ``vision_model.*`` keys. The instruction modules are then initialised for
  identity (gates 0, ``instruction_out_proj`` copied from ``out_proj``): with the ``gated``
  formulation the model is exactly the plain CLIP ViT, and the heatmap does not depend on the
  question until the instruction modules are trained.

The question encoder is the T5 encoder of a Hugging Face folder (``flan-t5-base`` for
``l14_336``; the folder's ``d_model`` is the instruction width). The published VisualT5 models
fine-tune their language model with LoRA (q, v and the shared embedding; r 16, alpha 32), so a plain
``flan-t5-base`` folder is the encoder before that fine-tuning: for an exact reproduction, merge
the LoRA weights and save the T5 model to a folder, and pass it as ``question_encoder``.

``shapes``: the preset trained by the project on the synthetic ``shapes`` data (``runtime train
qavit``), bundled as ``models/assets/shapes/qavit.safetensors`` (or any file that command wrote,
given as ``checkpoint``). Such a file holds the vision tower in the published layout, the trained
question encoder under ``question_encoder.*`` (read in place of the built-in one: the shapes T5
encoder, or tiny's for a ``tiny`` training), the answer head (``answer_head.*``, used by the
training's evaluation only, ignored here) and, in its metadata, the formulation it was trained
with, which ``formulation="auto"`` then uses.

``tiny``: random initialisation from a fixed seed (identical in every process, the caller's RNG
untouched) with the instruction gates set to ``TINY_GATE`` and the projector weights scaled by
``TINY_PROJECTOR_SCALE`` so that the question visibly changes the output, as in a trained model;
no file needed. Real presets are built on the meta device and
materialised, so no time goes into a random initialisation that the checkpoint overwrites.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from models.family import Loaded, ModelFamily, Published, RandomInit, Shipped
from models.fid_t5_family import TINY_TOKENIZER_DIR, TOKENIZER_FILES, WEIGHT_FILES, t5_folder_lacks
from models.hf_hub import local_path
from models.qavit.config import PRESETS, QAViTConfig, integration_point_of, with_integration_point
from models.weights import (LoadReport, WeightsError, apply_state_dict, check_safetensors_files, file_fingerprint,
                            load_checkpoint, safetensors_header, tree_fingerprint)

if TYPE_CHECKING:  # torch and the model code are imported where weights are read or models built
    import torch

    from models.qavit.model import InstructCLIPVisionModel

log = logging.getLogger(__name__)

TINY_SEED = RandomInit().seed
TINY_GATE = 1.0            # tanh(1) = 0.76 of the instruction path in every instruction layer
TINY_PROJECTOR_SCALE = 3.0  # tiny projector weights x3: instruction keys that win a visible share of attention
QUESTION_ENCODER_PREFIX = "question_encoder."  # the trained question encoder in a runtime train qavit file
TIED_EMBEDDING = "encoder.embed_tokens.weight"  # T5's copy of shared.weight (not stored: tied)

ANCHOR = "embeddings.patch_embedding.weight"
POSITION_IDS = "vision_model.embeddings.position_ids"
_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_T5_FINGERPRINT = ("config.json", *WEIGHT_FILES, *TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json")

Kind = Literal["tiny", "qavit", "clip"]
FormulationChoice = Literal["auto", "reference", "gated"]


@dataclass
class QAViTReport:
    """What a load did: weights kind, stripped prefix, integration point, formulation, keys."""

    kind: Kind
    integration_point: str
    formulation: str
    question_encoder: str                    # folder, or "tiny"
    prefix: str = ""                         # stripped in front of vision_model.
    vision: LoadReport = field(default_factory=LoadReport)
    identity_initialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.kind} weights, integration '{self.integration_point}', formulation '{self.formulation}'"]
        if self.prefix:
            parts.append(f"prefix '{self.prefix}' stripped")
        if self.kind != "tiny":
            parts.append(self.vision.summary())
        if self.identity_initialised:
            parts.append(f"{len(self.identity_initialised)} instruction keys identity-initialised")
        parts.append(f"question encoder {self.question_encoder}")
        return "; ".join(parts)


# --- the family ----------------------------------------------------------------------------------

class QAViTFamily(ModelFamily):
    """QA-ViT's two weights sources: the vision tower (``checkpoint``: QA-ViT or plain CLIP
    weights) and the question encoder (``question_encoder``: a T5 folder, or built in). The
    published preset needs its files even under ``--random-weights``."""

    honours_random_weights = False

    def check_path(self, preset: str, path: str | Path) -> Path:
        found = local_path(path)
        if not found.exists():
            raise WeightsError(f"QA-ViT checkpoint {found} does not exist")
        return found

    def missing_hint(self, preset: str) -> str:
        clip = self.preset(preset).clip
        if clip is None:
            return ""
        name, url = clip.files[0]
        return (f". Or pass plain CLIP weights as the checkpoint (the Hugging Face folder '{name}', {url}): the "
                "instruction modules then start at identity and the heatmap does not depend on the question")

    def config(self, preset: str, checkpoint: str | Path | None = None, integration_point: str | None = None
               ) -> QAViTConfig:
        """The preset's sizes; ``integration_point`` (default ``late``) picks the instruction layers."""
        return with_integration_point(super().config(preset), integration_point)

    def find_question_encoder(self, preset: str, path: str | Path | None = None) -> Path | None:
        """The Hugging Face T5 folder of the question encoder: ``path``, else the preset's standard
        folder in the weights folder (``flan-t5-base``), else ``None`` for a built-in encoder
        (``tiny``, ``shapes``: ``shapes`` reads its weights from the vision checkpoint)."""
        source = self.preset(preset).question_encoder
        if path is None and not isinstance(source, Published):
            return None
        name, url = source.files[0] if isinstance(source, Published) else (
            "a T5 folder", "save_pretrained() of a T5 model and its tokenizer")
        folder = source.locate() if path is None else local_path(path)
        if not folder.is_dir():
            raise WeightsError(f"question encoder folder {folder} does not exist (a Hugging Face T5 folder such as "
                               f"'{name}'). Published at: {url}")
        missing = t5_folder_lacks(folder)
        if missing:
            raise WeightsError(f"question encoder folder {folder} lacks {', '.join(missing)}. Published at: {url}")
        check_safetensors_files(sorted(folder.glob("*.safetensors")))
        return folder

    def problems(self, preset: str, checkpoint: str | Path | None = None, question_encoder: str | Path | None = None,
                 **load_options) -> list[tuple[str, str]]:
        """Missing vision weights (field ``checkpoint`` / ``preset``) and question encoder
        (``question_encoder`` / ``preset``); the other load options change nothing found."""
        out = super().problems(preset, checkpoint)
        try:
            self.find_question_encoder(preset, question_encoder)
        except WeightsError as exc:
            out.append(("question_encoder" if question_encoder else "preset", str(exc)))
        return out

    def fingerprint(self, preset: str, path: str | Path | None = None, question_encoder: str | Path | None = None,
                    integration_point: str | None = None, **load_options) -> str:
        """Identifies the weights a load would give: the files' fingerprints, or for the built-in
        parts a hash of their sizes, seed, gate and init version (vision) or tokenizer (question encoder)."""
        parts: dict[str, object] = {"preset": preset, "integration_point": integration_point}
        found = self.find(preset, path)
        if found is None:
            init = self.random_init(preset)
            parts["vision"] = {"config": self.config(preset).to_dict(), "seed": init.seed, "gate": TINY_GATE,
                               "projector_scale": TINY_PROJECTOR_SCALE, "init_version": init.init_version}
        else:
            parts["vision"] = tree_fingerprint(found, ("*.safetensors", "*.bin", "*.index.json", "config.json")) \
                if found.is_dir() else file_fingerprint(found)
        folder = self.find_question_encoder(preset, question_encoder)
        if folder is None:  # built in: its weights are the seeded init or the vision file's question_encoder.*
            tokenizer_json = (TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()
            parts["question_encoder"] = {"config": self.preset(preset).question_encoder,
                                         "seed": self.random_init(preset).seed,
                                         "tokenizer": hashlib.sha256(tokenizer_json).hexdigest()}
        else:
            parts["question_encoder"] = tree_fingerprint(folder, _T5_FINGERPRINT)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def load(self, preset: str, path: str | Path | None = None, device="cpu", question_encoder: str | Path | None = None,
             integration_point: str | None = None, formulation: FormulationChoice = "auto") -> Loaded:
        model, tokenizer, report = load_qavit(preset, path, question_encoder, integration_point=integration_point,
                                              formulation=formulation, device=device)
        return Loaded(model, report, tokenizer)


QAVIT = QAViTFamily("QA-ViT", PRESETS, random_tag={})


def read_vision_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Kind, str, list[str]]:
    """Read vision weights (file or Hugging Face folder) into the published layout.

    Returns ``(state with vision_model.* keys, "qavit" | "clip", stripped prefix, ignored keys)``.
    """

    path = Path(path)
    state = _read_folder(path) if path.is_dir() else load_checkpoint(path)
    return to_vision_layout(state, str(path))


def to_vision_layout(state: dict[str, torch.Tensor], source: str = "checkpoint"
                     ) -> tuple[dict[str, torch.Tensor], Kind, str, list[str]]:
    """Find the CLIP vision tower in ``state`` (the one key ending in
    ``embeddings.patch_embedding.weight`` anchors it), rename its keys to ``vision_model.*`` and
    drop everything else (language model, text tower, projections). ``(state, kind, prefix,
    ignored)``; ``prefix`` is what stood in front of ``vision_model.`` (``vision.vision_tower.``
    in VisualT5 checkpoints)."""

    anchors = [k for k in state if k == ANCHOR or k.endswith("." + ANCHOR)]
    if len(anchors) != 1:
        what = "no" if not anchors else f"{len(anchors)}"
        raise WeightsError(f"{source} holds {what} CLIP vision tower(s) (keys ending in '{ANCHOR}'): expected "
                           "QA-ViT or CLIP vision weights")
    root = anchors[0][:-len(ANCHOR)]
    out, ignored = {}, []
    for key, value in state.items():
        rest = key[len(root):]
        if key.startswith(root) and rest.startswith(_VISION_PARTS):
            out["vision_model." + rest] = value
        else:
            ignored.append(key)
    prefix = root[:-len("vision_model.")] if root.endswith("vision_model.") else root
    kind: Kind = "qavit" if any(".instruction_" in k or ".instruct_dim_reduce." in k for k in out) else "clip"
    return out, kind, prefix, ignored


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:

    for name in _WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_checkpoint(folder / shard))
            return state
        if (folder / name).is_file():
            return load_checkpoint(folder / name)
    raise WeightsError(f"{folder} holds no model.safetensors or pytorch_model.bin (sharded or not): expected a "
                       "Hugging Face CLIP folder")


def _instruction_layers_in(state: dict[str, torch.Tensor]) -> list[int]:

    layers = set()
    for key in state:
        if ".instruction_" in key or ".instruct_dim_reduce." in key:
            layers.add(int(key.split("encoder.layers.")[1].split(".")[0]))
    return sorted(layers)


# --- building ----------------------------------------------------------------------------------

def build_vision(config: QAViTConfig, device: torch.device | str = "cpu", *, empty: bool = False,
                 formulation: str = "gated") -> InstructCLIPVisionModel:
    """The vision tower of ``config``. ``empty=False``: seeded random CLIP init with identity
    instruction modules (the same weights in every process, the caller's RNG untouched).
    ``empty=True``: built on the meta device and materialised uninitialised (buffers recomputed);
    every parameter must then come from a checkpoint or :meth:`reset_instructions`."""
    import torch

    from models.qavit.model import InstructCLIPVisionModel


    if not empty:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            tower = InstructCLIPVisionModel(config, formulation)
        tower.reset_instructions(TINY_SEED)
        return tower.to(device)
    with torch.device("meta"):
        tower = InstructCLIPVisionModel(config, formulation)
    tower.to_empty(device=device)
    tower.reset_buffers()
    return tower


def built_in_encoder_config(preset: str, vocab_size: int):
    """The ``T5Config`` of the built-in question encoder of ``tiny`` / ``shapes``."""
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, **QAVIT.preset(preset).question_encoder)


def load_question_encoder(preset: str, path: str | Path | None = None, device: torch.device | str = "cpu"):
    """``(T5EncoderModel in eval mode, tokenizer, source)`` of the question encoder. The built-in
    encoders (``tiny``, ``shapes``; source ``"tiny"`` / ``"shapes"``) start from a seeded random
    initialisation (the caller's RNG untouched); :func:`load_qavit` loads ``shapes``' trained
    weights from its checkpoint."""
    import torch


    from transformers import AutoTokenizer, T5EncoderModel

    folder = QAVIT.find_question_encoder(preset, path)
    if folder is None:
        tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            encoder = T5EncoderModel(built_in_encoder_config(preset, len(tokenizer)))
        return encoder.to(device).eval(), tokenizer, preset
    try:
        encoder = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot load the question encoder folder {folder}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return encoder.to(device).eval(), tokenizer, str(folder)


def load_qavit(preset: str, checkpoint: str | Path | None = None, question_encoder: str | Path | None = None, *,
               integration_point: str | None = None, formulation: FormulationChoice = "auto",
               device: torch.device | str = "cpu"):
    """``(QAViT in eval mode, tokenizer, QAViTReport)``.

    ``integration_point``: ``None`` = the checkpoint's (QA-ViT weights) or ``late``; a QA-ViT
    checkpoint whose instruction layers differ is an error. ``formulation``: ``auto`` = the one a
    ``runtime train qavit`` file records in its metadata (``shapes``: ``gated``), else
    ``reference`` for QA-ViT weights (reproduces the published model), ``gated`` otherwise (tiny,
    plain CLIP: identity while the gates are 0).

    A checkpoint with ``question_encoder.*`` keys (written by ``runtime train qavit``) carries the
    question encoder it was trained with: with a built-in encoder (``tiny``, ``shapes``) those
    weights are loaded into it; ``shapes`` requires them. With a T5 folder they are ignored.
    """
    import torch

    from models.qavit.model import QAViT


    path = QAVIT.find(preset, checkpoint)
    encoder, tokenizer, encoder_source = load_question_encoder(preset, question_encoder, device)
    text_dim = encoder.config.d_model
    base = QAVIT.config(preset)
    if path is None:
        config = _with(base, integration_point or "late", text_dim)
        resolved = "gated" if formulation == "auto" else formulation
        tower = build_vision(config, device, formulation=resolved)
        tower.set_gates(TINY_GATE)
        with torch.no_grad():
            for i in tower.instruction_layer_ids:
                for module in tower.layers[i].instruct_dim_reduce:
                    if isinstance(module, torch.nn.Linear):
                        module.weight.mul_(TINY_PROJECTOR_SCALE)
        report = QAViTReport("tiny", config.integration_point, resolved, encoder_source)
        return QAViT(tower, encoder).eval(), tokenizer, report

    raw = _read_folder(path) if path.is_dir() else load_checkpoint(path)
    state, kind, prefix, ignored = to_vision_layout(raw, str(path))
    recorded = safetensors_metadata(path).get("formulation")
    if question_encoder is None and not isinstance(QAVIT.preset(preset).question_encoder, Published):
        # built in: weights from the file if any
        own = {k[len(QUESTION_ENCODER_PREFIX):]: v for k, v in raw.items() if k.startswith(QUESTION_ENCODER_PREFIX)}
        if own:
            apply_state_dict(encoder, own, f"checkpoint {path} (question_encoder.*)", optional=[TIED_EMBEDDING])
            ignored = [k for k in ignored if not k.startswith(QUESTION_ENCODER_PREFIX)]
            encoder_source = f"{path} (question_encoder.*)"
        elif isinstance(shipped := QAVIT.source(preset), Shipped):
            raise WeightsError(f"{path} holds no question encoder (question_encoder.* keys), which the {preset} "
                               f"preset reads from its checkpoint: pass a file written by `runtime train qavit "
                               f"--preset {preset}` (or {shipped.train_command}), or a T5 folder of width {text_dim} "
                               "as question_encoder")
    del raw
    point = integration_point or "late"
    if kind == "qavit":
        found = _instruction_layers_in(state)
        named = integration_point_of(base.depth, found)
        if named is None:
            raise WeightsError(f"{path} has instruction modules in layers {found}, which no integration point of a "
                               f"{base.depth}-layer ViT gives (is it the checkpoint of another preset?)")
        if integration_point is not None and integration_point != named:
            raise WeightsError(f"{path} has instruction modules in layers {found} (integration_point '{named}'), "
                               f"but integration_point '{integration_point}' was asked: leave it unset or use "
                               f"'{named}'")
        point = named
        width_key = f"vision_model.encoder.layers.{found[0]}.instruct_dim_reduce.0.weight"
        if width_key in state and state[width_key].shape[0] != text_dim:
            raise WeightsError(f"{path} reads {state[width_key].shape[0]}-wide question states but the question "
                               f"encoder ({encoder_source}) is {text_dim} wide: pass the T5 folder of the language "
                               "model the checkpoint was trained with (qavit-base2: flan-t5-base 768, qavit-large: "
                               "flan-t5-large 1024, qavit-xl: flan-t5-xl 2048) as question_encoder")
    config = _with(base, point, text_dim)
    if formulation != "auto":
        resolved = formulation
    elif recorded in ("reference", "gated"):
        resolved = recorded
    else:
        resolved = "reference" if kind == "qavit" and not isinstance(QAVIT.source(preset), Shipped) else "gated"
    tower = build_vision(config, device, empty=True, formulation=resolved)
    optional = [POSITION_IDS] + (tower.instruction_keys() if kind == "clip" else [])
    vision_report = apply_state_dict(tower, state, f"checkpoint {path}", ignore=[POSITION_IDS], optional=optional)
    vision_report.ignored += ignored
    identity = []
    if kind == "clip":
        tower.reset_instructions(TINY_SEED)
        identity = tower.instruction_keys()
        log.warning("QA-ViT loaded plain CLIP weights from %s: the instruction modules start at identity, so the "
                    "attention does not depend on the question", path)
    report = QAViTReport(kind, point, resolved, encoder_source, prefix, vision_report, identity)
    log.info("QA-ViT %s: %s", preset, report.summary())
    return QAViT(tower, encoder).eval(), tokenizer, report


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file (``{}`` for other files and folders)."""
    if path.is_dir() or path.suffix != ".safetensors":
        return {}
    try:
        return dict(safetensors_header(path).get("__metadata__") or {})
    except WeightsError:  # unreadable: load_checkpoint has already said why, or will
        return {}


def _with(config: QAViTConfig, integration_point: str, text_dim: int) -> QAViTConfig:
    return QAViTConfig(**{**config.to_dict(), "integration_point": integration_point, "text_dim": text_dim})
