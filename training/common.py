"""The skeleton the ``runtime train`` commands share: option groups, the start of a run (output
folder, device, ``--resume`` checks) and small training-loop helpers."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np


# --- options ----------------------------------------------------------------------------------

def add_output_options(p: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--resume``."""
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (same settings; "
                   "--steps may grow)")


def add_blip_model_options(p: argparse.ArgumentParser, *, architecture: str, init_help: str) -> None:
    """The ``model`` group of a command that trains a BLIP model: ``--preset``, ``--init``, ``--weights``."""
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=["tiny", "shapes", "base", "large"],
                   help=f"{architecture} architecture")
    m.add_argument("--init", metavar="FILE", help=init_help)
    add_weights_option(m)


def initial_blip_fingerprint(kind: str, preset: str, init: str | None) -> str:
    """Identifies the weights :func:`initial_blip` starts from."""
    from models.blip.checkpoint import random_init_fingerprint, weights_fingerprint

    if init is None and preset in ("tiny", "shapes"):
        return random_init_fingerprint(kind, preset)
    return weights_fingerprint(kind, preset, init)


def initial_blip(kind: str, preset: str, init: str | None, device):
    """The BLIP model a training starts from: ``init`` when given, else the seeded random
    initialisation for ``tiny`` / ``shapes`` (training ``shapes`` from scratch), else the
    preset's standard checkpoint (``base`` / ``large``)."""
    from models.blip.checkpoint import build_model, load_blip

    if init is None and preset in ("tiny", "shapes"):
        return build_model(kind, preset, device, empty=False)
    return load_blip(kind, preset, init, device)[0]


def add_weights_option(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--weights", metavar="DIR", help="folder of real checkpoints (sets $PNPVQA_WEIGHTS)")


def add_source_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``data`` group of a command that trains on any dataset source; returns it."""
    d = p.add_argument_group("data")
    d.add_argument("--source", default="shapes", help="dataset source (runtime sources)")
    d.add_argument("--seed", type=int, default=0, help="training seed (and the source's seed)")
    d.add_argument("--num-images", type=int, default=None,
                   help="images of the source (sources with num_images; shapes default 16)")
    d.add_argument("--source-param", action="append", default=[], metavar="KEY=VALUE",
                   help="other source parameter (VALUE parsed as YAML); repeatable")
    d.add_argument("--limit", type=int, help="use only the first N samples")
    d.add_argument("--swap-fraction", type=float, default=0.5,
                   help="share of negatives made by a colour/shape word swap where the scene allows it")
    return d


def add_optimisation_options(p: argparse.ArgumentParser, *, steps: int, batch_size: int, batch_help: str,
                             lr: float, lr_help: str, weight_decay: float, weight_decay_help: str | None,
                             warmup: bool) -> argparse._ArgumentGroup:
    """The ``optimisation`` group up to ``--grad-clip`` (``--warmup`` when ``warmup``); returns it
    for the command's own options, :func:`add_checkpoint_option` and :func:`add_device_options`."""
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, default=steps)
    t.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    t.add_argument("--lr", type=float, default=lr, help=lr_help)
    t.add_argument("--weight-decay", type=float, default=weight_decay, help=weight_decay_help)
    if warmup:
        t.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear learning-rate warmup")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    return t


def add_checkpoint_option(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                       help="write the checkpoint and weights every N steps (0 = only at the end)")


def add_device_options(group: argparse._ArgumentGroup) -> None:
    """``--device`` and ``--quiet``."""
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


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


def source_num_images(source: str, num_images: int | None, extra: dict[str, Any]) -> int | None:
    """``--num-images``, defaulting to 16 for the shapes source (unless a source parameter sets it)."""
    if num_images is None and source == "shapes" and "num_images" not in extra:
        return 16
    return num_images


# --- the start of a run -----------------------------------------------------------------------

class RunStart(NamedTuple):
    out: Path
    checkpoint_path: Path
    device: Any  # torch.device
    resume_state: dict[str, Any] | None


