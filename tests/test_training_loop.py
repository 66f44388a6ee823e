"""``training.loop``: the loop every ``runtime train`` command runs, driven here by a toy trainer
(a linear regression on seeded numpy data) so that each promise is checked without a real model:
option defaults from the settings dataclass, evaluation and checkpoint cadence, the learning-rate
schedule in the log, bit-identical resume, refused resumes, the non-finite loss check."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.common import weight_decay_groups
from training.loop import LoopSettings, Step, Trainer
from training.outputs import save_module_weights

TRUE_W = np.array([1.5, -2.0, 0.5], np.float32)


@dataclass
class ToySettings(LoopSettings):
    steps: int = 12
    batch_size: int = 16
    lr: float = 0.05
    noise: float = 0.1
    blow_up_at: int = -1          # a step whose loss is made infinite (to test the check)


class ToyTrainer(Trainer):
    command = "toy"
    description = "Fit y = w.x on seeded data."
    settings = ToySettings
    checkpoint_format, checkpoint_version, checkpoint_kind = "toy-training", 1, "a toy"
    weights_file = "toy.safetensors"
    log_columns = ("loss", "abs_error")
    summary_columns = ("loss", "abs_error")

    @classmethod
    def add_options(cls, o) -> None:
        o.add(o.data, "--noise", type=float, help="label noise")
        o.add(o.data, "--blow-up-at", type=int, help="step with an infinite loss")

    @classmethod
    def check(cls, s: ToySettings) -> None:
        if s.noise < 0:
            raise ValueError(f"--noise must be >= 0, got {s.noise}")

    def __init__(self, s, device, resuming):
        super().__init__(s, device, resuming)
        rng = np.random.default_rng(123)
        self.eval_x = torch.from_numpy(rng.normal(size=(64, 3)).astype(np.float32))
        self.eval_y = self.eval_x @ torch.from_numpy(TRUE_W)

    def trainable(self):
        self.model = torch.nn.Linear(3, 1, bias=True)   # drawn from the seeded torch RNG
        return weight_decay_groups(self.model, self.s.weight_decay)

    def modules(self):
        return {"model": self.model}

    def step(self, step, rng):
        x = torch.from_numpy(rng.normal(size=(self.s.batch_size, 3)).astype(np.float32))
        y = x @ torch.from_numpy(TRUE_W) + self.s.noise * torch.randn(self.s.batch_size)  # torch RNG too
        pred = self.model(x)[:, 0]
        loss = torch.nn.functional.mse_loss(pred, y)
        if step == self.s.blow_up_at:
            loss = loss * float("inf")
        return Step(loss, {"loss": loss, "abs_error": (pred - y).abs().mean().detach()})

    def evaluate(self, step):
        with torch.no_grad():
            error = float((self.model(self.eval_x)[:, 0] - self.eval_y).abs().mean())
        return {"step": step, "abs_error": error}

    @classmethod
    def describe(cls, r):
        return f"abs error {r['abs_error']:.4f}"

    def save_weights(self, path, step):
        save_module_weights(self.model, path, {"step": str(step)})

    def plot_title(self):
        return "toy"


def run(out, *args) -> int:
    return ToyTrainer.main(["--out", str(out), "--quiet", "--device", "cpu", *args])


def log_rows(out) -> list[dict[str, str]]:
    with open(out / "loss.csv") as fh:
        return list(csv.DictReader(fh))


def test_defaults_come_from_the_settings_and_help_shows_them(capsys):
    args = ToyTrainer.parser().parse_args(["--out", "x"])
    s = ToyTrainer.settings_from_args(args)
    assert (s.steps, s.batch_size, s.lr, s.noise, s.checkpoint_every, s.seed) == (12, 16, 0.05, 0.1, 50, 0)
    with pytest.raises(SystemExit):
        ToyTrainer.parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "label noise (default: 0.1)" in text and "(default: 12)" in text
    assert "(default: None)" not in text  # options without a default say so in their help instead


def test_a_run_learns_evaluates_on_cadence_and_writes_its_records(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--steps", "12", "--eval-every", "5", "--warmup", "4", "--lr-decay", "cosine") == 0
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [str(k) for k in range(1, 13)]
    lrs = [float(r["lr"]) for r in rows]
    expected = [0.05 * (k + 1) / 4 if k < 4 else 0.05 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 8)) for k in range(12)]
    assert lrs == pytest.approx(expected, rel=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["history"]] == [0, 5, 10, 12]
    assert metrics["eval"]["abs_error"] < metrics["initial_eval"]["abs_error"]
    config = json.loads((out / "config.json").read_text())
    assert config["finished"] and config["steps_done"] == 12 and config["training"]["noise"] == 0.1
    assert config["loss_first"] == pytest.approx(np.mean([float(r["loss"]) for r in rows[:10]]), rel=1e-5)
    assert config["weights_fingerprint"] and config["seconds_per_step"] > 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == "toy-training" and ckpt["log"].shape == (12, 3)  # loss, abs_error, lr
    assert torch.equal(load_file(str(out / "toy.safetensors"))["weight"], ckpt["model"]["weight"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_ends_bit_identical_and_refuses_other_settings(tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run(full, "--steps", "10", "--checkpoint-every", "0") == 0
    assert run(split, "--steps", "4", "--checkpoint-every", "3") == 0
    assert run(split, "--steps", "10") == 2                      # a checkpoint is there: --resume needed
    assert "--resume" in capsys.readouterr().err
    assert run(split, "--steps", "10", "--resume", "--lr", "0.1") == 2
    assert "lr: checkpoint 0.05, now 0.1" in capsys.readouterr().err
    assert run(split, "--steps", "10", "--resume") == 0
    a, b = load_file(str(full / "toy.safetensors")), load_file(str(split / "toy.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_rows(full) == log_rows(split)
    config = json.loads((split / "config.json").read_text())
    assert [(i["from_step"], i["to_step"]) for i in config["invocations"]] == [(0, 4), (4, 10)]
    # a cosine schedule ends at --steps, so --steps is then part of the run
    cosine = tmp_path / "cosine"
    assert run(cosine, "--steps", "3", "--lr-decay", "cosine") == 0
    assert run(cosine, "--steps", "5", "--lr-decay", "cosine", "--resume") == 2
    assert "cosine_steps" in capsys.readouterr().err


def test_bad_settings_and_non_finite_losses_are_refused(tmp_path, capsys):
    assert run(tmp_path / "a", "--noise", "-1") == 2
    assert "--noise must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()                          # refused before anything is written
    assert run(tmp_path / "b", "--lr", "0") == 2
    assert "--lr must be > 0" in capsys.readouterr().err
    assert run(tmp_path / "c", "--blow-up-at", "2", "--checkpoint-every", "1") == 2
    assert "loss is inf at step 3; lower --lr" in capsys.readouterr().err
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["step"] == 2  # the last good one


def test_an_old_checkpoint_version_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "2") == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "version": 0}, out / "checkpoint.pt")
    assert run(out, "--steps", "3", "--resume") == 2
    assert "version 0 checkpoint; this code reads version 1" in capsys.readouterr().err
