"""``--random-weights``: the published sizes without their files, for timing only; marked and
refused where results matter."""

from __future__ import annotations

import pytest

from conftest import GRAPHS
from models.blip import files as blip_files
from models.efficient_sam import checkpoint as sam_checkpoint
from models.fid_t5 import builtin_config
from models.fid_t5_files import find_fid_t5
from models.fid_t5_files import weights_fingerprint as fid_fingerprint
from models.weights import RANDOM_WEIGHTS_ENV, WEIGHTS_ENV, WeightsError
from runtime.errors import GraphError
from runtime.graph import load_graph
from reports.quality import main as quality_main


@pytest.fixture
def no_weights_folder(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


def test_real_presets_need_files_unless_random(no_weights_folder, monkeypatch):
    with pytest.raises(WeightsError):
        blip_files.find_checkpoint("itm", "large")
    with pytest.raises(GraphError, match="model_large_retrieval_coco.pth"):
        load_graph(GRAPHS / "pnp_vqa.yaml", presets=["large"])
    monkeypatch.setenv(RANDOM_WEIGHTS_ENV, "1")
    graph = load_graph(GRAPHS / "esam_enhanced.yaml", presets=["large", "vitt"])  # no file needed, none read
    assert graph.nodes["gradcam"].stage.params.preset == "large"
    assert blip_files.find_checkpoint("itm", "large") is None and find_fid_t5("3b") is None
    assert sam_checkpoint.find_efficient_sam("vitt") is None
    # fingerprints of the seeded initialisation: stable, distinct per size, never a real file's
    assert blip_files.itm_fingerprint("large") == blip_files.random_init_fingerprint("itm", "large")
    assert blip_files.itm_fingerprint("large") != blip_files.itm_fingerprint("base")
    assert fid_fingerprint("large") != fid_fingerprint("base") != fid_fingerprint("tiny")
    assert sam_checkpoint.weights_fingerprint("vitt") == sam_checkpoint.random_init_fingerprint("vitt")
    assert blip_files.tokenizer_dir("large") == blip_files.TINY_TOKENIZER_DIR  # no real vocabulary needed


def test_random_sizes_are_the_published_ones():
    large = builtin_config("large", 32128)
    assert (large.d_model, large.num_layers, large.num_heads, large.d_ff, large.feed_forward_proj) == \
        (1024, 24, 16, 4096, "relu")
    three = builtin_config("3b", 32128)
    assert (three.d_kv * three.num_heads, three.d_ff) == (4096, 16384)
    cfg = blip_files.itm_config("large")
    assert (cfg.vit.width, cfg.vit.depth, cfg.bert.hidden_size, cfg.bert.num_layers) == (1024, 24, 768, 12)


def test_quality_refuses_random_weights(monkeypatch, capsys):
    monkeypatch.setenv(RANDOM_WEIGHTS_ENV, "1")
    assert quality_main(["--images", "1"]) == 2
    assert "random weights" in capsys.readouterr().err
