"""``--random-weights``: the published sizes without their files, for timing only; marked and
refused where results matter."""

from __future__ import annotations

import pytest

from conftest import GRAPHS
from models.blip.config import TINY_TOKENIZER_DIR
from models.blip.family import BLIP_ITM
from models.efficient_sam import EFFICIENT_SAM
from models.fid_t5 import FID_T5, t5_config
from models.weights import RANDOM_WEIGHTS_ENV, WEIGHTS_ENV, WeightsError
from runtime.errors import GraphError
from runtime.graph import load_graph
from reports.quality import main as quality_main


@pytest.fixture
def no_weights_folder(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


def test_real_presets_need_files_unless_random(no_weights_folder, monkeypatch):
    with pytest.raises(WeightsError):
        BLIP_ITM.find("large")
    with pytest.raises(GraphError, match="model_large_retrieval_coco.pth"):
        load_graph(GRAPHS / "pnp_vqa.yaml", presets=["large"])
    monkeypatch.setenv(RANDOM_WEIGHTS_ENV, "1")
    graph = load_graph(GRAPHS / "esam_enhanced.yaml", presets=["large", "vitt"])  # no file needed, none read
    assert graph.nodes["gradcam"].stage.params.preset == "large"
    assert BLIP_ITM.find("large") is None and FID_T5.find("3b") is None
    assert EFFICIENT_SAM.find("vitt") is None
    # fingerprints of the seeded initialisation: stable, distinct per size, never a real file's
    assert BLIP_ITM.fingerprint("large") == BLIP_ITM.random_fingerprint("large")
    assert BLIP_ITM.fingerprint("large") != BLIP_ITM.fingerprint("base")
    assert FID_T5.fingerprint("large") != FID_T5.fingerprint("base") != FID_T5.fingerprint("tiny")
    assert EFFICIENT_SAM.fingerprint("vitt") == EFFICIENT_SAM.random_fingerprint("vitt")
    assert BLIP_ITM.tokenizer_dir("large") == TINY_TOKENIZER_DIR  # no real vocabulary needed


def test_random_sizes_are_the_published_ones():
    large = t5_config("large", 32128)
    assert (large.d_model, large.num_layers, large.num_heads, large.d_ff, large.feed_forward_proj) == \
        (1024, 24, 16, 4096, "relu")
    three = t5_config("3b", 32128)
    assert (three.d_kv * three.num_heads, three.d_ff) == (4096, 16384)
    cfg = BLIP_ITM.config("large")
    assert (cfg.vit.width, cfg.vit.depth, cfg.bert.hidden_size, cfg.bert.num_layers) == (1024, 24, 768, 12)


def test_quality_refuses_random_weights(monkeypatch, capsys):
    monkeypatch.setenv(RANDOM_WEIGHTS_ENV, "1")
    assert quality_main(["--images", "2"]) == 2
    assert "random weights" in capsys.readouterr().err
