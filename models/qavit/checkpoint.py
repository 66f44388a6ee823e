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

from models.qavit.config import PRESETS, SHAPES_QUESTION_ENCODER, QAViTConfig, integration_point_of, qavit_config
from models.hf_hub import local_path
from models.weights import (LoadReport, WeightsError, apply_state_dict, file_fingerprint, find_weights,
                            safetensors_header,
                            load_checkpoint, shapes_weights, tree_fingerprint)

if TYPE_CHECKING:  # torch and the model code are imported where weights are read or models built
    import torch

    from models.qavit.model import InstructCLIPVisionModel

log = logging.getLogger(__name__)

TINY_SEED = 0
TINY_GATE = 1.0            # tanh(1) = 0.76 of the instruction path in every instruction layer
TINY_PROJECTOR_SCALE = 3.0  # tiny projector weights x3: instruction keys that win a visible share of attention
TINY_INIT_VERSION = 1      # bump when the tiny initialisation changes (part of the fingerprint)

_QAVIT_URL = "https://awscv-public-data.s3.us-west-2.amazonaws.com/qavit/checkpoint/vit%2Bt5/"
# standard file / folder names in the weights folder, and where they are published
CHECKPOINT_FILES = {"l14_336": ("qavit-base2.pth", _QAVIT_URL + "qavit-base2.pth")}  # ViT+T5-base QA-ViT
QUESTION_ENCODERS = {"l14_336": ("flan-t5-base", "https://huggingface.co/google/flan-t5-base")}
CLIP_FOLDERS = {"l14_336": ("clip-vit-large-patch14-336", "https://huggingface.co/openai/clip-vit-large-patch14-336")}
SHAPES_FILE = "qavit.safetensors"            # in models/assets/shapes (models.weights.SHAPES_WEIGHTS_DIR)
SHAPES_TRAIN_COMMAND = "bin/train-shapes qavit"
BUILT_IN_ENCODERS = ("tiny", "shapes")       # presets whose question encoder is built in (no T5 folder)
QUESTION_ENCODER_PREFIX = "question_encoder."  # the trained question encoder in a runtime train qavit file
TIED_EMBEDDING = "encoder.embed_tokens.weight"  # T5's copy of shared.weight (not stored: tied)

ANCHOR = "embeddings.patch_embedding.weight"
POSITION_IDS = "vision_model.embeddings.position_ids"
_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_T5_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
_T5_TOKENIZER = ("tokenizer.json", "spiece.model")
_T5_FINGERPRINT = ("config.json", *_T5_WEIGHTS, *_T5_TOKENIZER, "tokenizer_config.json", "special_tokens_map.json")

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


# --- files -------------------------------------------------------------------------------------

def find_vision_weights(preset: str, path: str | Path | None = None) -> Path | None:
    """The vision weights a load would read: ``path`` (file or folder, must exist), else the
    preset's QA-ViT checkpoint (``shapes``: the bundled file; ``l14_336``: in the weights folder),
    else ``None`` for ``tiny``."""
    _check(preset)
    if path is not None:
        path = local_path(path)
        if not path.exists():
            raise WeightsError(f"QA-ViT checkpoint {path} does not exist")
        return path
    if preset == "tiny":
        return None
    if preset == "shapes":
        return shapes_weights(SHAPES_FILE, SHAPES_TRAIN_COMMAND)
    name, url = CHECKPOINT_FILES[preset]
    clip_name, clip_url = CLIP_FOLDERS[preset]
    try:
        return find_weights(name, url)
    except WeightsError as exc:
        raise WeightsError(f"{exc}. Or pass plain CLIP weights as the checkpoint (the Hugging Face folder "
                           f"'{clip_name}', {clip_url}): the instruction modules then start at identity and "
                           "the heatmap does not depend on the question") from None


