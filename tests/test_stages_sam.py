"""EfficientSAM stages on the tiny preset, the esam_enhanced graph, and its reuse of a
previous pnp_vqa run's cached results."""

from __future__ import annotations


import numpy as np
import pyarrow.parquet as pq
import pytest

from artifacts.columns import column_to_python
from conftest import GRAPHS
from runtime.api import run_graph
from stages.base import Batch
from stages.sam import SamEmbed, SamMask

SMALL = ["dataset.num_images=2", "dataset.questions_per_image=2", "caption.num_captions=2"]


@pytest.fixture(scope="module")
def embedded():
    """Embeddings of two images of different sizes, and the stages."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), rng.integers(0, 255, (90, 50, 3), dtype=np.uint8)]
    embed = SamEmbed(SamEmbed.Params())
    embed.setup("cpu")
    out = embed.process(Batch({"image": images}, {"image": np.ones(2, bool)}, ["i0", "i1"]))
    mask = SamMask(SamMask.Params(mask_size=64, grid=8))
    mask.setup("cpu")
    return images, out["embedding"], mask


def mask_batch(embedding, points, labels, sizes, image_rows):
    cols = {"embedding": embedding, "points": np.asarray(points, np.float32), "labels": np.asarray(labels, np.int32),
            "image_size": np.asarray(sizes, np.int32)}
    return Batch(cols, {k: np.ones(len(v), bool) for k, v in cols.items()}, [f"r{i}" for i in range(len(points))],
                 np.asarray(image_rows))


def test_embedding_shape_matches_declared_type(embedded):
    _, embedding, stage = embedded
    declared = stage.inputs()["embedding"].spec
    assert embedding.shape[1:] == tuple(declared.shape) and embedding.dtype == np.float32


def test_batched_masks_equal_one_by_one_and_no_point_rows(embedded):
    images, embedding, stage = embedded
    points = [[[10, 20], [40, 30], [0, 0]], [[25, 70], [0, 0], [0, 0]], [[0, 0], [0, 0], [0, 0]]]
    labels = [[1, 1, -1], [1, -1, -1], [-1, -1, -1]]
    sizes = [[60, 80], [90, 50], [90, 50]]
    both = stage.process(mask_batch(embedding, points, labels, sizes, [0, 1, 1]))
    for i in range(3):
        alone = stage.process(mask_batch(embedding[[i if i < 2 else 1]], points[i:i + 1], labels[i:i + 1],
                                         sizes[i:i + 1], [0]))
        np.testing.assert_array_equal(both["mask"][i], alone["mask"][0])
        np.testing.assert_allclose(both["candidate_iou"][i], alone["candidate_iou"][0], rtol=1e-5, atol=1e-6)
    assert both["mask"].shape == (3, 64, 64) and both["mask_grid"].shape == (3, 8, 8)
    # a row without any point: empty mask, no IoU, no candidate
    assert both["mask"][2].sum() == 0 and both["iou"][2] is None and both["mask_index"][2] == -1
    # mask_grid is the area fraction of the kept mask
    np.testing.assert_allclose(both["mask_grid"][0], both["mask"][0].reshape(8, 8, 8, 8).mean(axis=(1, 3)), atol=1e-6)


def test_mask_selection(embedded):
    _, embedding, _ = embedded
    points, labels, sizes = [[[10, 20]]], [[1]], [[60, 80]]
    picks = {}
    for how in ("first", "best_iou"):
        stage = SamMask(SamMask.Params(mask_selection=how, mask_size=32, grid=8))
        stage.setup("cpu")
        picks[how] = stage.process(mask_batch(embedding[:1], points, labels, sizes, [0]))
    assert picks["first"]["mask_index"][0] == 0
    best = picks["best_iou"]
    assert best["mask_index"][0] == int(np.argmax(best["candidate_iou"][0]))
    assert best["iou"][0] == pytest.approx(float(best["candidate_iou"][0].max()))



def test_esam_enhanced_reuses_a_previous_pnp_vqa_run(tmp_path, calls):
    kw = dict(executor="local", cache_dir=tmp_path / "cache", progress=False, device="cpu")
    run_graph(GRAPHS / "pnp_vqa.yaml", overrides=SMALL, output=tmp_path / "pnp", **kw)
    assert calls["itm_gradcam"] == 1
    calls.clear()
    summary = run_graph(GRAPHS / "esam_enhanced.yaml", overrides=SMALL, output=tmp_path / "esam", **kw)
    assert calls["itm_gradcam"] == 0 and summary.nodes["gradcam"].cached_shards == summary.shards
    assert summary.nodes["heatmap_quality"].computed_shards == 0
    assert calls["sam_embed"] == 1 and calls["sam_mask"] == 1 and calls["caption"] == 1
    table = pq.read_table(tmp_path / "esam" / "results.parquet")
    for column in ("gradcam.heatmap", "enhance.heatmap", "points.points", "sam.mask", "caption.captions",
                   "answer.answer", "accuracy.accuracy", "enhance.status"):
        assert column in table.column_names, column
    assert summary.errors == 0
    raw, _ = column_to_python(table.column("gradcam.heatmap"))
    enhanced, _ = column_to_python(table.column("enhance.heatmap"))
    status = table.column("enhance.status").to_pylist()
    for r, e, s in zip(raw, enhanced, status):
        if s == "enhanced":
            assert e.min() >= 0 and e.max() == pytest.approx(1.0)
        else:
            np.testing.assert_array_equal(r, e)


@pytest.mark.slow
def test_esam_enhanced_runs_on_ray(tmp_path, ray_session):
    summary = run_graph(GRAPHS / "esam_enhanced.yaml", overrides=SMALL, executor="ray", output=tmp_path / "o",
                        cache_dir=tmp_path / "cache", progress=False, device="cpu")
    assert summary.samples == 4 and summary.errors == 0
    table = pq.read_table(tmp_path / "o" / "results.parquet")
    assert all(len(c) == 2 for c in table.column("caption.captions").to_pylist())
