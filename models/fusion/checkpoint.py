"""Fusion weights as one safetensors file with the :class:`FusionConfig` in its metadata.

Metadata keys: ``format`` = ``pnpvqa-fusion``, ``fusion_config`` = the config as JSON. The file
is self-describing: :func:`load_fusion` rebuilds the module from it, after checking the config
against what the caller expects (a graph knows its BLIP width and grid and its SAM channels).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from models.fusion.config import FusionConfig
from models.weights import (LoadReport, WeightsError, apply_state_dict, check_safetensors, file_fingerprint,
                            load_checkpoint, safetensors_header)

if TYPE_CHECKING:  # torch is imported where modules are built or weights read
    import torch
    from torch import nn

FORMAT = "pnpvqa-fusion"


def build_fusion(config: FusionConfig) -> nn.Module:
    """A freshly initialised fusion module of ``config`` (fused tokens == BLIP tokens)."""
    from models.fusion.concat_conv import ConcatConvFusion
    from models.fusion.cross_attention import CrossAttentionFusion
    from models.fusion.difnet import DifnetFusion

    classes = {"concat_conv": ConcatConvFusion, "cross_attention": CrossAttentionFusion, "difnet": DifnetFusion}
    return classes[config.mode](config)


def save_fusion(module: nn.Module, config: FusionConfig, path: str | Path) -> Path:
    """Write ``module``'s weights and ``config`` to ``path`` (safetensors), atomically."""
    from models.weights import save_safetensors

    path = Path(path)
    own = getattr(module, "config", None)
    if own is not None and own != config:
        raise ValueError(f"the module was built with {own}, not with the config given to save_fusion ({config})")
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path, {"format": FORMAT, "fusion_config": config.to_json()})
    return path


def read_fusion_config(path: str | Path) -> FusionConfig:
    """The config stored in a fusion file (``WeightsError`` when it is not one, or is cut short)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"fusion weights {path} do not exist (train them with `runtime train fusion --out DIR`, "
                           "which writes DIR/fusion.safetensors)")
    check_safetensors(path)
    metadata = safetensors_header(path).get("__metadata__") or {}
    if metadata.get("format") != FORMAT or "fusion_config" not in metadata:
        raise WeightsError(f"{path} is not a fusion weights file (its safetensors metadata has no "
                           f"format={FORMAT!r} and fusion_config)")
    try:
        return FusionConfig.from_json(metadata["fusion_config"])
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"{path} holds an unusable fusion config: {exc}") from None


def fusion_file_problems(path: str | Path, config: FusionConfig) -> list[str]:
    """What keeps the weights in ``path`` from loading into a module of ``config``, read from the
    file's header (names and shapes; no tensor is read): missing, unexpected or misshapen keys."""
    import torch

    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in build_fusion(config).state_dict().items()}
    stored = {k: tuple(v["shape"]) for k, v in safetensors_header(path).items() if k != "__metadata__"}
    out = [f"missing {k}" for k in own if k not in stored]
    out += [f"unexpected {k}" for k in stored if k not in own]
    out += [f"{k} is {stored[k]}, the module needs {own[k]}" for k in own if k in stored and stored[k] != own[k]]
    return out


def load_fusion(path: str | Path, expected: FusionConfig | Mapping[str, Any] | None = None,
                device: torch.device | str = "cpu") -> tuple[nn.Module, FusionConfig]:
    """The fusion module stored in ``path`` (eval mode) and its config.

    ``expected``: a full :class:`FusionConfig`, or a mapping of the fields that must match
    (e.g. ``{"blip_width": 1024, "grid": 24, "sam_dim": 256}``); a file whose config differs
    is refused with a ``WeightsError`` listing the differences.
    """
    path = Path(path)
    config = read_fusion_config(path)
    if expected is not None:
        try:
            wrong = config.mismatches(expected)
        except ValueError as exc:
            raise ValueError(f"expected fusion config: {exc}") from None
        if wrong:
            raise WeightsError(f"fusion weights {path} were trained for another configuration: "
                               + "; ".join(wrong) + ". Retrain for these models or pick the matching file.")
    state = load_checkpoint(path)
    module = build_fusion(config)
    report = apply_state_dict(module, state, f"fusion weights {path}")
    if report.unexpected:
        raise WeightsError(f"fusion weights {path} do not fit a {config.mode} module: {report.summary()}")
    return module.to(device).eval(), config


def fusion_fingerprint(path: str | Path) -> str:
    """Identifies a fusion file (size, first and last MiB: the header with the config included)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"fusion weights {path} do not exist")
    return file_fingerprint(path)



# an encoder layer of the published DIFNet layout (the decoder's layers have no mhatt / lnorm)
_DIFNET_ENCODER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.\d+\.(?:mhatt|lnorm1?)\.")


def load_reference_encoder(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Load the encoder of a published mrwu-mac/DIFNet state dict into a ``difnet`` module of
    ``formulation: reference``: keys ``[PREFIX]layers.N.{mhatt.attention.fc_q,fc_k,fc_v,fc_o,
    mhatt.layer_norm, mhatt.layer_norm1, lnorm, lnorm1, pwff.fc1, pwff.fc2, pwff.layer_norm,
    pwff.layer_norm1}`` (PREFIX is found: ``encoder.`` in a captioning checkpoint). Every encoder
    key must fit (names and shapes: ``WeightsError`` otherwise); the other keys (decoder, ...)
    are reported as ignored. The module's projections around the encoder are not in such a file
    and keep their initialisation (``out_proj`` zero: the fused tokens equal BLIP's)."""
    config = getattr(module, "config", None)
    if config is None or config.mode != "difnet" or config.formulation != "reference":
        raise ValueError("a published DIFNet encoder loads into a difnet module with formulation='reference'")
    prefixes = {m["prefix"] for k in state if (m := _DIFNET_ENCODER_KEY.match(k))}
    if len(prefixes) != 1:
        found = ", ".join(sorted(p or "(none)" for p in prefixes)) or "none"
        raise WeightsError(f"{source}: expected the layers of one DIFNet encoder (layers.N.mhatt..., layers.N.lnorm "
                           f"...), found prefixes: {found}")
    outer = prefixes.pop()
    prefix = outer + "layers."
    encoder_state = {k[len(outer):]: v for k, v in state.items() if k.startswith(prefix)}
    report = apply_state_dict(module.encoder, encoder_state, f"the DIFNet encoder in {source}")
    if report.unexpected:
        raise WeightsError(f"the DIFNet encoder in {source} does not fit ({module.config.N} layers, width "
                           f"{module.config.width}): {report.summary()}")
    report.ignored = sorted(k for k in state if not k.startswith(prefix))
    return report


def import_difnet_encoder(path: str | Path, config: FusionConfig) -> tuple[nn.Module, LoadReport]:
    """A ``reference`` DIFNet fusion module of ``config`` with the encoder of the published
    checkpoint at ``path`` (read with ``weights_only``; a ``{"state_dict": ...}`` wrapper is
    unwrapped)."""
    module = build_fusion(config)
    report = load_reference_encoder(module, load_checkpoint(path), str(path))
    return module, report
