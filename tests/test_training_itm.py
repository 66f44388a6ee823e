"""``runtime train itm`` on the synthetic shapes sample with the tiny preset: outputs are
written, the loss goes down, the weights load with ``load_blip_itm``, --resume ends where an
uninterrupted run ends, the held-out ITM accuracy is reported."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.blip import load_blip_itm, load_blip_tokenizer_for, tokenize_questions
from training.itm import main

pytestmark = pytest.mark.slow

# a fixed small dataset (4 images) and a high learning rate: the model can overfit quickly
COMMON = ["--num-images", "4", "--batch-size", "4", "--lr", "1e-3", "--seed", "3", "--eval-images", "4", "--quiet"]


def _losses(folder) -> list[float]:
    with open(folder / "loss.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_short_run_writes_its_outputs_and_resume_is_exact(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["--out", str(full), "--steps", "6", "--checkpoint-every", "0", *COMMON]) == 0
    for name in ("itm.safetensors", "checkpoint.pt", "loss.csv", "loss.png", "config.json", "metrics.json"):
        assert (full / name).is_file(), name
    assert (full / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(full.glob(".*tmp*"))  # atomic writes leave nothing behind

    losses = _losses(full)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])

    # the weights load into the tiny architecture and score differently from the untrained model
    trained, report = load_blip_itm("tiny", full / "itm.safetensors")
    assert report.ignored == ["temp"] and not report.unexpected
    untrained, _ = load_blip_itm("tiny")
    tokenizer = load_blip_tokenizer_for("tiny")
    ids, mask = tokenize_questions(tokenizer, ["what color is the circle?", "is there a red square?"])
    image = torch.randn(2, 1 + trained.grid ** 2, trained.config.vit.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(trained.itm_logits(image, ids, mask), untrained.itm_logits(image, ids, mask))

    ckpt = torch.load(full / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 6 and set(ckpt) >= {"model", "optimizer", "rng", "step", "temp"}
    state = trained.state_dict()
    for key, value in ckpt["model"].items():
        assert torch.equal(state[key], value), key

    meta = json.loads((full / "config.json").read_text())
    assert meta["steps_done"] == 6 and meta["finished"] and meta["seeds"]["train"] == 3
    assert meta["command"].startswith("runtime train itm --out") and "--steps 6" in meta["command"]
    assert meta["source"]["name"] == "shapes" and meta["source"]["images"] == 4
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["eval_seed"] == 1003 and metrics["held_out"]
    assert 0.0 <= metrics["held_out_itm_accuracy"] <= 1.0
    assert metrics["eval"]["step"] == 6 and metrics["eval"]["pairs"] > 0
    assert metrics["initial_eval"]["step"] == 0

    # 3 + 3 steps with --resume == 6 uninterrupted steps, bit for bit
    assert main(["--out", str(split), "--steps", "3", "--checkpoint-every", "2", *COMMON]) == 0
    assert torch.load(split / "checkpoint.pt", weights_only=True)["step"] == 3
    assert main(["--out", str(split), "--steps", "6", "--resume", *COMMON]) == 0
    a, b = load_file(str(full / "itm.safetensors")), load_file(str(split / "itm.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(full) == _losses(split)
    resumed = json.loads((split / "metrics.json").read_text())
    assert resumed["held_out_itm_accuracy"] == metrics["held_out_itm_accuracy"]
    assert len(json.loads((split / "config.json").read_text())["invocations"]) == 2


def test_resume_and_out_folder_guards(tmp_path, capsys):
    out = tmp_path / "run"
    small = ["--num-images", "2", "--batch-size", "2", "--eval-images", "0", "--quiet"]
    assert main(["--out", str(out), "--resume", "--steps", "1", *small]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--out", str(out), "--steps", "1", *small]) == 0
    assert not (out / "metrics.json").read_text().count('"itm_accuracy"')  # evaluation off
    assert main(["--out", str(out), "--steps", "2", *small]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--out", str(out), "--steps", "2", "--resume", "--itc-weight", "0.5", *small]) == 2
    assert "itc_weight" in capsys.readouterr().err


def test_cli_dispatches_train_itm(tmp_path):
    from runtime.cli import main as cli_main

    out = tmp_path / "cli"
    assert cli_main(["train", "itm", "--out", str(out), "--steps", "1", "--num-images", "2", "--batch-size", "2",
                     "--eval-images", "0", "--quiet"]) == 0
    assert (out / "itm.safetensors").is_file()


def test_grounding_loss_is_minus_log_of_the_question_tokens_mass_on_the_object():
    from training.itm import grounding_loss

    # 1 row, 2 heads, 4 tokens ([ENC], two question tokens, [SEP]), CLS + 3 patches
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 0, :, :] = torch.tensor([0.1, 0.6, 0.2, 0.1])
    probs[0, 1, :, :] = torch.tensor([0.1, 0.2, 0.2, 0.5])
    probs[0, :, 2, :] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # token 2 puts everything on patch 0
    mask = torch.tensor([[1, 1, 1, 1]])
    cells = torch.tensor([[0.3, 0.0, 0.0]])  # the object overlaps patch 0 only
    # token 1: heads' mass on patch 0 = (0.6 + 0.2) / 2 = 0.4; token 2: 1.0; mean = 0.7
    assert grounding_loss(probs, mask, cells).item() == pytest.approx(-np.log(0.7), rel=1e-6)
    padded = torch.cat([probs, torch.zeros(1, 2, 1, 4)], dim=2)  # a padding token changes nothing
    assert grounding_loss(padded, torch.tensor([[1, 1, 1, 1, 0]]), cells).item() == pytest.approx(-np.log(0.7),
                                                                                                   rel=1e-6)


def test_pairs_drawn_per_image_keep_each_positive_with_its_image():
    from training.pairs import Sample, draw_pairs

    samples = [Sample(image=i // 4, question=f"q{i}", answer=str(i % 3), scene=None) for i in range(40)]
    batch = draw_pairs(samples, 12, np.random.default_rng(0), per_image=4)
    n = len(batch.indices)
    assert n == 12 and len(set(batch.images[:n])) == 3  # 3 images x 4 questions
    assert batch.images[n:] == batch.images[:n]  # every negative is asked about its positive's image
    assert [samples[i].question for i in batch.indices] == batch.questions[:n]
    assert all(samples[i].image == img for i, img in zip(batch.indices, batch.images))
    assert draw_pairs(samples, 12, np.random.default_rng(0), per_image=4).questions == batch.questions


def test_grounded_run_reports_pointing_game(tmp_path):
    out = tmp_path / "grounded"
    assert main(["--out", str(out), "--steps", "2", "--grounding-weight", "1", "--block-num", "3",
                 "--questions-per-image", "2", "--patch-label-weight", "1", "--checkpoint-every", "1", *COMMON]) == 0
    with open(out / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["grounding_loss"]) > 0 and float(r["patch_loss"]) > 0 for r in rows)
    assert "probe" in torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any("probe" in k for k in load_file(str(out / "itm.safetensors")))  # training-only head
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["eval"]["pointing_game"] <= 1.0 and metrics["eval"]["pointing_samples"] > 0
    assert metrics["eval"]["block_num"] == 3
    assert main(["--out", str(tmp_path / "bad"), "--steps", "1", "--block-num", "11", *COMMON]) == 2


def test_questions_about_absent_things_are_not_positives_and_other_image_negatives_do_not_fit():
    from training.pairs import SceneFacts, Sample, draw_pairs, mentions_present

    scene = SceneFacts(frozenset({"circle", "square"}), frozenset({"red", "blue"}),
                       frozenset({("circle", "red"), ("square", "blue")}))
    assert mentions_present("is there a red circle", scene) is True
    assert mentions_present("is there a blue circle", scene) is False  # both words present, not together
    assert mentions_present("how many triangles are there", scene) is False
    assert mentions_present("what color is the leftmost shape", scene) is None
    other = SceneFacts(frozenset({"diamond"}), frozenset({"green"}), frozenset({("diamond", "green")}))
    samples = [Sample(0, "is there a red circle", "yes", scene), Sample(0, "is there a green circle", "no", scene),
               Sample(0, "what color is the leftmost shape", "red", scene),
               Sample(1, "what color is the diamond", "green", other), Sample(1, "how many circles are there", "0", other)]
    for seed in range(20):
        batch = draw_pairs(samples, 5, np.random.default_rng(seed), swap_fraction=0.0)
        assert sorted(batch.indices) == [0, 3]  # absent-thing and generic questions are never positives
        for i, negative in zip(batch.indices, batch.questions[len(batch.indices):]):
            assert mentions_present(negative, samples[i].scene) is not True
            if samples[i].image == 0:  # image 1's questions that do not describe image 0
                assert negative in ("what color is the diamond", "how many circles are there")


def test_patch_labels_from_a_hand_made_scene():
    from shapes.patch_labels import PatchLabels

    scene = json.dumps({"image_size": 40, "background": "plain", "objects": [
        {"shape": "square", "color": "red", "center": [10, 10], "size": 20, "bbox": [0, 0, 20, 20]},
        {"shape": "circle", "color": "blue", "center": [35, 30], "size": 10, "bbox": [30, 25, 40, 35]}]})
    colour, shape = PatchLabels([scene, None], 4)([0, 1], "cpu")  # 4x4 grid of 10-px cells
    # red square covers cells (0,0) (0,1) (1,0) (1,1); the circle's bbox covers cell (3,3) by half
    # (rows 25..35 of cell rows 30..40) and (2,3) by half (rows 25..30 of 20..30): both >= 0.5
    expected_colour = np.zeros(16, np.int64)
    expected_colour[[0, 1, 4, 5]] = 1 + 0   # red is the first colour
    expected_colour[[11, 15]] = 1 + 2        # blue is the third
    assert colour[0].tolist() == expected_colour.tolist()
    assert shape[0][[0, 1, 4, 5]].tolist() == [2] * 4 and shape[0][[11, 15]].tolist() == [1, 1]  # square, circle
    assert colour[1].sum() == 0 and shape[1].sum() == 0  # no scene: background everywhere


def test_patch_label_loss_weighs_object_patches():
    """Weighted mean of the per-patch colour + shape cross-entropies, by hand."""
    import torch.nn.functional as F

    from shapes.patch_labels import CLASSES, patch_label_loss

    logits = torch.randn(4, CLASSES, generator=torch.Generator().manual_seed(0))
    colour, shape = torch.tensor([0, 2, 0, 5]), torch.tensor([0, 1, 0, 4])
    per = (F.cross_entropy(logits[:, :7], colour, reduction="none")
           + F.cross_entropy(logits[:, 7:], shape, reduction="none"))
    w = torch.tensor([1.0, 10.0, 1.0, 10.0])
    assert patch_label_loss(logits, colour, shape, 10.0) == pytest.approx(float((w * per).sum() / 22.0), rel=1e-6)
    assert patch_label_loss(logits, colour, shape) == pytest.approx(float(per.mean()), rel=1e-6)
