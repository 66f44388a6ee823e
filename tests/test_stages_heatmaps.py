"""Heatmap stages and grid helpers on hand-computed cases."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from stages.base import Batch
from grids import cell_weights, gaussian_blur, minmax, pool_to_grid
from stages.heatmaps import (
    HeatmapEnhance, HeatmapMetrics, HeatmapPoints, MaskHeatmap, SamplePatches,
)


def make_batch(row_ids=None, valid=None, **columns) -> Batch:
    n = len(next(iter(columns.values())))
    validity = {k: np.ones(n, bool) for k in columns}
    validity.update({k: np.asarray(v, bool) for k, v in (valid or {}).items()})
    return Batch(columns=columns, validity=validity, row_ids=row_ids or [f"r{i}" for i in range(n)])


def run(cls, batch: Batch, **params):
    return cls(cls.Params(**params)).process(batch)


# --- grid helpers ---------------------------------------------------------------------------

def test_area_pooling_4x4_to_2x2():
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, :2, :2] = 1
    mask[0, 3, 3] = 255  # any nonzero counts as on
    np.testing.assert_allclose(pool_to_grid(mask, 2)[0], [[1, 0], [0, 0.25]])


def test_area_pooling_with_fractional_overlaps():
    # 5 pixels over 2 cells: cell 0 covers pixels 0, 1 and half of 2.
    np.testing.assert_allclose(cell_weights(5, 2), [[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]])
    masks = np.zeros((3, 5, 5), np.uint8)
    masks[0, 2, 2] = 1
    masks[1, :3, :3] = 1
    masks[2] = 1
    out = pool_to_grid(masks, 2)
    np.testing.assert_allclose(out[0], np.full((2, 2), 0.04), atol=1e-7)
    np.testing.assert_allclose(out[1], [[1, 0.2], [0.2, 0.04]], atol=1e-7)
    np.testing.assert_allclose(out[2], np.ones((2, 2)), atol=1e-7)


def test_area_pooling_non_square_and_upsampling():
    mask = np.zeros((1, 3, 6), np.uint8)
    mask[0, 0] = 1
    np.testing.assert_allclose(pool_to_grid(mask, 2)[0], [[2 / 3, 2 / 3], [0, 0]], atol=1e-7)
    # A grid finer than the mask: each cell lies inside one pixel.
    np.testing.assert_allclose(pool_to_grid(np.eye(2, dtype=np.uint8)[None], 4)[0],
                               np.kron(np.eye(2), np.ones((2, 2))), atol=1e-7)


def test_area_pooling_preserves_mean():
    masks = (np.random.default_rng(0).random((4, 37, 53)) > 0.7).astype(np.uint8)
    out = pool_to_grid(masks, 24)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), masks.mean(axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize("g", [1, 2, 5, 24])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.7, 3.0])
def test_blur_matches_cv2(g, sigma):
    maps = np.random.default_rng(g).random((3, g, g)).astype(np.float32)
    k = 2 * math.ceil(3 * sigma) + 1
    out = gaussian_blur(maps, sigma)
    for m, o in zip(maps, out):
        np.testing.assert_allclose(o, cv2.GaussianBlur(m, (k, k), sigma, borderType=cv2.BORDER_CONSTANT), atol=1e-5)


def test_blur_zero_sigma_and_minmax():
    m = np.array([[[1.0, 2.0], [3.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    np.testing.assert_array_equal(gaussian_blur(m, 0), m)
    np.testing.assert_allclose(minmax(m), [[[0, 0.25], [0.5, 1]], np.zeros((2, 2))])


# --- mask_heatmap ---------------------------------------------------------------------------

def test_mask_heatmap():
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, :2, :2] = 1
    masks[0, 3, 3] = 1
    batch = make_batch(mask=masks, valid={"mask": [True, False]})
    out = run(MaskHeatmap, batch, grid=2, sigma=0)["heatmap"]
    assert out.dtype == np.float32 and out.shape == (2, 2, 2)
    np.testing.assert_allclose(out[0], [[1, 0], [0, 0.25]])
    np.testing.assert_array_equal(out[1], np.ones((2, 2)))  # no mask: flat map by default
    assert batch.failures == {}
    batch = make_batch(mask=masks, valid={"mask": [True, False]})
    run(MaskHeatmap, batch, grid=2, sigma=0, if_missing="fail")
    assert batch.failures == {1: "no ground-truth mask"}
    blurred = run(MaskHeatmap, make_batch(mask=masks[:1]), grid=2, sigma=1.0)["heatmap"][0]
    assert blurred.min() == 0 and blurred.max() == 1 and blurred[0, 0] == 1
    stage = MaskHeatmap(MaskHeatmap.Params(grid=16))
    assert stage.outputs()["heatmap"].spec.shape == [16, 16]


# --- heatmap_points -------------------------------------------------------------------------

def peaks_map() -> np.ndarray:
    h = np.zeros((8, 8), np.float32)
    h[1, 1], h[1, 2], h[6, 6], h[6, 1] = 1.0, 0.8, 0.6, 0.3
    return h


def points(heatmaps, sizes, **params):
    params.setdefault("sigma", 0)
    batch = make_batch(heatmap=np.asarray(heatmaps, np.float32),
                       image_size=np.asarray(sizes, np.int32))
    return run(HeatmapPoints, batch, **params)


def test_peaks_in_order_with_suppression_and_pixel_centres():
    out = points([peaks_map()], [[100, 200]], num_points=5, suppression_radius=2)
    # (1, 2) lies within 2 cells of (1, 1): suppressed. Cell (i, j) -> x = (j + .5) * W / g.
    np.testing.assert_allclose(out["points"][0], [[37.5, 18.75], [162.5, 81.25], [37.5, 81.25],
                                                  [0, 0], [0, 0]])
    assert out["labels"][0].tolist() == [1, 1, 1, -1, -1]
    np.testing.assert_allclose(out["scores"][0], [1.0, 0.6, 0.3, 0, 0], rtol=1e-6)
    assert out["num_points"].tolist() == [3]
    assert out["points"].dtype == np.float32 and out["labels"].dtype == np.int32


def test_suppression_radius_zero_takes_neighbours():
    out = points([peaks_map()], [[8, 8]], num_points=2, suppression_radius=0)
    np.testing.assert_allclose(out["points"][0], [[1.5, 1.5], [2.5, 1.5]])


def test_min_score_drops_low_peaks():
    out = points([peaks_map()], [[8, 8]], num_points=5, min_score=0.5)
    assert out["labels"][0].tolist() == [1, 1, -1, -1, -1] and out["num_points"].tolist() == [2]


def test_negative_points_at_lowest_cells():
    h = (15 - np.arange(16, dtype=np.float32)).reshape(4, 4)  # highest (0, 0), lowest (3, 3)
    out = points([h], [[4, 4]], num_points=1, num_negative_points=2, suppression_radius=0)
    assert out["labels"][0].tolist() == [1, 0, 0]
    np.testing.assert_allclose(out["points"][0], [[0.5, 0.5], [3.5, 3.5], [2.5, 3.5]])
    np.testing.assert_allclose(out["scores"][0], [1, 0, 1 / 15], rtol=1e-6)
    # With radius 1 the neighbours of (3, 3) are skipped; the next lowest is (3, 1).
    out = points([h], [[4, 4]], num_points=1, num_negative_points=2, suppression_radius=1)
    np.testing.assert_allclose(out["points"][0], [[0.5, 0.5], [3.5, 3.5], [1.5, 3.5]])
    assert out["num_points"].tolist() == [1]


def test_flat_maps_give_no_points():
    maps = [np.zeros((4, 4)), np.full((4, 4), 0.5), -np.ones((4, 4))]
    out = points(maps, [[4, 4]] * 3, num_points=2, num_negative_points=1, sigma=1.0)
    assert out["num_points"].tolist() == [0, 0, 0]
    assert (out["labels"] == -1).all() and (out["points"] == 0).all() and (out["scores"] == 0).all()


def test_points_on_blurred_map_and_batch_independence():
    single = np.zeros((6, 6), np.float32)
    single[2, 3] = 1e-7  # GradCAM-sized values
    both = points([peaks_map()[:6, :6], single], [[60, 30], [60, 30]], num_points=2, sigma=1.0)
    alone = points([single], [[60, 30]], num_points=2, sigma=1.0)
    for key in ("points", "labels", "scores", "num_points"):
        np.testing.assert_array_equal(both[key][1], alone[key][0])
    np.testing.assert_allclose(alone["points"][0, 0], [17.5, 25.0])
    assert alone["scores"][0, 0] == 1.0
    # The blur spreads the lone peak, so a second point exists outside the suppressed square.
    assert alone["num_points"].tolist() == [2] and alone["scores"][0, 1] < 0.1


def test_blur_border_keeps_a_peak_beside_the_edge_in_place():
    # With a reflecting border the corner cell (5, 0) would get 4 k1^2 > k0^2 and win; zero
    # padding keeps the point on the peak's own cell (4, 1).
    h = np.zeros((6, 6), np.float32)
    h[4, 1] = 1.0
    out = points([h], [[6, 6]], num_points=1, sigma=1.0)
    np.testing.assert_allclose(out["points"][0, 0], [1.5, 4.5])


def test_points_params():
    with pytest.raises(ValidationError):
        HeatmapPoints.Params(num_points=0, num_negative_points=0)
    with pytest.raises(ValidationError):
        HeatmapPoints.Params(num_points=17)
    stage = HeatmapPoints(HeatmapPoints.Params(num_points=3, num_negative_points=2))
    assert stage.outputs()["points"].spec.shape == [5, 2]


# --- heatmap_enhance ------------------------------------------------------------------------

def enhance_case():
    heatmap = np.array([[[0.2, 0.6], [1.0, 0.2]]], np.float32)
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, :2, :2] = 1
    mask[0, 0, 2] = 1
    return heatmap, mask  # minmax(heatmap) = [[0, .5], [1, 0]], mask_frac = [[1, .25], [0, 0]]


def test_enhance_blend_and_renormalise():
    heatmap, mask = enhance_case()
    batch = make_batch(heatmap=heatmap, mask=mask, num_points=np.array([3], np.int32))
    out = run(HeatmapEnhance, batch)
    # 0.5 * [[0, .5], [1, 0]] + 0.5 * [[1, .25], [0, 0]] = [[.5, .375], [.5, 0]] -> / 0.5
    np.testing.assert_allclose(out["heatmap"][0], [[1, 0.75], [1, 0]], atol=1e-7)
    np.testing.assert_allclose(out["mask_grid"][0], [[1, 0.25], [0, 0]])
    assert out["status"] == ["enhanced"]
    out = run(HeatmapEnhance, make_batch(heatmap=heatmap, mask=mask), alpha=0.25)
    # 0.25 * [[0, .5], [1, 0]] + 0.75 * [[1, .25], [0, 0]] = [[.75, .3125], [.25, 0]]
    np.testing.assert_allclose(out["heatmap"][0], [[1, 0.3125 / 0.75], [0.25 / 0.75, 0]], atol=1e-7)


def test_enhance_fallbacks_keep_heatmap_bit_exact():
    rng = np.random.default_rng(0)
    heatmap = (rng.random((4, 3, 3)) * 1e-7).astype(np.float32)
    mask = np.zeros((4, 6, 6), np.uint8)
    mask[[0, 2, 3], 1:4, 1:4] = 1
    batch = make_batch(heatmap=heatmap, mask=mask, num_points=np.array([0, 2, 2, 0], np.int32),
                       valid={"mask": [True, True, False, True],
                              "num_points": [True, True, True, False]})
    out = run(HeatmapEnhance, batch)
    assert out["status"] == ["fallback: no peak", "fallback: empty mask",
                             "fallback: no mask", "enhanced"]
    np.testing.assert_array_equal(out["heatmap"][:3], heatmap[:3])
    assert out["heatmap"][3].max() == 1.0
    assert (out["mask_grid"][1:3] == 0).all() and out["mask_grid"][0].max() == 1.0


def test_enhance_without_wired_num_points():
    heatmap, mask = enhance_case()
    out = run(HeatmapEnhance, make_batch(heatmap=heatmap, mask=mask))
    assert out["status"] == ["enhanced"]


# --- heatmap_metrics ------------------------------------------------------------------------

def metrics(heatmaps, masks, valid=None, **params):
    batch = make_batch(heatmap=np.asarray(heatmaps, np.float32),
                       gt_mask=np.asarray(masks, np.uint8),
                       valid={"gt_mask": valid} if valid is not None else None)
    return run(HeatmapMetrics, batch, **params)


def metrics_mask() -> np.ndarray:
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 1
    mask[3, 3] = 1
    return mask  # fractions [[1, 0], [0, .25]]


def test_metrics_hand_made():
    h = [[[0.9, 0.1], [0.3, 0.0]], [[0.0, 1.0], [0.0, 0.0]], [[0.5, -2.0], [0.5, 0.0]]]
    out = metrics(h, [metrics_mask()] * 3)
    assert out["pointing_game"] == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(out["energy_in_mask"], [0.9 / 1.3, 0.0, 0.5], rtol=1e-6)
    # top_k None: one cell of the mask is >= 0.5, so k = 1.
    assert out["topk_iou"] == [1.0, 0.0, 1.0]
    out = metrics(h, [metrics_mask()] * 3, top_k=2)
    np.testing.assert_allclose(out["topk_iou"], [0.5, 0.5, 0.5])  # ties -> first cell
    out = metrics(h[:1], [metrics_mask()], cell_threshold=0.2)  # inside = {(0,0), (1,1)}, k = 2
    np.testing.assert_allclose(out["topk_iou"], [1 / 3])


def test_metrics_topk_recall():
    h = [[[0.9, 0.1], [0.3, 0.0]], [[0.0, 1.0], [0.0, 0.0]], [[0.5, -2.0], [0.5, 0.0]]]
    # inside (>= 0.2) = {(0,0), (1,1)}; ranks: row 0 -> (0,0), (1,0), (0,1), (1,1);
    # row 1 -> (0,1), then ties (0,0), (1,0), (1,1); row 2 -> (0,0), (1,0), (1,1), (0,1)
    out = metrics(h, [metrics_mask()] * 3, cell_threshold=0.2, recall_k=1)
    np.testing.assert_allclose(out["topk_recall"], [0.5, 0.0, 0.5])
    out = metrics(h, [metrics_mask()] * 3, cell_threshold=0.2, recall_k=3)
    np.testing.assert_allclose(out["topk_recall"], [0.5, 0.5, 1.0])
    out = metrics(h, [metrics_mask()] * 3, recall_k=4)  # everything ranked: all mask cells found
    np.testing.assert_allclose(out["topk_recall"], [1.0, 1.0, 1.0])
    empty = np.zeros((4, 4), np.uint8)
    empty[3, 3] = 1  # covers a quarter of one cell: no cell inside at 0.5
    assert metrics(h[:1], [empty])["topk_recall"] == [None]


def test_metrics_null_cases():
    h = [[[0.0, -1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]
    out = metrics(h, [metrics_mask()] * 2, valid=[True, False])
    assert out["energy_in_mask"][0] is None and out["pointing_game"][0] == 1.0  # no positive energy; the peak (first of ties) is inside
    assert out["pointing_game"][1] is None and out["energy_in_mask"][1] is None
    assert out["topk_iou"][1] is None
    out = run(HeatmapMetrics, make_batch(heatmap=np.asarray(h, np.float32)))  # no gt_mask column
    assert out == {name: [None, None] for name in ("pointing_game", "energy_in_mask", "topk_iou", "topk_recall")}


# --- sample_patches -------------------------------------------------------------------------

def sample(heatmaps, row_ids=None, **params):
    batch = make_batch(heatmap=np.asarray(heatmaps, np.float32), row_ids=row_ids)
    return run(SamplePatches, batch, **params)["patches"], batch


def test_patches_valid_indices():
    maps = np.random.default_rng(0).random((3, 24, 24))
    patches, batch = sample(maps, num_captions=7, num_patches=20)
    assert patches.shape == (3, 7, 20) and patches.dtype == np.int32 and not batch.failures
    assert patches.min() >= 0 and patches.max() < 576
    assert (np.diff(patches, axis=-1) > 0).all()  # sorted, hence no duplicates


def test_all_mass_on_twenty_cells():
    cells = np.random.default_rng(1).choice(576, 20, replace=False)
    h = np.zeros(576)
    h[cells] = np.linspace(1e-7, 5e-7, 20)
    h[np.setdiff1d(np.arange(576), cells)[:5]] = [-1, -0.5, np.nan, -np.inf, np.inf]
    patches, _ = sample([h.reshape(24, 24)], num_captions=10)
    assert (patches[0] == np.sort(cells)).all()


def test_zero_cells_come_after_positive_ones():
    h = np.zeros(16)
    h[[3, 5]] = 1.0
    patches, _ = sample([h.reshape(4, 4)], num_captions=50, num_patches=4)
    assert all({3, 5} <= set(row) for row in patches[0].tolist())
    # The two filler cells are spread over the zero cells, not fixed.
    assert len(np.unique(patches[0])) > 6


def test_frequency_follows_heatmap():
    w = np.array([1.0, 2.0, 3.0, 4.0])
    patches, _ = sample([w.reshape(2, 2)] * 8, row_ids=[f"s{i}" for i in range(8)],
                        num_captions=1000, num_patches=1)
    counts = np.bincount(patches.reshape(-1), minlength=4)
    expected = counts.sum() * w / w.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001
    uniform, _ = sample([np.zeros((2, 2))] * 4, row_ids=list("abcd"),
                        num_captions=1000, num_patches=1)
    counts = np.bincount(uniform.reshape(-1), minlength=4)
    assert (((counts - 1000) ** 2 / 1000).sum()) < 16.3


def test_patches_deterministic_per_row_id():
    maps = np.random.default_rng(2).random((3, 8, 8))
    full, _ = sample(maps, row_ids=["a", "b", "c"], num_patches=10)
    alone, _ = sample(maps[2:], row_ids=["c"], num_patches=10)
    swapped, _ = sample(maps[::-1], row_ids=["c", "b", "a"], num_patches=10)
    np.testing.assert_array_equal(full[2], alone[0])
    np.testing.assert_array_equal(full, swapped[::-1])
    scaled, _ = sample(maps * 1e-7, row_ids=["a", "b", "c"], num_patches=10)
    np.testing.assert_array_equal(full, scaled)  # only relative weights matter
    other_seed, _ = sample(maps, row_ids=["a", "b", "c"], num_patches=10, seed=1)
    assert not np.array_equal(full, other_seed)
    renamed, _ = sample(maps[:1], row_ids=["z"], num_patches=10)
    assert not np.array_equal(full[0], renamed[0])


def test_too_many_patches_fail_rows():
    patches, batch = sample(np.ones((2, 4, 4)), num_patches=17)
    assert set(batch.failures) == {0, 1} and "num_patches=17" in batch.failures[0]
    assert "16 cells" in batch.failures[0]
    stage = SamplePatches(SamplePatches.Params(num_captions=3, num_patches=4))
    assert stage.outputs()["patches"].spec.shape == [3, 4]


def test_mask_heatmap_without_a_wired_mask_is_flat():
    from stages.base import Batch

    out = MaskHeatmap(MaskHeatmap.Params(grid=3)).process(Batch({}, {}, ["a", "b"]))
    np.testing.assert_array_equal(out["heatmap"], np.ones((2, 3, 3), np.float32))
