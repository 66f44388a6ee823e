"""heatmap_faithfulness: the curve logic on hand-computed cases with a stub scorer, ROAD's
imputation, and the stage with the tiny preset (shapes, batching, a graph run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.base import Batch
from stages.faithfulness import (
    MODES, ORDERS, HeatmapFaithfulness, centre_order, curve_auc, heatmap_order,
    fill_canvas, pixel_mask, random_order, road_impute, step_counts, visible_cells,
)

# g = 2: the heatmap ranks cells 0, 2, 3, 1; the "evidence" the stub model sees is cells 0 and 2
HEATMAP = np.array([[[0.9, 0.1], [0.5, 0.3]]], np.float32)
EVIDENCE = np.array([True, False, True, False])


def evidence_left(visible: np.ndarray) -> np.ndarray:
    """Stub model: the share of the evidence cells left visible."""
    return (visible & EVIDENCE).sum(axis=-1) / EVIDENCE.sum()


def faithfulness_curves(orders: np.ndarray, steps: int, mode: str, score=evidence_left) -> np.ndarray:
    """``[N, steps+1]``: the curve of ``mode`` scored by the stub (the stage scores the same
    visible cells with the model)."""
    return score(visible_cells(orders, steps, mode))


# --- pure functions -------------------------------------------------------------------------

def test_orders_and_ties_are_deterministic():
    np.testing.assert_array_equal(heatmap_order(HEATMAP), [[0, 2, 3, 1]])
    np.testing.assert_array_equal(heatmap_order(np.zeros((1, 2, 2))), [[0, 1, 2, 3]])  # ties: index order
    np.testing.assert_array_equal(centre_order(2), [0, 1, 2, 3])  # all four cells equally near
    np.testing.assert_array_equal(centre_order(3), [4, 1, 3, 5, 7, 0, 2, 6, 8])
    np.testing.assert_array_equal(random_order(np.random.default_rng(1), 9), random_order(np.random.default_rng(1), 9))


def test_steps_and_visible_cells():
    np.testing.assert_array_equal(step_counts(4, 4), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(step_counts(576, 8), np.arange(9) * 72)
    deletion = visible_cells(heatmap_order(HEATMAP), 2, "deletion")[0]
    np.testing.assert_array_equal(deletion, [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(visible_cells(heatmap_order(HEATMAP), 2, "insertion")[0], ~deletion)


def test_curves_and_areas_by_hand():
    perfect, centre = heatmap_order(HEATMAP), centre_order(2)[None]
    deletion = faithfulness_curves(perfect, 4, "deletion")
    insertion = faithfulness_curves(perfect, 4, "insertion")
    np.testing.assert_allclose(deletion, [[1, 0.5, 0, 0, 0]])
    np.testing.assert_allclose(insertion, [[0, 0.5, 1, 1, 1]])
    np.testing.assert_allclose(curve_auc(deletion), [0.25])   # (1/2 + 1/2) / 4
    np.testing.assert_allclose(curve_auc(insertion), [0.75])  # (1/2 + 1 + 1 + 1/2) / 4
    # centre prior 0, 1, 2, 3: the second evidence cell goes third
    np.testing.assert_allclose(curve_auc(faithfulness_curves(centre, 4, "deletion")), [0.375])
    np.testing.assert_allclose(curve_auc(faithfulness_curves(centre, 4, "insertion")), [0.625])


def test_perfect_heatmap_beats_random_orders():
    rng = np.random.default_rng(0)
    randoms = np.stack([random_order(rng, 4) for _ in range(200)])
    random_deletion = curve_auc(faithfulness_curves(randoms, 4, "deletion")).mean()
    random_insertion = curve_auc(faithfulness_curves(randoms, 4, "insertion")).mean()
    assert 0.25 < random_deletion and random_insertion < 0.75
    np.testing.assert_allclose(random_deletion + random_insertion, 1.0)  # complementary with this stub


def test_pixel_mask_maps_cells_to_blocks():
    visible = torch.tensor([[True, False, False, True]])
    expected = np.kron(np.array([[1, 0], [0, 1]]), np.ones((3, 3))).astype(bool)
    np.testing.assert_array_equal(pixel_mask(visible, 2, 6)[0].numpy(), expected)


def test_fills():
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    np.testing.assert_allclose(fill_canvas(pixels, "mean", 2)[1, 2].numpy(), np.full((4, 4), 87.5))
    assert not fill_canvas(pixels, "zero", 2).any()
    flat = torch.ones(1, 3, 8, 8)
    np.testing.assert_allclose(fill_canvas(flat, "blur", 2).numpy(), flat.numpy(), rtol=1e-6)  # blur keeps a flat image


def test_road_imputation_restores_a_linear_ramp():
    # a linear ramp satisfies "each pixel is the weighted mean of its neighbours" (symmetric
    # weights), so ROAD's exact solution of a hole inside it is the ramp itself; the Jacobi
    # iterations from the push-pull start approach it, and noise lands on the hole only
    ramp = (torch.arange(32.0)[None, :] + 0.5 * torch.arange(32.0)[:, None]).expand(1, 3, 32, 32) / 31
    removed = torch.zeros(1, 32, 32, dtype=torch.bool)
    removed[0, 6:26, 4:28] = True
    zero = torch.zeros_like(ramp)
    assert (road_impute(ramp, removed, zero, iterations=64) - ramp).abs().max() < 0.01
    imputed = road_impute(ramp, removed, zero, iterations=256)
    np.testing.assert_allclose(imputed.numpy(), ramp.numpy(), atol=1e-4)
    noisy = road_impute(ramp, removed, torch.ones_like(ramp), iterations=256) - imputed
    np.testing.assert_allclose(noisy[0, 0].numpy(), removed[0].float().numpy(), atol=1e-6)
    everything = torch.ones(1, 32, 32, dtype=torch.bool)
    assert not road_impute(ramp, everything, zero, iterations=4).any()  # nothing kept: the mean colour


# --- the stage (tiny preset) ----------------------------------------------------------------

QUESTIONS = ["What color is the circle?", "how many squares are there?", "Is there a red triangle?"]


def batch_of(rows: list[int], pixels: np.ndarray, heatmaps: np.ndarray, questions, row_ids) -> Batch:
    """Rows of images ``rows`` (per-image pixels of the distinct images, in first-use order)."""
    images = sorted(set(rows), key=rows.index)
    columns = {"pixels": pixels[images], "question": list(questions), "heatmap": heatmaps}
    validity = {k: np.ones(len(rows), bool) for k in columns}
    return Batch(columns, validity, list(row_ids), np.array([images.index(r) for r in rows]))


@pytest.fixture(scope="module")
def stage():
    stage = HeatmapFaithfulness(HeatmapFaithfulness.Params(steps=2, road_iterations=4, chunk=16))
    stage.setup("cpu")
    return stage


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 3, 384, 384)).astype(np.float32), rng.random((3, 24, 24)).astype(np.float32)


def test_stage_outputs_and_whole_image_encoded_once(stage, inputs, monkeypatch):
    pixels, heatmaps = inputs
    encoded = []
    original = stage.model.encode_image
    monkeypatch.setattr(stage.model, "encode_image", lambda x: encoded.append(len(x)) or original(x))
    out = stage.process(batch_of([0, 1, 0], pixels, heatmaps, QUESTIONS, ["a", "b", "c"]))
    assert set(out) == set(stage.outputs())
    for order in ("", "random_", "centre_"):
        for mode in MODES:
            assert out[f"{order}{mode}_auc"].shape == (3,) and out[f"{order}{mode}_auc"].dtype == np.float32
            assert out[f"{order}{mode}_curve"].shape == (3, 3)
    # whole image and full fill of the 2 images once; per row and order: deletion and
    # insertion step 1, ROAD steps 1 and 2 -> 3 rows * 3 orders * 4 built images
    assert encoded[0] == 4 and sum(encoded[1:]) == 3 * 3 * 4
    # step 0 of deletion / ROAD and the last step of insertion are the whole image: one score
    np.testing.assert_allclose(out["deletion_curve"][:, 0], out["insertion_curve"][:, -1], rtol=1e-6)
    np.testing.assert_allclose(out["road_curve"][:, 0], out["random_deletion_curve"][:, 0], rtol=1e-6)
    # the full fill is order-independent
    np.testing.assert_allclose(out["deletion_curve"][:, -1], out["centre_deletion_curve"][:, -1], rtol=1e-6)


def test_batching_gives_the_same_numbers_as_one_by_one(stage, inputs):
    pixels, heatmaps = inputs
    together = stage.process(batch_of([0, 1, 0], pixels, heatmaps, QUESTIONS, ["a", "b", "c"]))
    for i, (image, row_id) in enumerate(zip([0, 1, 0], ["a", "b", "c"])):
        alone = stage.process(batch_of([image], pixels, heatmaps[i:i + 1], QUESTIONS[i:i + 1], [row_id]))
        for name, value in alone.items():
            np.testing.assert_allclose(together[name][i], value[0], rtol=1e-4, atol=1e-5, err_msg=name)


def test_orders_of_the_stage(stage, inputs):
    pixels, heatmaps = inputs
    batch = batch_of([0, 1], pixels, heatmaps[:2], QUESTIONS[:2], ["a", "b"])
    orders = stage.orders(batch, 24)
    assert orders.shape == (2, len(ORDERS), 576)
    np.testing.assert_array_equal(orders[:, 0], heatmap_order(heatmaps[:2]))
    assert not np.array_equal(orders[0, 1], orders[1, 1])  # random order seeded per row
    np.testing.assert_array_equal(orders[0, 2], centre_order(24))


def test_graph_validates_and_runs_with_the_tiny_preset(tmp_path, write_graph):
    import pyarrow.parquet as pq

    from runtime.api import run_graph
    from runtime.graph import load_graph

    graphs = Path(__file__).resolve().parents[1] / "graphs"
    assert load_graph(graphs / "faithfulness.yaml").nodes["faithfulness"]
    graph = write_graph(f"""
        extends: {graphs / "faithfulness.yaml"}
        dataset: {{params: {{num_images: 2, questions_per_image: 1}}}}
        nodes:
          caption: null
          answer: null
          accuracy: null
          faithfulness: {{params: {{steps: 2, road_iterations: 4}}}}
        outputs: [gradcam.heatmap, faithfulness.deletion_auc, faithfulness.random_deletion_auc,
                  faithfulness.insertion_curve]
        """)
    summary = run_graph(graph, executor="local", output=tmp_path / "o", cache_dir=tmp_path / "c", presets=["tiny"],
                        device="cpu", progress=False)
    assert summary.samples == 2 and summary.errors == 0
    table = pq.read_table(tmp_path / "o" / "results.parquet").to_pylist()
    assert all(0 <= row["faithfulness.deletion_auc"] <= 1 and len(row["faithfulness.insertion_curve"]) == 3
               for row in table)
