"""``runtime train qavit`` with the tiny preset: data exactly as the shapes source yields it, the
loss the training supervises is the stage's heatmap, outputs are written and load through the
stage's loader, the loss goes down on a tiny overfit set, --resume ends where an uninterrupted
run ends, ``check_metrics`` is deterministic, bad options are refused."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.qavit import build_trainee, main
from training.qavit_data import ANSWERS, clip_pixels, eval_set, make_batch, render_image, shapes_params
from training.qavit_eval import check_metrics, evaluate

pytestmark = pytest.mark.slow

# 4 images, 2 questions each, 8 questions a step, a high learning rate: the model overfits quickly
COMMON = ["--preset", "tiny", "--num-images", "4", "--questions-per-image", "2", "--batch-size", "8", "--lr", "2e-3",
          "--warmup", "0", "--seed", "3", "--eval-images", "2", "--quiet"]


def _losses(folder) -> list[float]:
    with open(folder / "loss.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_data_is_the_shapes_source_and_pixels_are_the_stages():
    from sources.shapes import ShapesSource
    from stages.base import Batch
    from stages.images import PreprocessImage

    params = shapes_params(5, 3, 4, {})
    records = list(ShapesSource(params).iter_samples())
    rendered = [render_image(params, i) for i in range(3)]
    questions = [q for r in rendered for q in r.questions]
    masks = [m for r in rendered for m in r.masks]
    assert [q.text for q in questions] == [r["question"] for r in records]
    assert all(q.answer in ANSWERS and q.answer in r["answers"] for q, r in zip(questions, records))
    for mask, record in zip(masks, records):
        assert (mask is None) == (record["gt_mask"] is None)
        if mask is not None:
            np.testing.assert_array_equal(mask, record["gt_mask"])
    images = [r.image for r in rendered]
    stage = PreprocessImage(PreprocessImage.Params(family="clip", image_size=112))
    expected = stage.process(Batch({"image": images}, {"image": np.ones(3, bool)}, ["a", "b", "c"], None))["pixels"]
    np.testing.assert_array_equal(clip_pixels(images, 112), expected)


def test_the_supervised_attention_is_the_stages_heatmap():
    from stages.qavit import QAViTAttention

    trainee, tokenizer = build_trainee("tiny", "late", "gated", 0, torch.device("cpu"), initial_gate=0.5)
    trainee.eval()
    data = eval_set(11, 2)
    batch = make_batch(data.rendered, 112, 8)
    enc = tokenizer(batch.questions, padding="longest", truncation=True, max_length=30, return_tensors="pt")
    with torch.no_grad():
        logits, heat = trainee(torch.from_numpy(batch.pixels), enc["input_ids"], enc["attention_mask"],
                               torch.from_numpy(batch.image_rows))
    stage = QAViTAttention(QAViTAttention.Params(mode="layer", block_num=-1))
    stage.model, stage.tokenizer = trainee.qavit, tokenizer
    native = stage.native_heatmaps(batch.pixels, batch.questions, batch.image_rows)
    np.testing.assert_allclose(native.reshape(len(native), -1), heat.numpy(), rtol=1e-5, atol=1e-8)
    assert logits.shape == (len(batch.questions), len(ANSWERS))
    result = evaluate(trainee.qavit, tokenizer, "tiny", data, torch.device("cpu"), 0, answer_head=trainee.answer_head)
    assert result["questions"] == len(batch.questions) and result["grid"] == 8
    assert 0 <= result["pointing_game"] <= 1 and 0 < result["energy_in_mask"] < 1
    assert 0 < result["pointing_chance"] < 1 and result["question_spread"] > 0


def test_short_run_writes_its_outputs_loads_and_resume_is_exact(tmp_path):
    from models.qavit import load_qavit
    from stages.qavit import QAViTAttention

    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["--out", str(full), "--steps", "12", "--checkpoint-every", "0", *COMMON]) == 0
    for name in ("qavit.safetensors", "checkpoint.pt", "loss.csv", "loss.png", "config.json", "metrics.json"):
        assert (full / name).is_file(), name
    assert (full / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(full.glob(".*tmp*"))
    losses = _losses(full)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])

    meta = json.loads((full / "config.json").read_text())
    assert meta["command"].startswith("runtime train qavit --out") and "--steps 12" in meta["command"]
    assert meta["steps_done"] == 12 and meta["finished"] and meta["train_seconds"] > 0
    assert meta["seeds"]["train"] == 3 and meta["seeds"]["eval"] == 1003
    assert meta["model"]["preset"] == "tiny" and meta["model"]["config"]["image_size"] == 112
    assert meta["model"]["parameters"] > 0 and meta["source"]["name"] == "shapes"
    assert meta["device"] == "cpu" and meta["torch_threads"] >= 1
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["eval"]["step"] == 12 and [e["step"] for e in metrics["history"]] == [0, 12]
    assert 0 <= metrics["eval"]["pointing_game"] <= 1 and 0 <= metrics["eval"]["answer_accuracy"] <= 1

    # the weights load through the stage's loader (explicit path), with the trained question encoder
    weights = load_file(str(full / "qavit.safetensors"))
    ckpt = torch.load(full / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 12
    model, _, report = load_qavit("tiny", full / "qavit.safetensors")
    assert report.formulation == "gated" and "question_encoder" in report.question_encoder
    assert sorted(report.vision.ignored) == ["answer_head.bias", "answer_head.weight",
                                             "vision_model.embeddings.position_ids"]
    for key, value in model.vision.state_dict().items():
        assert torch.equal(value, ckpt["model"]["qavit.vision." + key]), key
    for key, value in model.question_encoder.state_dict().items():
        assert torch.equal(value, ckpt["model"]["qavit.question_encoder." + key]), key
    assert torch.equal(weights["answer_head.weight"], ckpt["model"]["answer_head.weight"])
    stage = QAViTAttention(QAViTAttention.Params(checkpoint=str(full / "qavit.safetensors")))
    assert stage.problems() == []
    stage.setup("cpu")
    untrained = QAViTAttention(QAViTAttention.Params())
    untrained.setup("cpu")
    pixels = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    a = stage.native_heatmaps(pixels, ["what color is the circle?"], np.zeros(1, np.int64))
    b = untrained.native_heatmaps(pixels, ["what color is the circle?"], np.zeros(1, np.int64))
    assert np.abs(a - b).max() > 1e-4
    assert stage.weights_fingerprint() != untrained.weights_fingerprint()

    # 5 + 7 steps with --resume == 12 uninterrupted steps, bit for bit
    assert main(["--out", str(split), "--steps", "5", "--checkpoint-every", "2", *COMMON]) == 0
    assert main(["--out", str(split), "--steps", "12", "--resume", *COMMON]) == 0
    resumed = load_file(str(split / "qavit.safetensors"))
    assert resumed.keys() == weights.keys()
    for key in weights:
        assert torch.equal(weights[key], resumed[key]), key
    assert _losses(split) == losses
    assert json.loads((split / "metrics.json").read_text())["eval"] == metrics["eval"]
    assert len(json.loads((split / "config.json").read_text())["invocations"]) == 2

    # check_metrics: deterministic, the keys a bundle manifest records
    first = check_metrics(full / "qavit.safetensors", num_images=4)
    assert first == check_metrics(full / "qavit.safetensors", num_images=4)
    assert set(first) == {"pointing_game", "energy_in_mask", "answer_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in first.values())


def test_resume_and_option_guards(tmp_path, capsys):
    out = tmp_path / "run"
    small = ["--preset", "tiny", "--num-images", "2", "--batch-size", "2", "--questions-per-image", "1",
             "--eval-images", "0", "--quiet"]
    assert main(["--out", str(out), "--resume", "--steps", "1", *small]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--out", str(out), "--steps", "1", *small]) == 0
    assert json.loads((out / "metrics.json").read_text())["eval"] is None  # evaluation off
    assert main(["--out", str(out), "--steps", "2", *small]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--out", str(out), "--steps", "2", "--resume", "--grounding-weight", "0.5", *small]) == 2
    assert "grounding_weight" in capsys.readouterr().err
    other = str(tmp_path / "other")
    assert main(["--out", other, "--answer-weight", "0", "--grounding-weight", "0", *small]) == 2
    assert "nothing to train" in capsys.readouterr().err
    assert main(["--out", other, "--source-param", "seed=4", *small]) == 2
    assert "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", other, "--preset", "l14_336"])


def test_init_from_a_run_and_patch_probe_resume_exactly(tmp_path):
    """--init starts from a previous run's file (model and answer head as saved); the probe's
    state travels in the checkpoint, so a resumed probe run ends with the same weights."""
    from safetensors.torch import load_file

    from training.qavit import build_trainee

    first = tmp_path / "first"
    assert main(["--out", str(first), "--steps", "2", "--checkpoint-every", "0", *COMMON]) == 0
    trainee, _ = build_trainee("tiny", "late", "gated", 5, torch.device("cpu"))
    trainee.load_file("tiny", first / "qavit.safetensors")
    saved = load_file(str(first / "qavit.safetensors"))
    assert torch.equal(trainee.answer_head.weight, saved["answer_head.weight"])
    assert main(["--out", str(tmp_path / "zero"), "--steps", "0", "--init", str(first / "qavit.safetensors"),
                 *COMMON]) == 2  # --steps must be >= 1

    probe = ["--init", str(first / "qavit.safetensors"), "--patch-label-weight", "1", "--patch-object-weight", "5"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["--out", str(full), "--steps", "4", "--checkpoint-every", "0", *probe, *COMMON]) == 0
    assert main(["--out", str(split), "--steps", "2", "--checkpoint-every", "0", *probe, *COMMON]) == 0
    assert set(torch.load(split / "checkpoint.pt", weights_only=True)["probe"]) == {"weight", "bias"}
    assert main(["--out", str(split), "--steps", "4", "--resume", *COMMON]) == 2  # the init and probe are the run's
    assert main(["--out", str(split), "--steps", "4", "--resume", *probe, *COMMON]) == 0
    a, b = load_file(str(full / "qavit.safetensors")), load_file(str(split / "qavit.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert main(["--out", str(tmp_path / "bad"), "--init", str(tmp_path / "missing.safetensors"), *COMMON]) == 2
