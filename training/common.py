"""What the training commands share besides the loop (:mod:`training.loop`) and the data
settings (:mod:`training.data`): the model and patch-probe options, the initial BLIP weights,
AdamW parameter groups, the learning-rate schedule and the cadence of periodic actions."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from models.blip.config import PRESETS as BLIP_PRESETS  # the BLIP trainers' --preset choices


# --- options ----------------------------------------------------------------------------------

def add_model_options(o, presets: Sequence[str], *, architecture: str, init_help: str,
                      weights_folder: bool = True) -> None:
    """The model options of a command that trains one model (``o``: a
    :class:`training.loop.Options`): ``--preset``, ``--init`` and, for presets whose standard
    files live in the weights folder, ``--weights``."""
    o.add(o.model, "--preset", choices=list(presets), help=f"{architecture} architecture")
    o.add(o.model, "--init", metavar="FILE", help=init_help)
    if weights_folder:
        o.add(o.model, "--weights", metavar="DIR", help="folder of real checkpoints (sets $PNPVQA_WEIGHTS)")


def initial_blip_fingerprint(kind: str, preset: str, init: str | None) -> str:
    """Identifies the weights :func:`initial_blip` starts from."""
    from models.blip.family import BLIP

    if init is None and preset in BLIP[kind].built_in:
        return BLIP[kind].random_fingerprint(preset)
    return BLIP[kind].fingerprint(preset, init)


def initial_blip(kind: str, preset: str, init: str | None, device):
    """The BLIP model a training starts from: ``init`` when given, else the seeded random
    initialisation for ``tiny`` / ``shapes`` (training ``shapes`` from scratch), else the
    preset's standard checkpoint (``base`` / ``large``)."""
    from models.blip.checkpoint import build_model, load_blip
    from models.blip.family import BLIP

    if init is None and preset in BLIP[kind].built_in:
        return build_model(kind, preset, device, empty=False)
    return load_blip(kind, preset, init, device)[0]


def add_patch_label_options(o, tokens: str) -> None:
    """``--patch-label-weight`` (the colour / shape probe on ``tokens``) and ``--patch-object-weight``."""
    o.add(o.optimisation, "--patch-label-weight", type=float,
          help=f"weight of the patch colour / shape probe loss on {tokens} (0 = off)")
    o.add(o.optimisation, "--patch-object-weight", type=float, metavar="W",
          help="weight of an object patch relative to a background patch in the probe loss")


def check_patch_label_options(s: Any) -> None:
    if s.patch_label_weight < 0:
        raise ValueError(f"--patch-label-weight must be >= 0, got {s.patch_label_weight}")
    if not s.patch_object_weight > 0:
        raise ValueError(f"--patch-object-weight must be > 0, got {s.patch_object_weight}")


def parse_source_params(items: Sequence[str]) -> dict[str, Any]:
    """``--source-param KEY=VALUE`` items as a dict (VALUE parsed as YAML)."""
    import yaml

    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--source-param {item!r}: expected KEY=VALUE")
        extra[key.strip()] = yaml.safe_load(value)
    return extra


# --- the optimisation -------------------------------------------------------------------------

def weight_decay_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weight matrices only (not biases, norms)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_warmup_lr(optimizer, lr: float, warmup: int, step: int) -> float:
    """Set (and return) the learning rate of ``step``: linear warmup over ``warmup`` steps, then ``lr``."""
    lr = lr * min(1.0, (step + 1) / warmup) if warmup else lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def set_scheduled_lr(optimizer, lr: float, warmup: int, step: int, steps: int, decay: str) -> float:
    """Set (and return) the learning rate of ``step``: the linear warmup, then constant
    (``decay="constant"``) or a cosine decay to 0 at ``steps`` (``"cosine"``)."""
    if decay != "cosine" or step < warmup:
        return set_warmup_lr(optimizer, lr, warmup, step)
    lr = lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def due(done: int, every: int, steps: int) -> bool:
    """Whether a periodic action (``--eval-every``, ``--checkpoint-every`` ``every``; 0 = never)
    runs after ``done`` steps; the last step has its own final one."""
    return bool(every) and done % every == 0 and done < steps


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of ``values``; ``None`` when there are none."""
    return float(np.mean(values)) if len(values) else None


