"""``runtime train fusion`` on the synthetic shapes sample with tiny presets: the loss goes down,
outputs and checkpoints are written, --resume ends where an uninterrupted run ends, the held-out
evaluation (fused and unfused tokens) is recorded, ``check_metrics`` is deterministic."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.fusion import load_fusion
from training.fusion import FusionTrainer, main
from training.fusion_eval import check_metrics, quick_metrics
from training.pairs import SceneFacts, Sample, draw_pairs, majority_answer, swap_candidates

pytestmark = pytest.mark.slow

COMMON = ["--num-images", "4", "--batch-size", "4", "--quiet", "--seed", "3"]
SMALL_DIFNET = ["--mode", "difnet", "--width", "32", "--heads", "4", "--T", "1", "--N", "2", "--dropout", "0.1"]


def _losses(folder) -> list[float]:
    with open(folder / "loss.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--mode", "concat_conv", "--steps", "24", "--lr", "3e-3",
                 "--checkpoint-every", "10", *COMMON]) == 0
    losses = _losses(out)
    assert len(losses) == 24
    assert np.mean(losses[-5:]) < np.mean(losses[:5])

    module, config = load_fusion(out / "fusion.safetensors", expected={"mode": "concat_conv", "blip_width": 64,
                                                                     "grid": 24, "sam_dim": 32})
    assert config.mode == "concat_conv"
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 24 and len(ckpt["log"]) == 24  # [steps, columns]
    assert set(ckpt) >= {"model", "optimizer", "rng", "step"}
    for key, value in module.state_dict().items():
        torch.testing.assert_close(ckpt["model"][key], value, atol=0, rtol=0)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "config.json").read_text())
    assert meta["fusion"]["mode"] == "concat_conv" and meta["steps_done"] == 24 and meta["finished"]
    assert meta["source"]["name"] == "shapes" and meta["source"]["images"] == 4
    assert not list(out.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["--out", str(full), "--steps", "8", "--checkpoint-every", "0", *SMALL_DIFNET, *COMMON]) == 0
    assert main(["--out", str(split), "--steps", "4", "--checkpoint-every", "2", *SMALL_DIFNET, *COMMON]) == 0
    assert torch.load(split / "checkpoint.pt", weights_only=True)["step"] == 4
    assert main(["--out", str(split), "--steps", "8", "--resume", *SMALL_DIFNET, *COMMON]) == 0

    a, b = load_file(str(full / "fusion.safetensors")), load_file(str(split / "fusion.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(full) == _losses(split)
    # the held-out evaluations (at 0, at 4 in the first part of the split run, at 8) did not
    # disturb the training; the resumed run records both invocations
    config = json.loads((split / "config.json").read_text())
    assert [(i["from_step"], i["to_step"]) for i in config["invocations"]] == [(0, 4), (4, 8)]
    assert config["command"] == config["invocations"][-1]["command"] and "--resume" in config["command"]
    metrics_full = json.loads((full / "metrics.json").read_text())
    metrics_split = json.loads((split / "metrics.json").read_text())
    assert [e["step"] for e in metrics_full["history"]] == [0, 8]
    assert [e["step"] for e in metrics_split["history"]] == [0, 4, 8]
    assert metrics_split["eval"] == metrics_full["eval"] and metrics_split["baseline"] == metrics_full["baseline"]
    ckpt_a = torch.load(full / "checkpoint.pt", weights_only=True)
    ckpt_b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert ckpt_a["step"] == ckpt_b["step"] == 8
    assert torch.equal(ckpt_a["rng"]["torch"], ckpt_b["rng"]["torch"])
    # trained weights moved away from the identity initialisation
    assert a["out_proj.weight"].abs().sum() > 0


METRICS = ("itm_accuracy", "positive_accuracy", "negative_accuracy", "positive_above_negative", "pointing_game",
           "swap_accuracy", "other_image_accuracy", "mean_match_prob_positive", "mean_match_prob_negative")


def _in_range(result: dict) -> None:
    for key in METRICS:
        assert result[key] is None or 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["itm_loss"] > 0 and result["pairs"] == 2 * (result["swap_pairs"] + result["other_image_pairs"])


def test_held_out_metrics_and_config_record_the_run(tmp_path):
    out = tmp_path / "run"
    args = ["--out", str(out), "--mode", "concat_conv", "--steps", "4", "--lr", "3e-3", "--eval-every", "2",
            "--eval-images", "3", "--device", "cpu", "--checkpoint-every", "0", *COMMON]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_done"] == 4 and metrics["finished"] and metrics["eval_seed"] == 1003
    assert [e["step"] for e in metrics["history"]] == [0, 2, 4]
    assert metrics["eval"] == metrics["history"][-1] and metrics["initial_eval"] == metrics["history"][0]
    for result in metrics["history"]:
        assert result["tokens"] == "fused" and result["block_num"] == 7
        _in_range(result)
        assert result["pointing_samples"] > 0  # shapes questions refer to objects with masks
    # the unfused BLIP tokens, once; an untrained fusion is the identity, so step 0 equals it
    baseline = metrics["baseline"]
    assert baseline["tokens"] == "unfused" and baseline["step"] == 0
    _in_range(baseline)
    for key in ("itm_accuracy", "swap_accuracy", "pointing_game", "positive_above_negative"):
        assert metrics["history"][0][key] == pytest.approx(baseline[key], abs=1e-6)
        assert metrics["gain"][key] == pytest.approx(metrics["eval"][key] - baseline[key])

    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "runtime train fusion " + " ".join(args)
    [invocation] = config["invocations"]
    assert invocation["command"] == config["command"] and (invocation["from_step"], invocation["to_step"]) == (0, 4)
    assert config["seeds"]["train"] == 3 and config["seeds"]["eval"] == 1003 and config["seeds"]["source"] == 3
    assert config["steps_done"] == 4 and config["finished"] and config["train_seconds"] > 0
    assert config["model"]["mode"] == "concat_conv" and config["model"]["parameters"] > 0
    assert config["model"]["blip"]["preset"] == "tiny" and config["model"]["sam"]["preset"] == "tiny"
    assert config["source"]["images"] == 4 and config["eval_source"]["images"] == 3
    assert config["eval_source"]["held_out"] and config["eval_source"]["params"]["seed"] == 1003
    assert config["device"] == "cpu" and config["torch_threads"] >= 1
    assert config["held_out_itm_accuracy"] == metrics["eval"]["itm_accuracy"]

    # the quick check: deterministic, the keys a bundle manifest records, the run's numbers
    first = quick_metrics(out / "fusion.safetensors", blip_preset="tiny", sam_preset="tiny", seed=1003, num_images=3)
    assert set(first) == {"itm_accuracy", "swap_accuracy", "pointing_game"}
    assert first == quick_metrics(out / "fusion.safetensors", blip_preset="tiny", sam_preset="tiny", seed=1003,
                                  num_images=3)
    # same images and pairs as the run's held-out set (default_rng(eval seed), swap fraction 0.5)
    for key, value in first.items():
        assert value == pytest.approx(metrics["eval"][key], abs=1e-6), key


def test_check_metrics_uses_the_shapes_models(tmp_path, monkeypatch):
    import models.blip
    import models.efficient_sam

    out = tmp_path / "run"
    assert main(["--out", str(out), "--mode", "cross_attention", "--width", "32", "--heads", "4", "--steps", "2",
                 "--eval-images", "0", *COMMON]) == 0
    assert not json.loads((out / "metrics.json").read_text())["history"]  # --eval-images 0: no evaluation
    asked = []
    real_itm, real_sam = models.blip.load_blip_itm, models.efficient_sam.load_efficient_sam

    def itm(preset, path=None, device="cpu"):
        asked.append(("itm", preset))
        return real_itm("tiny", path, device=device)

    def sam(preset, path=None, device="cpu"):
        asked.append(("sam", preset))
        return real_sam("tiny", path, device=device)

    monkeypatch.setattr(models.blip, "load_blip_itm", itm)
    monkeypatch.setattr(models.efficient_sam, "load_efficient_sam", sam)
    measured = check_metrics(out / "fusion.safetensors", num_images=4)
    assert sorted(asked) == [("itm", "shapes"), ("sam", "shapes")]
    assert measured == check_metrics(out / "fusion.safetensors", num_images=4)
    monkeypatch.undo()
    assert measured == quick_metrics(out / "fusion.safetensors", blip_preset="tiny", sam_preset="tiny", seed=7000,
                                     num_images=4)
    for key in ("itm_accuracy", "swap_accuracy", "pointing_game"):
        assert measured[key] is None or 0.0 <= measured[key] <= 1.0


def test_shapes_presets_are_accepted_and_missing_files_are_errors(tmp_path, monkeypatch, capsys):
    import models.weights

    args = FusionTrainer.parser().parse_args(["--out", "x", "--blip-preset", "shapes", "--sam-preset", "shapes"])
    assert (args.blip_preset, args.sam_preset) == ("shapes", "shapes")
    monkeypatch.setattr(models.weights, "SHAPES_WEIGHTS_DIR", tmp_path / "empty")
    assert main(["--out", str(tmp_path / "run"), "--blip-preset", "shapes", *COMMON]) == 2
    err = capsys.readouterr().err
    assert "blip_itm.safetensors" in err and "bin/train-shapes itm" in err


def test_resume_and_out_folder_guards(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--resume", "--steps", "2", *SMALL_DIFNET, *COMMON]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--out", str(out), "--steps", "1", *SMALL_DIFNET, *COMMON]) == 0
    assert main(["--out", str(out), "--steps", "2", *SMALL_DIFNET, *COMMON]) == 2
    assert "--resume" in capsys.readouterr().err
    changed = [a if a != "0.1" else "0.2" for a in SMALL_DIFNET]  # another dropout
    assert main(["--out", str(out), "--steps", "2", "--resume", *changed, *COMMON]) == 2
    assert "dropout" in capsys.readouterr().err


def test_bad_options_are_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "a"), "--mode", "difnet", "--Lf", "3", "--N", "3", *COMMON]) == 2
    assert "N > Lf" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "b"), "--source", "nope", *COMMON]) == 2
    assert "unknown source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "c"), "--mode", "bogus"])


# ---------------------------------------------------------------- pairs

SCENE = SceneFacts.from_json(json.dumps({"objects": [{"shape": "circle", "color": "red"},
                                                     {"shape": "square", "color": "green"}]}))


def test_swap_negatives_mention_something_absent():
    assert set(swap_candidates("what color is the circle?", SCENE)) == {
        "what color is the triangle?", "what color is the diamond?"}
    swaps = swap_candidates("is there a red circle?", SCENE)
    assert "is there a green circle?" in swaps and "is there a red square?" in swaps
    assert "is there a red circle?" not in swaps
    assert all("green square" not in q for q in swaps)  # (square, green) is in the scene
    assert "how many triangles are there?" in swap_candidates("how many circles are there?", SCENE)
    assert "what shape is the blue object?" in swap_candidates("what shape is the green object?", SCENE)
    assert "what shape is the red object?" not in swap_candidates("what shape is the green object?", SCENE)
    # about something absent, or no colour / shape word: no swap (an other-image negative is used)
    assert swap_candidates("is there a blue diamond?", SCENE) == []
    assert swap_candidates("what color is the leftmost shape?", SCENE) == []
    assert swap_candidates("what color is the circle?", None) == []


def test_pairs_are_deterministic_and_negatives_differ():
    samples = [Sample(image=i // 2, question=q, answer=a, scene=SCENE) for i, (q, a) in enumerate([
        ("what color is the circle?", "red"), ("how many squares are there?", "1"),
        ("what color is the square?", "green"), ("is there a blue diamond?", "no"),
        ("what shape is the red object?", "circle"), ("how many circles are there?", "1")])]
    a = draw_pairs(samples, 4, np.random.default_rng([0, 5]))
    b = draw_pairs(samples, 4, np.random.default_rng([0, 5]))
    assert a == b
    assert a.labels == [1] * 4 + [0] * 4 and a.images[:4] == a.images[4:]
    for k, kind in enumerate(a.kinds):
        pos, neg = a.questions[k], a.questions[4 + k]
        assert neg != pos
        if kind == "other_image":
            other = next(s for s in samples if s.question == neg)
            assert other.image != a.images[k]
    assert majority_answer(["Red", "red", "blue"]) == "red" and majority_answer(None) == ""
