"""Files a training run writes: the resumable checkpoint, the loss log and its plot.

``checkpoint.pt`` holds tensors and plain containers only (read back with
``torch.load(weights_only=True)``) and is replaced atomically (written beside, then renamed),
so a run killed while saving keeps its previous checkpoint.

Checkpoint layout (``torch.load(weights_only=True)``): ``format``, ``version``, ``step``, one
state dict per trained module under its name (:meth:`training.loop.Trainer.modules`: ``model``,
``probe``), the trainer's :meth:`training.loop.Trainer.state`, ``optimizer``, ``rng``, ``run``
(the run identity as JSON), ``log`` (float64 ``[steps, columns]``: the trainer's columns and
``lr``), ``evals``, ``invocations`` (JSON) and ``train_seconds``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, *, format: str, version: int, **state: Any) -> None:
    """``state`` (tensors and plain containers), tagged with its ``format`` and ``version``, atomically."""
    atomic_torch_save({"format": format, "version": version, **state}, path)


def load_checkpoint(path: Path, *, format: str, version: int, kind: str) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (``weights_only=True``) with this
    ``format`` and ``version``; ``kind`` names it in errors ("a fusion", "an ITM")."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (run without --resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle
        raise ValueError(f"{path} is not a readable training checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != format:
        raise ValueError(f"{path} is not {kind} training checkpoint")
    if state.get("version") != version:
        raise ValueError(f"{path} is a version {state.get('version')} checkpoint; this code reads "
                         f"version {version}")
    return state


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def eval_at(evals: Sequence[dict[str, Any]], step: int) -> dict[str, Any] | None:
    """The held-out evaluation of ``step`` in a run's evaluation history (None when there is none)."""
    return next((e for e in reversed(evals) if e["step"] == step), None)


def write_run_records(out: Path, meta: Mapping[str, Any], invocations: Sequence[dict[str, Any]],
                      evals: Sequence[dict[str, Any]], *, step: int, finished: bool, seconds: float, eval_seed: int,
                      summary: Mapping[str, Any], config_extra: Mapping[str, Any] | None = None,
                      metrics_extra: Mapping[str, Any] | None = None) -> None:
    """``config.json`` (the run's ``meta``, its command and every invocation, steps, time,
    ``summary``) and ``metrics.json`` (the held-out evaluation of ``step``, the first one and the
    history without caption examples, ``summary``) of a training run at ``step``, atomically."""
    write_json(out / "config.json", {**meta, "command": invocations[-1]["command"], "invocations": list(invocations),
                                     "steps_done": step, "finished": finished, "train_seconds": seconds,
                                     **summary, **(config_extra or {})})
    write_json(out / "metrics.json", {
        "steps_done": step, "finished": finished, "eval_seed": eval_seed, "eval": eval_at(evals, step),
        "initial_eval": eval_at(evals, 0), "history": [{k: v for k, v in e.items() if k != "examples"} for e in evals],
        **summary, **(metrics_extra or {})})


class MissingDependency(RuntimeError):
    """A package the run needs is not installed."""


def check_plotting() -> None:
    """Fail before training when the loss plot cannot be drawn."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependency("the loss plot (loss.png) needs matplotlib: pip install matplotlib")


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """Moving-average window of a loss plot of ``n`` steps."""
    return max(1, min(25, n // 10 or 1))


def loss_figure():
    """A ``(figure, axes)`` for a loss plot (Agg backend); finish with :func:`save_loss_figure`."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def save_loss_figure(fig, ax, path: Path, *, ylabel: str, title: str) -> None:
    """Label the loss plot's axes and write it to ``path`` as PNG, atomically."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_log_table_csv(path: Path, log: Mapping[str, Sequence[float]], columns: Sequence[str],
                        general: Sequence[str] = ("lr",)) -> None:
    """``loss.csv`` of a per-step log: ``step`` then ``columns`` (6 decimals; ``general``
    columns, e.g. the learning rate, in 6 significant digits), atomically."""
    rows = [",".join(("step", *columns))]
    for i in range(len(log[columns[0]])):
        rows.append(",".join([str(i + 1)] + [f"{log[c][i]:.6g}" if c in general else f"{log[c][i]:.6f}"
                                             for c in columns]))
    atomic_write_text(path, "\n".join(rows) + "\n")


def write_losses_plot(path: Path, log: Mapping[str, Sequence[float]], curves: Sequence[tuple[str, str]],
                      title: str, ylabel: str = "loss") -> None:
    """``loss.png`` of a per-step log: the raw total ``loss`` faint, and the moving average of
    each ``(column, colour)`` of ``curves``."""
    steps = list(range(1, len(log["loss"]) + 1))
    window = smoothing_window(len(log["loss"]))
    fig, ax = loss_figure()
    ax.plot(steps, log["loss"], color="tab:blue", alpha=0.3, linewidth=1)
    for key, color in curves:
        ax.plot(steps, moving_average(log[key], window), color=color, linewidth=2,
                label=f"{key.replace('_', ' ')} (moving average, {window} steps)")
    save_loss_figure(fig, ax, path, ylabel=ylabel, title=title)


def save_module_weights(module: torch.nn.Module, path: Path, metadata: dict[str, str],
                        extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """``module``'s state dict (plus ``extra`` tensors) as safetensors on the CPU, atomically."""
    from models.weights import save_safetensors

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous().clone() for k, v in (extra or {}).items()})
    save_safetensors(tensors, path, metadata)