def find_question_encoder(preset: str, path: str | Path | None = None) -> Path | None:
    """The Hugging Face T5 folder of the question encoder: ``path``, else the preset's standard
    folder in the weights folder (``flan-t5-base``), else ``None`` for ``tiny`` and ``shapes`` (built
    in; ``shapes`` reads its weights from the vision checkpoint)."""
    _check(preset)
    if path is None and preset in BUILT_IN_ENCODERS:
        return None
    name, url = QUESTION_ENCODERS.get(preset, ("a T5 folder", "save_pretrained() of a T5 model and its tokenizer"))
    folder = find_weights(name, url) if path is None else local_path(path)
    if not folder.is_dir():
        raise WeightsError(f"question encoder folder {folder} does not exist (a Hugging Face T5 folder such as "
                           f"'{name}'). Published at: {url}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(p.is_file() for pattern in _T5_WEIGHTS for p in folder.glob(pattern)):
        missing.append("model weights (model.safetensors or pytorch_model.bin)")
    if not any((folder / f).is_file() for f in _T5_TOKENIZER):
        missing.append("tokenizer (tokenizer.json or spiece.model)")
    if missing:
        raise WeightsError(f"question encoder folder {folder} lacks {', '.join(missing)}. Published at: {url}")
    return folder


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

    from models.fid_t5 import tiny_config

    if preset == "shapes":
        return T5Config(vocab_size=vocab_size, **SHAPES_QUESTION_ENCODER)
    return tiny_config(vocab_size)


def load_question_encoder(preset: str, path: str | Path | None = None, device: torch.device | str = "cpu"):
    """``(T5EncoderModel in eval mode, tokenizer, source)`` of the question encoder. The built-in
    encoders (``tiny``, ``shapes``; source ``"tiny"`` / ``"shapes"``) start from a seeded random
    initialisation (the caller's RNG untouched); :func:`load_qavit` loads ``shapes``' trained
    weights from its checkpoint."""
    import torch


    from transformers import AutoTokenizer, T5EncoderModel

    folder = find_question_encoder(preset, path)
    if folder is None:
        from models.fid_t5 import TINY_TOKENIZER_DIR

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


    _check(preset)
    path = find_vision_weights(preset, checkpoint)
    encoder, tokenizer, encoder_source = load_question_encoder(preset, question_encoder, device)
    text_dim = encoder.config.d_model
    base = qavit_config(preset)
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
    if question_encoder is None and preset in BUILT_IN_ENCODERS:  # built in: weights from the file if any
        own = {k[len(QUESTION_ENCODER_PREFIX):]: v for k, v in raw.items() if k.startswith(QUESTION_ENCODER_PREFIX)}
        if own:
            apply_state_dict(encoder, own, f"checkpoint {path} (question_encoder.*)", optional=[TIED_EMBEDDING])
            ignored = [k for k in ignored if not k.startswith(QUESTION_ENCODER_PREFIX)]
            encoder_source = f"{path} (question_encoder.*)"
        elif preset == "shapes":
            raise WeightsError(f"{path} holds no question encoder (question_encoder.* keys), which the shapes "
                               "preset reads from its checkpoint: pass a file written by `runtime train qavit "
                               f"--preset shapes` (or {SHAPES_TRAIN_COMMAND}), or a T5 folder of width {text_dim} as "
                               "question_encoder")
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
        resolved = "reference" if kind == "qavit" and preset != "shapes" else "gated"
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


def weights_fingerprint(preset: str, checkpoint: str | Path | None = None, question_encoder: str | Path | None = None,
                        integration_point: str | None = None) -> str:
    """Identifies the weights a load would give: the files' fingerprints, or for the built-in
    ``tiny`` parts a hash of their sizes, seed, gate, init version and tokenizer."""
    _check(preset)
    parts: dict[str, object] = {"preset": preset, "integration_point": integration_point}
    path = find_vision_weights(preset, checkpoint)
    if path is None:
        parts["vision"] = {"config": qavit_config(preset).to_dict(), "seed": TINY_SEED, "gate": TINY_GATE,
                           "projector_scale": TINY_PROJECTOR_SCALE, "init_version": TINY_INIT_VERSION}
    else:
        parts["vision"] = tree_fingerprint(path, ("*.safetensors", "*.bin", "*.index.json", "config.json")) \
            if path.is_dir() else file_fingerprint(path)
    folder = find_question_encoder(preset, question_encoder)
    if folder is None:  # built in: its weights are the seeded init or the vision file's question_encoder.*
        from models.fid_t5_files import TINY_CONFIG, TINY_TOKENIZER_DIR

        tokenizer_json = (TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()
        parts["question_encoder"] = {"config": SHAPES_QUESTION_ENCODER if preset == "shapes" else TINY_CONFIG,
                                     "seed": TINY_SEED, "tokenizer": hashlib.sha256(tokenizer_json).hexdigest()}
    else:
        parts["question_encoder"] = tree_fingerprint(folder, _T5_FINGERPRINT)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


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


def _check(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown QA-ViT preset {preset!r}; choose one of {', '.join(PRESETS)}")
