"""The training loop every ``runtime train MODEL`` command runs.

A model's trainer (a :class:`Trainer` subclass in ``training/<model>.py``) holds what is its
own: its options and settings, its data, the loss of a step, its held-out evaluation and how
its weights file is written. :func:`train` owns the rest, the same for every model:

- options and settings: ``--out``/``--resume``, the optimisation group (``--steps``,
  ``--batch-size``, ``--lr``, ``--weight-decay``, ``--warmup``, ``--lr-decay``, ``--grad-clip``,
  ``--checkpoint-every``, ``--device``, ``--quiet``) and ``--eval-every``/``--eval-seed``, with
  defaults read from the trainer's settings dataclass (one place per default);
- seeding: torch is seeded with ``--seed`` once the trainer's data and initial model exist and
  before its trainable modules are built (:meth:`Trainer.trainable`); step ``k`` draws its batch
  from ``numpy.random.default_rng([seed, k])`` alone;
- resume: ``checkpoint.pt`` holds the trained modules, the trainer's own state, the optimiser,
  the step, the torch RNG state, the per-step log, the evaluations and every invocation; a run
  continued with ``--resume`` ends with the weights of an uninterrupted one (same device and
  threads), and one whose settings differ (but for those the trainer lists as resumable) is
  refused with the differences named;
- the learning rate (linear warmup, then constant or cosine decay to 0 at ``--steps``),
  gradient clipping, the optimiser step, a finite-loss check;
- evaluation at the start, every ``--eval-every`` steps and at the end; a checkpoint every
  ``--checkpoint-every`` steps and at the end (weights, ``loss.csv``, ``config.json``,
  ``metrics.json``; ``loss.png`` at the end); progress on a bar, evaluations on stderr (the
  checkpoint's layout: :mod:`training.outputs`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import numpy as np

from training.common import due, mean_or_none, parse_source_params, set_scheduled_lr
from training.options import HelpFormatter, Options

# settings every run may change on --resume: they do not change what is trained
RESUMABLE = ("steps", "checkpoint_every", "quiet", "out", "resume", "weights", "eval_every", "eval_seed", "eval_images")
# loop options added after runs were made: those runs still resume while they keep the default
LATER_OPTIONS = {"lr_decay": "constant"}


@dataclass
class LoopSettings:
    """The settings of every training run; a trainer's settings dataclass extends them and may
    redeclare a field to give it another default (the option's default follows)."""

    out: str
    seed: int = 0
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 0
    lr_decay: str = "constant"
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_every: int = 0
    eval_seed: int | None = None
    device: str = "auto"
    resume: bool = False
    quiet: bool = False

    @property
    def held_out_seed(self) -> int:
        """Source seed of the held-out evaluation: ``--eval-seed``, default seed + 1000."""
        return self.seed + 1000 if self.eval_seed is None else self.eval_seed


class Step(NamedTuple):
    """What a trainer's step gives the loop: the ``objective`` to minimise and the step's values
    of the log columns (``loss`` first: the value the loss log and the finite check use)."""

    objective: Any                     # a scalar torch tensor
    log: dict[str, Any]                # column -> float or scalar tensor


class Trainer:
    """One model's part of a training run. Subclasses set the class attributes and implement
    the methods below; :func:`train` calls them in this order: :meth:`check` (settings only),
    :meth:`run_identity` (settings only), ``__init__`` (data and the initial model, before torch
    is seeded), :meth:`trainable` (after seeding), :meth:`modules`, on resume :meth:`resumed`,
    then per step :meth:`step` and :meth:`after_update`, with :meth:`evaluate` and
    :meth:`save_weights` at their cadence."""

    command: ClassVar[str]                      # "sam": ``runtime train sam``
    description: ClassVar[str]                  # the command's --help description
    settings: ClassVar[type]                    # its settings dataclass (a LoopSettings)
    checkpoint_format: ClassVar[str]
    checkpoint_version: ClassVar[int]
    checkpoint_kind: ClassVar[str]              # "an EfficientSAM" (in errors)
    weights_file: ClassVar[str]                 # written in --out at every checkpoint
    log_columns: ClassVar[tuple[str, ...]]      # the log's columns, "loss" first ("lr" added at the end if absent)
    general_columns: ClassVar[tuple[str, ...]] = ()   # log columns written with 6 significant digits
    summary_columns: ClassVar[tuple[str, ...]] = ("loss",)  # first / last means in config.json, metrics.json
    summary_window: ClassVar[int] = 10
    progress_columns: ClassVar[tuple[str, ...]] = ()  # moving averages shown on the progress bar
    plot_curves: ClassVar[tuple[tuple[str, str], ...]] = (("loss", "tab:blue"),)  # (column, colour) in loss.png
    plot_ylabel: ClassVar[str] = "loss"
    resumable: ClassVar[tuple[str, ...]] = ()   # settings besides RESUMABLE a --resume may change
    later_options: ClassVar[Mapping[str, Any]] = {}  # options added later, with their defaults
    data_title: ClassVar[str] = "data"
    batch_help: ClassVar[str] = "samples per step"
    weight_decay_help: ClassVar[str] = "AdamW weight decay, on weight matrices only"

    def __init__(self, s: Any, device: Any, resuming: bool) -> None:
        """Build the data, the held-out set and the initial model (an empty one when ``resuming``)."""
        self.s, self.device = s, device

    # --- options and settings -----------------------------------------------------------------

    @classmethod
    def add_options(cls, o: Options) -> None:
        """Add the command's own options to ``o``'s groups (model, data, own optimisation, evaluation)."""

    @classmethod
    def settings_from_args(cls, args: argparse.Namespace) -> Any:
        values = {f.name: getattr(args, f.name) for f in fields(cls.settings) if hasattr(args, f.name)}
        if hasattr(args, "source_param"):
            values["source_params"] = parse_source_params(args.source_param)
        return cls.settings(**values)

    @classmethod
    def check(cls, s: Any) -> None:
        """Refuse bad settings (``ValueError``) before anything is written."""

    @classmethod
    def run_identity(cls, s: Any) -> dict[str, Any]:
        """The settings (and, in subclasses, the weights) a resumed run must share with the run it
        continues: every setting but the resumable ones; options added after runs were made
        (``later_options``) only when not at their defaults, so those runs still resume; a cosine
        ``lr_decay`` also fixes ``steps`` (``cosine_steps``), where it ends."""
        identity = {k: v for k, v in asdict(s).items() if k not in RESUMABLE + cls.resumable}
        for name, default in {**LATER_OPTIONS, **cls.later_options}.items():
            if identity.get(name) == default:
                del identity[name]
        if s.lr_decay == "cosine":
            identity["cosine_steps"] = s.steps
        return identity

    # --- the model ----------------------------------------------------------------------------

    def trainable(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups; modules that draw from torch's RNG are built here."""
        raise NotImplementedError

    def modules(self) -> dict[str, Any]:
        """The trained modules by checkpoint key (``model``, ``probe``)."""
        raise NotImplementedError

    def clipped(self) -> list[Any]:
        """The parameters whose gradient norm ``--grad-clip`` bounds, in this order."""
        return [p for m in self.modules().values() for p in m.parameters()]

    def state(self) -> dict[str, Any]:
        """The trainer's own checkpoint entries besides its modules (tensors, plain containers)."""
        return {}

    def resumed(self, state: Mapping[str, Any]) -> None:
        """Finish restoring from a checkpoint (the modules and optimiser are loaded)."""

    # --- the steps ----------------------------------------------------------------------------

    def step(self, step: int, rng: np.random.Generator) -> Step:
        """The objective of training step ``step`` (its batch drawn from ``rng``) and its log values."""
        raise NotImplementedError

    def after_update(self) -> dict[str, float]:
        """Called after the optimiser step; returns log values read after it."""
        return {}

    # --- evaluation and outputs ---------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """Held-out metrics after ``step`` steps (must not change the training state); ``None``
        when the run has no held-out set."""
        return None

    @classmethod
    def describe(cls, result: Mapping[str, Any]) -> str | None:
        """The held-out metrics in words (``None``: nothing to say)."""
        return None

    def save_weights(self, path: Path, step: int) -> None:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """``config.json`` entries describing the run (seeds, model, data)."""
        return {}

    def plot_title(self) -> str:
        raise NotImplementedError

    def summary(self, log: Mapping[str, Sequence[float]]) -> dict[str, Any]:
        """First and last means of the summary columns (in config.json and metrics.json)."""
        n = self.summary_window
        return {f"{key}_{end}": mean_or_none(log[key][:n] if end == "first" else log[key][-n:])
                for key in self.summary_columns for end in ("first", "last")}

    def records(self, step: int, evals: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Extra ``config.json`` and ``metrics.json`` entries at ``step``."""
        return {}, {}

    # --- the command --------------------------------------------------------------------------

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"runtime train {cls.command}", description=cls.description,
                                    formatter_class=HelpFormatter)
        p.add_argument("--out", required=True, metavar="DIR", help="output folder")
        p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (same settings; "
                       "--steps may grow)")
        o = Options(p, cls.settings, cls.data_title)
        t = o.optimisation
        o.add(t, "--steps", type=int, help="training steps (of the whole run, when resuming)")
        o.add(t, "--batch-size", type=int, help=cls.batch_help)
        o.add(t, "--lr", type=float, help="AdamW learning rate")
        o.add(t, "--weight-decay", type=float, help=cls.weight_decay_help)
        o.add(t, "--warmup", type=int, metavar="STEPS", help="linear learning-rate warmup")
        o.add(t, "--lr-decay", choices=["constant", "cosine"], help="after the warmup: constant, or cosine decay "
              "to 0 at --steps")
        o.add(t, "--grad-clip", type=float, help="max gradient norm (0 = off)")
        o.add(o.data, "--seed", type=int, help="training seed (and the source's seed)")
        o.add(o.evaluation, "--eval-every", type=int, metavar="N",
              help="also evaluate every N steps (0 = only at the start and the end)")
        o.add(o.evaluation, "--eval-seed", type=int, help="source seed of the held-out set (default: seed + 1000)")
        cls.add_options(o)
        o.add(t, "--checkpoint-every", type=int, metavar="N",
              help="write the checkpoint and weights every N steps (0 = only at the end)")
        o.add(t, "--device", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
        t.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        return p

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> int:
        """The ``runtime train COMMAND`` entry point: parse, train, report; returns the exit
        status (2 for bad settings or files, 130 when interrupted)."""
        from models.weights import WeightsError
        from training.outputs import MissingDependency

        argv = list(sys.argv[1:] if argv is None else argv)
        args = cls.parser().parse_args(argv)
        try:
            result = train(cls, cls.settings_from_args(args), command=argv)
        except KeyboardInterrupt:
            print("interrupted; continue with the same command and --resume", file=sys.stderr)
            return 130
        except (ValueError, FileNotFoundError, WeightsError, FloatingPointError, MissingDependency) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        first, last = result.losses[:10], result.losses[-10:]
        said = cls.describe(result.metrics) if result.metrics else None
        print(f"trained {result.steps} steps in {result.seconds:.1f} s: loss {np.mean(first):.4f} (first "
              f"{len(first)}) -> {np.mean(last):.4f} (last {len(last)})"
              + (f"; held-out {said}" if said else "") + f"; weights {result.out / cls.weights_file}")
        return 0


# --- the run ----------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    """What :func:`train` returns: the output folder, the steps of the whole run, their
    losses, the final held-out metrics, and the seconds this invocation took."""

    out: Path
    steps: int
    losses: list[float]
    metrics: dict[str, Any]
    seconds: float


def finite_loss(loss, step: int) -> float:
    """The loss of ``step`` as a float; raises :class:`FloatingPointError` when it is not finite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step + 1}; lower --lr")
    return value


def train(cls: type[Trainer], s: LoopSettings, command: Sequence[str] = ()) -> TrainingResult:
    """Run (or resume) ``cls``'s training with settings ``s``; returns the per-step losses of the
    whole run and the final held-out metrics."""
    import torch
    from tqdm import tqdm

    from models.weights import file_fingerprint
    from training import outputs
    from training.start import check_loop_settings, check_same_run, start_run

    check_loop_settings(s)
    cls.check(s)

    out, ckpt_path, device, resume_state = start_run(cls, s)
    run_identity = json.dumps(cls.run_identity(s), sort_keys=True)
    options = {f.name for f in fields(s)} - {"out", "resume", "quiet", *(["steps"] if s.lr_decay == "cosine" else [])}
    may_change = [f"--{n.replace('_', '-')}" for n in RESUMABLE + cls.resumable if n in options]
    check_same_run(resume_state, run_identity, ckpt_path, ", ".join(may_change))
    trainer = cls(s, device, resuming=resume_state is not None)

    torch.manual_seed(s.seed)
    optimizer = torch.optim.AdamW(trainer.trainable(), lr=s.lr)
    modules = trainer.modules()
    columns = cls.log_columns if "lr" in cls.log_columns else (*cls.log_columns, "lr")
    log: dict[str, list[float]] = {c: [] for c in columns}
    evals: list[dict[str, Any]] = []
    invocations: list[dict[str, Any]] = []
    train_seconds = 0.0
    start = 0
    if resume_state is not None:
        for name, module in modules.items():
            module.load_state_dict(resume_state[name])
        optimizer.load_state_dict(resume_state["optimizer"])
        trainer.resumed(resume_state)
        outputs.set_rng_state(resume_state["rng"], device)
        start = int(resume_state["step"])
        log = {c: resume_state["log"][:, i].tolist() for i, c in enumerate(columns)}
        evals = json.loads(resume_state["evals"])
        invocations = json.loads(resume_state["invocations"])
        train_seconds = float(resume_state["train_seconds"])
    invocations.append({"command": f"runtime train {cls.command} " + shlex.join(command),
                        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "from_step": start, "to_step": None, "finished": None})
    meta = {"training": {k: v for k, v in asdict(s).items() if k not in ("resume", "quiet")}, **trainer.meta(),
            "device": str(device), "torch_threads": torch.get_num_threads()}
    weights = out / cls.weights_file

    def run_eval(step: int) -> None:
        if any(e["step"] == step for e in evals):
            return
        result = trainer.evaluate(step)
        if result is None:
            return
        evals.append(result)
        said = trainer.describe(result)
        if not s.quiet and said:
            print(f"step {step}: held-out {said}", file=sys.stderr)

    def save(step: int, final: bool, seconds: float) -> None:
        outputs.save_checkpoint(
            ckpt_path, format=cls.checkpoint_format, version=cls.checkpoint_version, step=step,
            **{name: {k: v.detach().cpu() for k, v in m.state_dict().items()} for name, m in modules.items()},
            **trainer.state(), optimizer=optimizer.state_dict(), rng=outputs.rng_state(device), run=run_identity,
            log=torch.tensor([log[c] for c in columns], dtype=torch.float64).t().reshape(len(log["loss"]),
                                                                                       len(columns)),
            evals=json.dumps(evals), invocations=json.dumps(invocations), train_seconds=seconds)
        trainer.save_weights(weights, step)
        outputs.write_log_table_csv(out / "loss.csv", log, columns, general=("lr", *cls.general_columns))
        if final:
            outputs.write_losses_plot(out / "loss.png", log, cls.plot_curves, trainer.plot_title(),
                                      ylabel=cls.plot_ylabel)
        config_extra, metrics_extra = trainer.records(step, evals)
        outputs.write_run_records(out, meta, invocations, evals, step=step, finished=final and step >= s.steps,
                                  seconds=seconds, eval_seed=s.held_out_seed, summary=trainer.summary(log),
                                  config_extra={"weights_fingerprint": file_fingerprint(weights),
                                                "weights_bytes": weights.stat().st_size,
                                                "seconds_per_step": seconds / step if step else None, **config_extra},
                                  metrics_extra=metrics_extra)

    if start == 0:
        run_eval(0)
    started = time.perf_counter()
    base_seconds = train_seconds
    bar = tqdm(total=s.steps, initial=min(start, s.steps), desc=f"train {cls.command}", unit="step",
               disable=s.quiet, dynamic_ncols=True)
    try:
        for step in range(start, s.steps):
            lr = set_scheduled_lr(optimizer, s.lr, s.warmup, step, s.steps, s.lr_decay)
            objective, values = trainer.step(step, np.random.default_rng([s.seed, step]))
            value = finite_loss(values["loss"], step)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainer.clipped(), s.grad_clip)
            optimizer.step()
            values = {**values, **trainer.after_update(), "loss": value, "lr": lr}
            for c in columns:
                log[c].append(float(values[c]))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", avg=f"{mean_or_none(log['loss'][-20:]):.4f}",
                            **{c: f"{mean_or_none(log[c][-20:]):.3f}" for c in cls.progress_columns})
            done = step + 1
            if due(done, s.eval_every, s.steps):
                run_eval(done)
            if due(done, s.checkpoint_every, s.steps):
                save(done, final=False, seconds=base_seconds + time.perf_counter() - started)
    finally:
        bar.close()
    # the end: the training time (evaluation excluded), the final evaluation, the final save
    final_step = max(start, s.steps)
    train_seconds = base_seconds + time.perf_counter() - started
    run_eval(final_step)
    invocations[-1].update(to_step=final_step, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           seconds=round(time.perf_counter() - started, 3))
    save(final_step, final=True, seconds=train_seconds)
    final_eval = outputs.eval_at(evals, final_step)
    return TrainingResult(out=out, steps=len(log["loss"]), losses=log["loss"], metrics=final_eval or {},
                          seconds=time.perf_counter() - started)
