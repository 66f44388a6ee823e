"""Before a training run's first step (:func:`training.loop.train`): the loop's settings
checked, the output folder made, the device picked, the checkpoint to resume read and its run
identity compared with this run's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.loop import LoopSettings, Trainer


def start_run(cls: type[Trainer], s: Any) -> tuple[Path, Path, Any, dict[str, Any] | None]:
    """Check that the loss plot can be drawn, set ``$PNPVQA_WEIGHTS``, create the output folder,
    pick the device and read the checkpoint to resume; returns the folder, the checkpoint's path,
    the torch device and the checkpoint (``None`` for a new run)."""
    from models.weights import WEIGHTS_ENV
    from training.outputs import check_plotting, load_checkpoint

    check_plotting()
    if getattr(s, "weights", None):  # the model layer reads its weights folder from there (runtime/settings.py)
        os.environ[WEIGHTS_ENV] = str(s.weights)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    device = select_device(s.device)
    resume_state = None
    if s.resume:
        resume_state = load_checkpoint(ckpt_path, format=cls.checkpoint_format, version=cls.checkpoint_version,
                                       kind=cls.checkpoint_kind)
    elif ckpt_path.exists():
        raise ValueError(f"{out} already holds a training checkpoint: pass --resume to continue it, "
                         "or choose another --out")
    return out, ckpt_path, device, resume_state


def check_same_run(resume_state: dict[str, Any] | None, run_identity: str, ckpt_path: Path,
                   may_change: str) -> None:
    """Refuse to resume a checkpoint written with another run identity (JSON of the settings and
    weight fingerprints); ``may_change`` names the options that may differ, for the message."""
    if resume_state is None:
        return
    before, now = json.loads(resume_state["run"]), json.loads(run_identity)
    diff = [f"{k}: checkpoint {before.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"--resume: {ckpt_path} was written with other settings (" + "; ".join(diff)
                         + f"). Use the same options (only {may_change} may change).")


def select_device(name: str):
    """The torch device of ``--device`` (``auto``: CUDA when available)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def check_loop_settings(s: LoopSettings) -> None:
    """Refuse bad values of the loop's own settings."""
    if s.steps < 1 or s.batch_size < 1:
        name = "steps" if s.steps < 1 else "batch_size"
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("checkpoint_every", "eval_every", "warmup"):
        if getattr(s, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
    if not s.lr > 0 or s.weight_decay < 0 or s.grad_clip < 0:
        raise ValueError("--lr must be > 0, --weight-decay and --grad-clip >= 0")
    if s.lr_decay not in ("constant", "cosine"):
        raise ValueError(f"--lr-decay must be constant or cosine, got {s.lr_decay!r}")
