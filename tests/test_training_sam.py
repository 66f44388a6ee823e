"""``runtime train sam``: prompt sampling, a short tiny run (outputs, falling loss when overfitting
two images, loadable weights, --resume bit-identical to an uninterrupted run), the quick
check_metrics, and clear errors for bad settings."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.sam import main
from training.sam_data import sample_prompt
from training.sam_eval import METRIC_KEYS, check_metrics

pytestmark = pytest.mark.slow

COMMON = ["--preset", "tiny", "--num-images", "2", "--batch-size", "2", "--prompts-per-image", "3", "--lr", "3e-3",
          "--quiet", "--seed", "3", "--eval-images", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models run fastest so, and shared CPUs do not stall the run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 12-step run on two images."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sam") / "full"
    assert main(["--out", str(out), "--steps", "12", "--checkpoint-every", "0", *COMMON]) == 0
    torch.set_num_threads(before)
    return out


def _losses(folder) -> list[float]:
    with open(folder / "loss.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_sample_prompt_points_lie_on_the_object_and_are_padded():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:14] = True
    rng = np.random.default_rng(0)
    points, labels = sample_prompt(rng, mask, 3, True, 6)
    assert points.shape == (6, 2) and labels.tolist() == [1, 1, 1, 0, -1, -1]
    for x, y in points[:3].astype(int):
        assert mask[y, x]                                 # (x, y) = (column, row) on the object
    x, y = points[3].astype(int)
    assert not mask[y, x]                                 # the background point is off it
    assert (points[4:] == -1).all()
    points, labels = sample_prompt(np.random.default_rng(0), mask, 1, False, 6)
    assert labels.tolist() == [1, -1, -1, -1, -1, -1]
    again, _ = sample_prompt(np.random.default_rng(0), mask, 1, False, 6)
    assert np.array_equal(points, again)
    with pytest.raises(ValueError, match="empty mask"):
        sample_prompt(rng, np.zeros((4, 4), bool), 1, False, 6)


def test_short_run_writes_outputs_and_lowers_loss(full_run):
    from models.efficient_sam.checkpoint import load_efficient_sam

    for name in ("efficient_sam.safetensors", "checkpoint.pt", "loss.csv", "loss.png", "config.json", "metrics.json"):
        assert (full_run / name).is_file(), name
    assert not list(full_run.glob(".*tmp*"))
    losses = _losses(full_run)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])  # overfitting two images
    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, report = load_efficient_sam("tiny", full_run / "efficient_sam.safetensors")
    assert report.missing == [] and report.unexpected == []
    ckpt = torch.load(full_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 12
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value), key

    config = json.loads((full_run / "config.json").read_text())
    for key in ("command", "seeds", "steps_done", "train_seconds", "finished", "model", "source", "device",
                "torch_threads"):
        assert key in config, key
    assert config["command"].startswith("runtime train sam --out ")
    assert config["steps_done"] == 12 and config["finished"] and config["torch_threads"] == 1
    assert config["model"]["preset"] == "tiny" and config["model"]["parameters"] > 0
    assert config["model"]["config"]["encoder_width"] == 32 and config["source"]["images"] == 2
    assert config["seeds"]["train"] == 3 and config["seeds"]["eval"] == 1003

    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["steps_done"] == 12 and metrics["finished"]
    assert [e["step"] for e in metrics["history"]] == [0, 12]
    final = metrics["eval"]
    assert final["step"] == 12 and final["images"] == 2 and final["prompts"] >= 8
    for key in METRIC_KEYS:
        assert 0.0 <= final[key] <= 1.0, key
    assert final["miou_1pt"] > metrics["initial_eval"]["miou_1pt"]


def test_resume_is_bit_identical_to_an_uninterrupted_run(full_run, tmp_path):
    split = tmp_path / "split"
    assert main(["--out", str(split), "--steps", "5", "--checkpoint-every", "0", *COMMON]) == 0
    assert main(["--out", str(split), "--steps", "12", "--resume", *COMMON]) == 0
    a = load_file(str(full_run / "efficient_sam.safetensors"))
    b = load_file(str(split / "efficient_sam.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(full_run) == _losses(split)
    config = json.loads((split / "config.json").read_text())
    assert [(i["from_step"], i["to_step"]) for i in config["invocations"]] == [(0, 5), (5, 12)]
    assert config["steps_done"] == 12 and config["finished"]


def test_check_metrics_is_deterministic_and_in_range(full_run):
    path = full_run / "efficient_sam.safetensors"
    first = check_metrics(path, seed=11, num_images=3)  # the preset (tiny) is read from the file
    assert set(first) == set(METRIC_KEYS)
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert check_metrics(path, seed=11, num_images=3, preset="tiny") == first


@pytest.mark.parametrize("extra, message", [
    (["--prompts-per-image", "0"], "--prompts-per-image must be >= 1"),
    (["--negative-fraction", "1.5"], "--negative-fraction must be in"),
    (["--max-points", "6"], "exceeds the 6 prompt points"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--source-param", "seed=4"], "--seed / --num-images"),
    (["--source-param", "max_shapes=9"], "max_shapes"),
    (["--resume"], "no checkpoint"),
])
def test_bad_settings_give_clear_errors(tmp_path, capsys, extra, message):
    assert main(["--out", str(tmp_path / "run"), "--steps", "2", *COMMON, *extra]) == 2
    assert message in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "1", *COMMON, "--eval-images", "0"]) == 0
    assert main(["--out", str(out), "--steps", "1", *COMMON]) == 2  # a checkpoint is there: --resume needed
    assert "--resume" in capsys.readouterr().err
    assert main(["--out", str(out), "--steps", "2", "--resume", *COMMON, "--max-points", "2"]) == 2
    assert "max_points" in capsys.readouterr().err