def start_run(s: Any, load_checkpoint: Callable[[Path], dict[str, Any]]) -> RunStart:
    """Check that the loss plot can be drawn, set ``$PNPVQA_WEIGHTS``, create the output folder,
    pick the device and read the checkpoint to resume (``s``: a command's settings)."""
    from training.outputs import check_plotting

    check_plotting()
    if getattr(s, "weights", None):
        os.environ["PNPVQA_WEIGHTS"] = str(s.weights)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    device = select_device(s.device)
    resume_state = None
    if s.resume:
        resume_state = load_checkpoint(ckpt_path)
    elif ckpt_path.exists():
        raise ValueError(f"{out} already holds a training checkpoint: pass --resume to continue it, "
                         "or choose another --out")
    return RunStart(out, ckpt_path, device, resume_state)


class HeldOutSeed:
    """Mixin of the training settings dataclasses (fields ``seed``, ``eval_seed``)."""

    @property
    def held_out_seed(self) -> int:
        """Source seed of the held-out evaluation: ``--eval-seed``, default seed + 1000."""
        return self.seed + 1000 if self.eval_seed is None else self.eval_seed


@dataclass
class TrainingResult:
    """What a ``train`` function returns: the output folder, the steps of the whole run, their
    losses, the final held-out metrics, and the seconds this invocation took."""

    out: Path
    steps: int
    losses: list[float]
    metrics: dict[str, Any]
    seconds: float


def settings_identity(settings, resumable: Sequence[str], later_options: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues: every field of the
    ``settings`` dataclass but the ``resumable`` ones; ``later_options`` (name -> default),
    options added after runs were made, only when not at their defaults, so those runs still
    resume; a cosine ``lr_decay`` also fixes ``steps`` (``cosine_steps``), where it ends."""
    from dataclasses import asdict

    identity = {k: v for k, v in asdict(settings).items() if k not in resumable}
    for name, default in (later_options or {}).items():
        if identity.get(name) == default:
            del identity[name]
    if getattr(settings, "lr_decay", "constant") == "cosine":
        identity["cosine_steps"] = settings.steps
    return identity


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


# --- the training loop ------------------------------------------------------------------------

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
    import math

    if decay != "cosine" or step < warmup:
        return set_warmup_lr(optimizer, lr, warmup, step)
    lr = lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def add_lr_decay_option(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lr-decay", choices=["constant", "cosine"], default="constant",
                       help="after the warmup: constant, or cosine decay to 0 at --steps")


def due(done: int, every: int, steps: int) -> bool:
    """Whether a periodic action (``--eval-every``, ``--checkpoint-every`` ``every``; 0 = never)
    runs after ``done`` steps; the last step has its own final one."""
    return bool(every) and done % every == 0 and done < steps


def finish_run(*, start: int, steps: int, started: float, base_seconds: float, run_eval, save,
               invocations: list[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The end of every training run: the training time (evaluation excluded), the final held-out
    evaluation, the invocation's end, the final save; returns the final step's evaluation."""
    import time
    from datetime import datetime, timezone

    from training.outputs import eval_at

    final_step = max(start, steps)
    train_seconds = base_seconds + time.perf_counter() - started
    run_eval(final_step)
    invocations[-1].update(to_step=final_step, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           seconds=round(time.perf_counter() - started, 3))
    save(final_step, final=True, seconds=train_seconds)
    return eval_at(evals, final_step)


def finite_loss(loss, step: int) -> float:
    """The loss of ``step`` as a float; raises :class:`FloatingPointError` when it is not finite."""
    import math

    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step + 1}; lower --lr")
    return value


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of ``values``; ``None`` when there are none."""
    return float(np.mean(values)) if len(values) else None


def run_command(argv: Sequence[str] | None, parser: argparse.ArgumentParser, settings_from_args: Callable,
                train: Callable, weights_file: str, held_out: Callable[[dict], str | None]) -> int:
    """The body of every ``runtime train MODEL`` entry point: parse, train, report; returns the
    exit status (2 for bad settings or files, 130 when interrupted). ``held_out`` words the final
    held-out metrics (``None``: nothing to say)."""
    import sys

    from models.weights import WeightsError
    from training.outputs import MissingDependency

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        result = train(settings_from_args(args), command=argv)
    except KeyboardInterrupt:
        print("interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, WeightsError, FloatingPointError, MissingDependency) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first, last = result.losses[:10], result.losses[-10:]
    said = held_out(result.metrics or {})
    print(f"trained {result.steps} steps in {result.seconds:.1f} s: loss {np.mean(first):.4f} (first "
          f"{len(first)}) -> {np.mean(last):.4f} (last {len(last)})"
          + (f"; {said}" if said else "") + f"; weights {result.out / weights_file}")
    return 0
