"""The shipped ``shapes`` preset weights: manifests match the files, and the files still give
the held-out metrics their manifests record (the quick checks of ``runtime train bundle``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.weights import SHAPES_WEIGHTS_DIR
from training.bundle import SHIPPED, manifest_path, sha256_file

pytestmark = pytest.mark.slow

MANIFESTS = sorted(SHAPES_WEIGHTS_DIR.glob("*.manifest.json"))
SIZE_LIMIT = 30 * 1024 * 1024
TOLERANCE = 0.02


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_weights_file_has_a_manifest_and_the_total_is_small():
    files = sorted(SHAPES_WEIGHTS_DIR.glob("*.safetensors"))
    assert files, f"no shapes weights in {SHAPES_WEIGHTS_DIR}"
    for f in files:
        assert f.stem in SHIPPED, f"{f.name} is not a known shipped model"
        assert manifest_path(f).is_file(), f"{f.name} has no manifest"
    assert sum(f.stat().st_size for f in files) < SIZE_LIMIT


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_matches_its_file(path):
    m = _manifest(path)
    weights = path.with_name(m["file"])
    assert weights.is_file()
    assert weights.stat().st_size == m["bytes"]
    assert sha256_file(weights) == m["sha256"], f"{weights.name} changed since it was bundled: re-bundle it"
    assert m["command"].startswith("runtime train "), m["command"]
    assert m["steps"] > 0 and m["train_seconds"] > 0 and m["seeds"]
    assert m["held_out_metrics"], "the training run's held-out metrics are missing"


# What a shipped preset must be worth on its quick check, whatever its manifest says (docs/training.md):
# a retrained file that reproduces its own weaker numbers still fails here.
FLOORS = {
    "blip_itm": {"itm_accuracy": 0.9, "swap_accuracy": 0.9, "pointing_game": 0.9},
    "blip_caption": {"object_precision": 0.8, "object_recall": 0.7},
    "efficient_sam": {"miou_1pt": 0.9, "miou_3pt": 0.9},
    "fid_t5": {"vqa_accuracy": 0.85},
    "qavit": {"answer_accuracy": 0.75, "pointing_game": 0.7},
    "fusion_concat_conv": {"itm_accuracy": 0.9, "pointing_game": 0.9},
    "fusion_cross_attention": {"itm_accuracy": 0.9, "pointing_game": 0.9},
    "fusion_difnet": {"itm_accuracy": 0.9, "pointing_game": 0.9},
}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_shipped_weights_reproduce_their_check_metrics(path):
    m = _manifest(path)
    name = m["file"].removesuffix(".safetensors")
    recorded = m["check"]["metrics"]
    measured = SHIPPED[name].check(path.with_name(m["file"]))
    assert set(measured) == set(recorded)
    for key, value in recorded.items():
        if value is None:
            assert measured[key] is None, key
        else:
            assert measured[key] == pytest.approx(value, abs=TOLERANCE), key
    for key, floor in FLOORS[name].items():
        assert measured[key] >= floor, f"{name}: {key} {measured[key]:.3f} is below the floor {floor}"
