"""Fusion graphs: untrained fusion changes nothing; trained weights are accepted and checked."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from artifacts.columns import column_to_python
from conftest import GRAPHS
from runtime.api import run_graph
from runtime.errors import GraphError
from runtime.graph import load_graph

pytestmark = pytest.mark.slow

SMALL = ["dataset.num_images=2", "dataset.questions_per_image=2", "caption.num_captions=2"]
TINY = ["tiny"]  # the graphs default to the shipped shapes presets; fusion files made here fit tiny


def run(tmp_path, graph, extra=(), out=None, presets=()):
    run_graph(GRAPHS / f"{graph}.yaml", overrides=[*SMALL, *extra], presets=list(presets), executor="local",
              output=tmp_path / (out or graph), cache_dir=tmp_path / "cache", progress=False, device="cpu")
    return pq.read_table(tmp_path / (out or graph) / "results.parquet").sort_by("sample_id")


def test_untrained_fusion_graphs_equal_the_plain_graph(tmp_path):
    # every mode is the identity at init (tests/test_models_fusion.py); here through whole graphs
    plain = run(tmp_path, "pnp_vqa")
    for graph, mode in (("fusion_caption", "difnet"), ("fusion_gradcam", "cross_attention")):
        fused = run(tmp_path, graph, [f"fusion.mode={mode}", "fusion.weights=null"], out=f"{graph}_{mode}")
        a, _ = column_to_python(plain.column("gradcam.heatmap"))
        b, _ = column_to_python(fused.column("gradcam.heatmap"))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-12)
        assert fused.column("caption.captions").to_pylist() == plain.column("caption.captions").to_pylist()
        assert fused.column("answer.answer").to_pylist() == plain.column("answer.answer").to_pylist()


def test_fusion_weights_are_checked_before_work(tmp_path):
    import torch

    from models.fusion.checkpoint import build_fusion, save_fusion
    from models.fusion.config import FusionConfig

    with pytest.raises(GraphError) as info:
        load_graph(GRAPHS / "fusion_caption.yaml", [f"fusion.weights={tmp_path / 'none.safetensors'}"], TINY)
    assert "fusion weights" in str(info.value) and "runtime train fusion" in str(info.value)
    # weights for another BLIP width are refused at validation, naming the field
    config = FusionConfig(mode="concat_conv", blip_width=32, sam_dim=32, grid=24, width=16, heads=2)
    save_fusion(build_fusion(config), config, tmp_path / "other.safetensors")
    with pytest.raises(GraphError) as info:
        load_graph(GRAPHS / "fusion_caption.yaml", [f"fusion.weights={tmp_path / 'other.safetensors'}",
                                                      "fusion.mode=concat_conv"], TINY)
    [problem] = info.value.problems
    assert problem.node == "fusion" and problem.field == "weights" and "blip_width" in problem.message
    # matching weights with a non-zero output projection change the captions' inputs
    from models.efficient_sam import EFFICIENT_SAM

    config = FusionConfig(mode="concat_conv", blip_width=64, sam_dim=EFFICIENT_SAM.config("tiny").embed_dim, grid=24,
                          width=16, heads=2)
    module = build_fusion(config)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05)
    save_fusion(module, config, tmp_path / "trained.safetensors")
    table = run(tmp_path, "fusion_caption", [f"fusion.weights={tmp_path / 'trained.safetensors'}", "fusion.mode=concat_conv"],
                out="trained",
                presets=TINY)
    assert table.num_rows == 4 and set(table.column("status").to_pylist()) == {"ok"}


def test_weights_from_the_training_command_run_in_fusion_caption(tmp_path):
    from training.fusion import main as train

    out = tmp_path / "train"
    assert train(["--out", str(out), "--mode", "concat_conv", "--steps", "3", "--batch-size", "2",
                  "--num-images", "2", "--checkpoint-every", "3", "--quiet"]) == 0
    weights = out / "fusion.safetensors"
    assert weights.exists() and (out / "loss.png").exists()
    table = run(tmp_path, "fusion_caption", [f"fusion.weights={weights}", "fusion.mode=concat_conv"], out="with_trained",
                presets=TINY)
    assert table.num_rows == 4 and set(table.column("status").to_pylist()) == {"ok"}


@pytest.mark.parametrize("graph", ["fusion_caption", "fusion_gradcam", "qavit"])
def test_new_graphs_run_on_ray(tmp_path, graph, ray_session):
    summary = run_graph(GRAPHS / f"{graph}.yaml", overrides=SMALL, executor="ray", output=tmp_path / "o",
                        cache_dir=tmp_path / "cache", progress=False, device="cpu")
    table = pq.read_table(tmp_path / "o" / "results.parquet")
    assert summary.samples == table.num_rows == 4 and summary.errors == 0
    assert all(isinstance(a, str) for a in table.column("answer.answer").to_pylist())


def _tiny_fusion_file(path, mode="concat_conv"):
    """A fusion file for the tiny BLIP (width 64, grid 24) and tiny SAM, its weights moved off
    the identity initialisation; returns the module."""
    import torch

    from models.efficient_sam import EFFICIENT_SAM
    from models.fusion.checkpoint import build_fusion, save_fusion
    from models.fusion.config import FusionConfig

    config = FusionConfig(mode=mode, blip_width=64, sam_dim=EFFICIENT_SAM.config("tiny").embed_dim, grid=24, width=16, heads=2)
    torch.manual_seed(1)
    module = build_fusion(config)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_fusion(module, config, path)
    return module.eval()


def test_shapes_weights_resolve_to_the_bundled_file_of_the_mode(tmp_path, monkeypatch):
    import torch

    import models.weights
    from models.fusion.checkpoint import fusion_fingerprint
    from stages.fusion import FeatureFusion, FeatureFusionParams

    bundled = tmp_path / "shapes"
    monkeypatch.setattr(models.weights, "SHAPES_WEIGHTS_DIR", bundled)
    module = _tiny_fusion_file(bundled / "fusion_concat_conv.safetensors")

    stage = FeatureFusion(FeatureFusionParams(mode="concat_conv", weights="shapes"))
    assert stage.problems() == []
    assert stage.binding_problems({"t": 577, "c": 64, "d": 32}) == []
    assert stage.weights_fingerprint() == fusion_fingerprint(bundled / "fusion_concat_conv.safetensors")
    assert stage.weights_fingerprint() != FeatureFusion(FeatureFusionParams(mode="concat_conv")).weights_fingerprint()
    stage.setup("cpu")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 577, 64)).astype(np.float32)
    embedding = rng.standard_normal((2, 32, 16, 16)).astype(np.float32)
    fused = stage.process({"features": features, "embedding": embedding})["features"]
    with torch.no_grad():
        expected = module(torch.from_numpy(features), torch.from_numpy(embedding)).numpy()
    np.testing.assert_allclose(fused, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(fused, features, atol=1e-3)  # the trained module, not the untrained identity

    # a graph names it the same way (validation passes before any work): the same file, and the
    # captioner reads the fused tokens
    graph = load_graph(GRAPHS / "fusion_caption.yaml", ["fusion.weights=shapes", "fusion.mode=concat_conv"], TINY)
    assert graph.nodes["fusion"].stage.weights_fingerprint() == stage.weights_fingerprint()
    assert graph.nodes["caption"].inputs["features"].node == "fusion"


def test_missing_shapes_weights_are_a_problem_on_the_weights_field(tmp_path, monkeypatch):
    import models.weights
    from stages.fusion import FeatureFusion, FeatureFusionParams

    bundled = tmp_path / "shapes"
    monkeypatch.setattr(models.weights, "SHAPES_WEIGHTS_DIR", bundled)
    _tiny_fusion_file(bundled / "fusion_concat_conv.safetensors")  # another mode's file is there

    [(field, message)] = FeatureFusion(FeatureFusionParams(mode="difnet", weights="shapes")).problems()
    assert field == "weights"
    assert str(bundled / "fusion_difnet.safetensors") in message and "bin/train-shapes fusion" in message
    with pytest.raises(GraphError) as info:
        load_graph(GRAPHS / "fusion_caption.yaml", ["fusion.weights=shapes", "fusion.mode=cross_attention"], TINY)
    [problem] = info.value.problems
    assert problem.node == "fusion" and problem.field == "params.weights"
    assert "fusion_cross_attention.safetensors" in problem.message and "bin/train-shapes fusion" in problem.message
