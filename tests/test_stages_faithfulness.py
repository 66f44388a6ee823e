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

ROAD_WEIGHTS = np.array([[1, 2, 1], [2, 0, 2], [1, 2, 1]]) / 12

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


def exact_road(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's system solved exactly (scipy's sparse LU), one channel ``[s, s]``: each removed
    pixel is the weighted mean of its neighbours inside the image."""
    from scipy.sparse import lil_matrix
    from scipy.sparse.linalg import spsolve

    size = image.shape[0]
    unknown = np.argwhere(removed)
    number = {tuple(ij): n for n, ij in enumerate(unknown)}
    a, b = lil_matrix((len(unknown), len(unknown))), np.zeros(len(unknown))
    for n, (i, j) in enumerate(unknown):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                y, x, w = i + di, j + dj, ROAD_WEIGHTS[di + 1, dj + 1]
                if w == 0 or not (0 <= y < size and 0 <= x < size):
                    continue
                a[n, n] += w
                if removed[y, x]:
                    a[n, number[y, x]] -= w
                else:
                    b[n] += w * image[y, x]
    out = image.copy()
    out[removed] = spsolve(a.tocsc(), b)
    return out


def test_road_imputation_of_one_pixel_is_the_weighted_neighbour_mean():
    image = torch.arange(25.0).reshape(1, 1, 5, 5).expand(1, 3, 5, 5) ** 1.5
    removed = torch.zeros(1, 5, 5, dtype=torch.bool)
    removed[0, 2, 2] = removed[0, 0, 4] = True   # an inner pixel and a corner
    out = road_impute(image, removed, torch.zeros_like(image), iterations=8)[0, 0].numpy()
    x = image[0, 0].numpy()
    inner = (ROAD_WEIGHTS * x[1:4, 1:4]).sum()   # all 8 neighbours: weights sum to 1
    corner = (2 * x[0, 3] + 2 * x[1, 4] + x[1, 3]) / 5   # 3 neighbours inside: 1/6, 1/6, 1/12
    np.testing.assert_allclose([out[2, 2], out[0, 4]], [inner, corner], rtol=1e-5)
    np.testing.assert_array_equal(np.delete(out.ravel(), [12, 4]), np.delete(x.ravel(), [12, 4]))


def test_road_imputation_matches_the_exact_sparse_solution():
    # a random mask of blocks on a smooth image, 48 px: the coarse-to-fine CG at the stage's
    # default 16 iterations per level is within 2 % of the image's range of scipy's exact
    # solution, and at 64 iterations within 1e-4
    rng = np.random.default_rng(3)
    size = 48
    image = torch.from_numpy(rng.standard_normal((1, 3, size, size)).astype(np.float32))
    image = torch.nn.functional.avg_pool2d(image, 5, 1, 2, count_include_pad=False)
    removed = torch.from_numpy(np.kron(rng.random((12, 12)) < 0.5, np.ones((4, 4))).astype(bool))[None]
    exact = np.stack([exact_road(image[0, c].double().numpy(), removed[0].numpy()) for c in range(3)])
    scale = float(image.max() - image.min())
    for iterations, tolerance in ((16, 0.02), (64, 1e-4)):
        ours = road_impute(image, removed, torch.zeros_like(image), iterations)[0].numpy()
        assert np.abs(ours - exact).max() < tolerance * scale, iterations


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
    # steps = 2; per image: whole image, full fill, ROAD with everything removed, and the random
    # and centre orders' step 1 of deletion, insertion and ROAD (3 + 6); per row: the heatmap
    # order's step 1 of each mode (3) -> 2 images * 9 + 3 rows * 3
    assert sum(encoded) == 2 * 9 + 3 * 3 and max(encoded) <= 16
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
    assert not np.array_equal(orders[0, 1], orders[1, 1])  # random order seeded per image
    same = stage.orders(batch_of([1, 1], pixels, heatmaps[:2], QUESTIONS[:2], ["x", "y"]), 24)
    np.testing.assert_array_equal(same[0, 1], same[1, 1])
    np.testing.assert_array_equal(same[0, 1], orders[1, 1])
    np.testing.assert_array_equal(orders[0, 2], centre_order(24))


def test_graph_validates_and_runs_with_the_tiny_preset(tmp_path, write_graph):
    import pyarrow.parquet as pq

    from runtime.api import run_graph
    from runtime.graph import load_graph

    graphs = Path(__file__).resolve().parents[1] / "graphs"
    shipped = load_graph(graphs / "faithfulness.yaml").nodes
    assert {"faithfulness_gradcam", "faithfulness_enhance"} <= set(shipped)
    graph = write_graph(f"""
        extends: {graphs / "pnp_vqa.yaml"}
        overlays: [{graphs / "overlays" / "faithfulness.yaml"}]
        dataset: {{params: {{num_images: 2, questions_per_image: 1}}}}
        nodes:
          caption: null
          answer: null
          accuracy: null
        outputs: [gradcam.heatmap]
        """)  # the overlay adds its nodes' outputs
    summary = run_graph(graph, executor="local", output=tmp_path / "o", cache_dir=tmp_path / "c", presets=["tiny"],
                        overrides=["faithfulness.steps=2", "faithfulness.road_iterations=4"], device="cpu",
                        progress=False)
    assert summary.samples == 2 and summary.errors == 0
    table = pq.read_table(tmp_path / "o" / "results.parquet").to_pylist()
    assert all(0 <= row["faithfulness_gradcam.deletion_auc"] <= 1
               and len(row["faithfulness_gradcam.insertion_curve"]) == 3 for row in table)


def test_batch_splits_give_the_same_numbers(stage, inputs):
    pixels, heatmaps = inputs
    images, ids = [0, 1, 0], ["a", "b", "c"]
    together = stage.process(batch_of(images, pixels, heatmaps, QUESTIONS, ids))
    first = stage.process(batch_of(images[:2], pixels, heatmaps[:2], QUESTIONS[:2], ids[:2]))
    second = stage.process(batch_of(images[2:], pixels, heatmaps[2:], QUESTIONS[2:], ids[2:]))
    for name in together:
        np.testing.assert_allclose(together[name], np.concatenate([first[name], second[name]]),
                                   rtol=1e-4, atol=1e-5, err_msg=name)


def test_questions_of_an_image_share_its_baseline_images(stage, inputs, monkeypatch):
    pixels, heatmaps = inputs
    encoded = []
    original = stage.model.encode_image
    monkeypatch.setattr(stage.model, "encode_image", lambda x: encoded.append(len(x)) or original(x))
    questions = 4
    out = stage.process(batch_of([0] * questions, pixels, np.repeat(heatmaps[:1], questions, axis=0)
                                , QUESTIONS + ["Any circles?"],
                                 list("abcd")))
    # one image: 9 encodes of its own; the 4 rows share one heatmap, so its 3 images too
    assert sum(encoded) == 9 + 3
    for mode in MODES:  # the baselines' curves differ by question only through the ITM text
        assert out[f"random_{mode}_curve"].shape == (questions, 3)
    encoded.clear()
    stage.process(batch_of([0] * questions, pixels, np.stack([heatmaps[0], heatmaps[1], heatmaps[2], heatmaps[0].T]),
                           QUESTIONS + ["Any circles?"], list("abcd")))
    assert sum(encoded) == 9 + questions * 3   # per image 3 + 6 (steps - 1), per row 3 (steps - 1)
