"""``runtime train fid``: the captions of a question (as the caption stage keeps them), the answer
target, a short tiny run (outputs, falling loss, loadable weights, --resume bit-identical to an
uninterrupted run), ``check_metrics`` and errors on bad settings."""

from __future__ import annotations

import csv
import json
import math

import numpy as np

import pytest
import torch
from safetensors.torch import load_file

from shapes.captions import PROMPT, caption_for_patches
from training.fid import GRID, check_metrics, main
from training.fid_data import QAData, Recipe, draw_captions, heatmap_weights, target_answer

pytestmark = pytest.mark.slow

COMMON = ["--preset", "tiny", "--num-images", "2", "--batch-size", "8", "--lr", "3e-3", "--quiet", "--seed", "3",
          "--eval-images", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models run fastest so, and shared CPUs do not stall the run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    from training.data import source_params

    return QAData(source_params("shapes", 4, 6, {}), GRID)


def _losses(folder) -> list[float]:
    with open(folder / "loss.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_target_is_the_normalised_majority_answer():
    assert target_answer(["2", "two", "Two", "3", "2", "2", "two", "2", "1", "2"]) == "2"
    assert target_answer(["Red", "red", "red.", "RED", "blue", "red", "red", "red", "red", "green"]) == "red"
    assert target_answer(["a square", "square", "square", "square", "circle"]) == "square"
    assert target_answer([]) == ""


def test_captions_are_what_the_caption_stage_keeps(data):
    from grids import pool_to_grid

    recipe = Recipe()
    assert len(data.scenes) == 6 and len(data) >= 6
    for sample in data.samples:
        if sample.focus is not None:
            assert sample.focus.shape == (24 * 24,) and 0 < sample.focus.max() <= 1
        captions = draw_captions(data, sample, np.random.default_rng(1), recipe)
        assert captions == draw_captions(data, sample, np.random.default_rng(1), recipe)  # deterministic
        assert 1 <= len(captions) <= recipe.num_captions
        for k, text in enumerate(captions):
            assert not text.startswith(PROMPT) and not any(text in other for other in captions[:k])
            assert text == "a plain background" or text == "a textured background" or " " in text
    # a question about referred objects focuses on their ground-truth mask pooled to the grid
    from sources.shapes import ShapesSource

    records = list(ShapesSource(data.params).iter_samples())
    for record, sample in zip(records, data.samples):
        assert sample.question == record["question"] and sample.target == target_answer(record["answers"])
        if record["gt_mask"] is not None:
            np.testing.assert_allclose(sample.focus, pool_to_grid(record["gt_mask"][None], 24)[0].reshape(-1))
    # a strongly focused heatmap mostly shows the referred objects; the caption of the chosen
    # patches is exactly caption_for_patches (the prompt stripped)
    sample = next(s for s in data.samples if s.question_type == "color")
    tight = Recipe(uniform_fraction=0.0, spread_min=1e-6, spread_max=1e-6)
    weights = heatmap_weights(sample.focus, 576, np.random.default_rng(0), tight)
    assert weights.min() == pytest.approx(1e-6)
    captions = draw_captions(data, sample, np.random.default_rng(0), tight)
    assert any(f" {sample.target} " in f" {c} " for c in captions)
    assert (heatmap_weights(sample.focus, 576, np.random.default_rng(0), Recipe(uniform_fraction=1.0)) == 1).all()
    patches = [3, 40, 41, 300]
    assert data.captions  # filled by draw_captions; a fresh look-up agrees with the builder
    coverage = data.coverage[sample.image]
    expected = caption_for_patches(data.scenes[sample.image], patches, 24, coverage=coverage)[len(PROMPT):]
    key = (sample.image, 0.1, (coverage[:, patches] >= 0.1).any(axis=1).tobytes())
    assert data.captions.get(key, expected) == expected


def test_short_run_lowers_loss_resumes_bit_identically_and_checks(tmp_path):
    from models.fid_t5 import load_fid_t5

    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["--out", str(full), "--steps", "10", "--checkpoint-every", "0", *COMMON]) == 0
    for name in ("fid_t5.safetensors", "checkpoint.pt", "loss.csv", "loss.png", "config.json", "metrics.json"):
        assert (full / name).is_file(), name
    assert not list(full.glob(".*tmp*"))
    losses = _losses(full)
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert (full / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, _ = load_fid_t5("tiny", full / "fid_t5.safetensors")
    ckpt = torch.load(full / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 10
    for key, value in model.t5.state_dict().items():
        assert torch.equal(ckpt["model"][key], value), key
    config = json.loads((full / "config.json").read_text())
    for key in ("command", "seeds", "steps_done", "train_seconds", "finished", "model", "source", "device",
                "torch_threads"):
        assert key in config, key
    assert config["command"].startswith("runtime train fid --out ") and config["steps_done"] == 10
    assert config["finished"] and config["torch_threads"] == 1 and config["model"]["preset"] == "tiny"
    assert config["model"]["parameters"] > 0 and config["model"]["config"]["d_model"] == 64
    assert config["source"]["images"] == 2 and config["captions"]["num_captions_fid"] == 1
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["eval"]["step"] == 10 and [e["step"] for e in metrics["history"]] == [0, 10]
    assert 0.0 <= metrics["eval"]["exact_match"] <= 1.0 and 0.0 <= metrics["eval"]["vqa_accuracy"] <= 1.0
    assert set(metrics["eval"]["per_type"]) <= {"color", "shape", "count", "position", "exists"}

    assert main(["--out", str(split), "--steps", "5", "--checkpoint-every", "0", *COMMON]) == 0
    assert main(["--out", str(split), "--steps", "5", *COMMON]) == 2  # existing checkpoint, no --resume
    assert main(["--out", str(split), "--steps", "10", "--resume", *COMMON, "--lr", "1e-3"]) == 2
    assert main(["--out", str(split), "--steps", "10", "--resume", *COMMON]) == 0
    a, b = load_file(str(full / "fid_t5.safetensors")), load_file(str(split / "fid_t5.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(full) == _losses(split)
    resumed = json.loads((split / "config.json").read_text())
    assert len(resumed["invocations"]) == 2 and "--resume" in resumed["command"]

    first = check_metrics(full / "fid_t5.safetensors")
    assert {"exact_match", "vqa_accuracy"} <= set(first)
    assert {k.removeprefix("exact_match_") for k in first if k.startswith("exact_match_")} <= \
        {"color", "shape", "count", "position", "exists"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in first.values())
    assert check_metrics(full / "fid_t5.safetensors") == first  # deterministic


@pytest.mark.parametrize("args, message", [
    (["--num-patches", "600"], "exceeds the 24x24 patch grid"),
    (["--num-captions", "0"], "--num-captions must be >= 1"),
    (["--uniform-fraction", "1.5"], "--uniform-fraction must be in"),
    (["--spread-min", "2", "--spread-max", "1"], "--spread-min <= --spread-max"),
    (["--min-overlap", "0"], "--min-overlap must be in"),
    (["--source-param", "seed=3"], "--seed / --num-images"),
    (["--init", "nowhere.safetensors"], "no such file"),
])
def test_bad_settings_are_clear_errors(tmp_path, capsys, args, message):
    assert main(["--out", str(tmp_path / "run"), "--steps", "1", *COMMON, *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "run"), "--preset", "base"])
    assert exc.value.code == 2


def test_cosine_decay_ends_at_steps_which_then_may_not_change(tmp_path, capsys):
    from training.common import set_scheduled_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = [set_scheduled_lr(opt, 1e-3, 2, k, 10, "cosine") for k in range(10)]
    # warmup (k + 1) / 2, then 1e-3 * (1 + cos(pi * (k - 2) / 8)) / 2
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert lrs[-1] == pytest.approx(1e-3 * (1 + math.cos(7 * math.pi / 8)) / 2)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and opt.param_groups[0]["lr"] == lrs[-1]
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "2", "--lr-decay", "cosine", *COMMON]) == 0
    assert main(["--out", str(out), "--steps", "3", "--lr-decay", "cosine", "--resume", *COMMON]) == 2
    assert "cosine_steps" in capsys.readouterr().err
