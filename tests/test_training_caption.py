"""``runtime train caption``: the target caption of a patch subset, and a short tiny run (outputs,
falling loss, loadable weights, --resume bit-identical to an uninterrupted run)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shapes.captions import caption_for_patches, mentioned_objects
from training.caption import main

pytestmark = pytest.mark.slow

# 40 px scene on a 4 x 4 grid: patch (r, c) = index 4 r + c spans pixels [10 c, 10 c + 10) x [10 r, 10 r + 10)
SCENE = {
    "image_size": 40,
    "background": "plain",
    "objects": [  # listed right-to-left: the caption must order them left to right
        {"shape": "square", "color": "blue", "center": [25, 25], "size": 10, "bbox": [18, 20, 30, 30]},
        {"shape": "circle", "color": "red", "center": [5, 5], "size": 10, "bbox": [0, 0, 10, 10]},
    ],
}


def test_caption_for_patches_on_a_hand_made_scene():
    assert caption_for_patches(SCENE, [0, 3], 4) == "a picture of a red circle"
    assert caption_for_patches(SCENE, [10], 4) == "a picture of a blue square"
    both = "a picture of a red circle and a blue square"
    assert caption_for_patches(SCENE, [10, 0], 4) == both
    assert caption_for_patches(json.dumps(SCENE), [0, 10, 15], 4, 40) == both  # JSON, explicit size
    assert caption_for_patches(SCENE, [3, 12, 15], 4) == "a picture of a plain background"
    assert caption_for_patches({**SCENE, "background": "stripes"}, [], 4) == "a picture of a textured background"
    # the square's bbox covers two pixel columns (20 %) of patch 9
    assert caption_for_patches(SCENE, [9], 4) == "a picture of a blue square"
    assert caption_for_patches(SCENE, [9], 4, min_overlap=0.5) == "a picture of a plain background"
    # masks take precedence over the bboxes: a mask covering only patch 5 (x, y in [10, 20))
    masks = [np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)]
    masks[0][12:18, 12:18] = 1
    masks[1][0:10, 0:10] = 1
    assert caption_for_patches(SCENE, [5, 10], 4, masks=masks) == "a picture of a blue square"
    orange = {**SCENE, "objects": [{**SCENE["objects"][1], "color": "orange"}]}
    assert caption_for_patches(orange, [0], 4) == "a picture of an orange circle"
    assert mentioned_objects("a red circle and an orange square") == [("red", "circle"), ("orange", "square")]
    with pytest.raises(ValueError):
        caption_for_patches(SCENE, [16], 4)


COMMON = ["--num-images", "3", "--batch-size", "6", "--lr", "3e-3", "--quiet", "--seed", "2",
          "--eval-images", "1", "--eval-subsets", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models run fastest so, and shared CPUs do not stall the run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _losses(folder) -> list[float]:
    with open(folder / "loss.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_short_run_writes_outputs_lowers_loss_and_resumes_bit_identically(tmp_path):
    from models.blip.checkpoint import load_blip_caption

    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["--out", str(full), "--steps", "6", "--checkpoint-every", "0", *COMMON]) == 0
    for name in ("caption.safetensors", "checkpoint.pt", "loss.csv", "loss.png", "config.json", "metrics.json"):
        assert (full / name).is_file(), name
    assert not list(full.glob(".*tmp*"))
    losses = _losses(full)
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert (full / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, report = load_blip_caption("tiny", full / "caption.safetensors")
    ckpt = torch.load(full / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 6
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value), key
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["steps_done"] == 6 and metrics["finished"]
    assert metrics["eval"]["step"] == 6 and metrics["eval"]["subsets"] == 2
    assert 0.0 <= metrics["eval"]["exact_match"] <= 1.0
    assert metrics["initial_eval"]["step"] == 0
    config = json.loads((full / "config.json").read_text())
    assert config["steps_done"] == 6 and config["source"]["images"] == 3

    assert main(["--out", str(split), "--steps", "3", "--checkpoint-every", "0", *COMMON]) == 0
    assert main(["--out", str(split), "--steps", "3", *COMMON]) == 2  # existing checkpoint, no --resume
    assert main(["--out", str(split), "--steps", "6", "--resume", *COMMON[:-2], "--lr", "1e-3"]) == 2
    assert main(["--out", str(split), "--steps", "6", "--resume", *COMMON]) == 0
    a, b = load_file(str(full / "caption.safetensors")), load_file(str(split / "caption.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(full) == _losses(split)


def test_vision_from_another_checkpoint_frozen(tmp_path):
    from safetensors.torch import load_file

    from training.itm import main as train_itm

    itm = tmp_path / "itm"
    assert train_itm(["--out", str(itm), "--steps", "1", "--num-images", "2", "--batch-size", "2", "--lr", "1e-2",
                      "--eval-images", "0", "--quiet"]) == 0
    out = tmp_path / "cap"
    assert main(["--out", str(out), "--steps", "2", "--checkpoint-every", "0", "--vision-from",
                 str(itm / "itm.safetensors"), "--freeze-vision", "--subsets-per-image", "2", *COMMON]) == 0
    theirs, ours = load_file(str(itm / "itm.safetensors")), load_file(str(out / "caption.safetensors"))
    vision = [k for k in ours if k.startswith("visual_encoder.")]
    assert vision and all(torch.equal(ours[k], theirs[k]) for k in vision)  # copied, and not trained
    from models.blip.checkpoint import build_model

    initial = build_model("caption", "tiny", empty=False).state_dict()
    assert not all(torch.equal(ours[k], initial[k]) for k in ours if k.startswith("text_decoder."))  # trained
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["freeze_vision"] and meta["model"]["vision_fingerprint"]


def test_patch_probe_resumes_bit_identically_and_cosine_fixes_steps(tmp_path):
    """The probe (weights and optimiser state) travels in the checkpoint; the logged loss is the
    caption loss alone; a cosine run may not change --steps on resume."""
    probe = ["--patch-label-weight", "1", "--patch-object-weight", "10"]
    full, split, plain = tmp_path / "full", tmp_path / "split", tmp_path / "plain"
    assert main(["--out", str(full), "--steps", "4", "--checkpoint-every", "0", *probe, *COMMON]) == 0
    assert main(["--out", str(split), "--steps", "2", "--checkpoint-every", "0", *probe, *COMMON]) == 0
    ckpt = torch.load(split / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(ckpt["probe"]) == {"weight", "bias"}
    assert main(["--out", str(split), "--steps", "4", "--resume", *COMMON]) == 2  # the probe is part of the run
    assert main(["--out", str(split), "--steps", "4", "--resume", *probe, *COMMON]) == 0
    a, b = load_file(str(full / "caption.safetensors")), load_file(str(split / "caption.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(full) == _losses(split)
    assert main(["--out", str(plain), "--steps", "1", "--checkpoint-every", "0", *COMMON]) == 0
    assert _losses(plain)[0] == pytest.approx(_losses(full)[0], abs=1e-6)  # same first batch, same caption loss

    cosine = tmp_path / "cosine"
    assert main(["--out", str(cosine), "--steps", "2", "--lr-decay", "cosine", *COMMON]) == 0
    assert main(["--out", str(cosine), "--steps", "3", "--lr-decay", "cosine", "--resume", *COMMON]) == 2
    assert main(["--out", str(tmp_path / "bad"), "--patch-label-weight", "1", "--freeze-vision", *COMMON]) == 2
