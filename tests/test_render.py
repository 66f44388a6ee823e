"""Drawing geometry of stages/render.py: heatmap cells land on their pixels, points on their
coordinates, mask outlines on the mask border; and the render stage in a graph."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stages.base import Batch
from stages.render import (
    BACKGROUND, FOREGROUND, MASK_COLOR, Render, RenderParams, cell_edges, colorize, draw_patches, draw_points,
    heatmap_overlay, mask_outline, normalise_heatmap, patch_counts, render_views, resize_mask, scale_heatmap,
    upsample,
)

H, W, G = 90, 151, 7          # non-square, cells of non-integer size (151 / 7 = 21.57 px)


def cell_rect(row: int, col: int, g: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``, ends exclusive: the pixels of cell ``(row, col)`` of a ``g x g`` grid."""
    xs, ys = cell_edges(g, width), cell_edges(g, height)
    return int(xs[col]), int(ys[row]), int(xs[col + 1]), int(ys[row + 1])


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> RGB ``uint8[H, W, 3]``."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def grey(h=H, w=W, value=128):
    return np.full((h, w, 3), value, np.uint8)


def one_hot(g, r, c, value=1.0):
    m = np.zeros((g, g), np.float32)
    m[r, c] = value
    return m


def rect_mask(x0, y0, x1, y1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def changed(a, b):
    return (a != b).any(axis=-1)


def test_cell_rects_tile_the_image_like_nearest_upsampling():
    cover = np.zeros((H, W), int)
    for r in range(G):
        for c in range(G):
            x0, y0, x1, y1 = cell_rect(r, c, G, H, W)
            cover[y0:y1, x0:x1] += 1
            up = upsample(one_hot(G, r, c), H, W, "nearest")
            assert np.array_equal(up > 0, rect_mask(x0, y0, x1, y1))
    assert (cover == 1).all()


@pytest.mark.parametrize("cell", [(0, 0), (2, 4), (6, 6), (3, 0)])
def test_one_hot_cell_lights_exactly_its_pixel_rectangle(cell):
    r, c = cell
    img = grey()
    out = heatmap_overlay(img, one_hot(G, r, c), alpha=0.6, interpolation="nearest")
    x0, y0, x1, y1 = cell_rect(r, c, G, H, W)
    assert np.array_equal(changed(out, img), rect_mask(x0, y0, x1, y1))
    # the rectangle is W/G x H/G pixels (rounded), at the expected place
    assert abs((x1 - x0) - W / G) < 1 and abs((y1 - y0) - H / G) < 1
    assert x0 == int(np.ceil(c * W / G)) and y0 == int(np.ceil(r * H / G))


def test_one_hot_cell_bilinear_stays_within_half_a_cell_and_peaks_at_its_centre():
    r, c = 2, 4
    img = grey()
    out = heatmap_overlay(img, one_hot(G, r, c), alpha=0.6, interpolation="bilinear")
    diff = np.abs(out.astype(int) - img.astype(int)).sum(axis=-1)
    # bilinear support: pixel centres strictly between the neighbouring cell centres
    u = (np.arange(W) + 0.5) * G / W - 0.5
    v = (np.arange(H) + 0.5) * G / H - 0.5
    support = (np.abs(v - r) < 1)[:, None] & (np.abs(u - c) < 1)[None, :]
    assert diff[~support].max() == 0
    x0, y0, x1, y1 = cell_rect(r, c, G, H, W)
    assert (diff[y0:y1, x0:x1] > 0).all()          # the whole cell is lit
    peak = np.unravel_index(diff.argmax(), diff.shape)
    cy, cx = (r + 0.5) * H / G, (c + 0.5) * W / G
    assert abs(peak[0] + 0.5 - cy) <= 1 and abs(peak[1] + 0.5 - cx) <= 1


def test_overlay_keeps_cold_pixels_and_normalises():
    img = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    assert np.array_equal(heatmap_overlay(img, np.zeros((G, G)), interpolation="nearest"), img)
    # scaled or shifted maps give the same picture (min-max), a constant map leaves the image
    m = np.random.default_rng(1).random((G, G)).astype(np.float32)
    a = heatmap_overlay(img, m)
    assert np.array_equal(a, heatmap_overlay(img, 5 * m - 2))
    assert np.array_equal(heatmap_overlay(img, np.full((G, G), 3.0)), img)
    assert normalise_heatmap(np.array([[np.nan, 1.0], [2.0, 3.0]])).tolist() == [[0.0, 0.0], [0.5, 1.0]]


def test_a_map_whose_heat_sits_in_one_percent_of_the_cells_stays_visible_with_a_minimum_opacity():
    """6 hot cells of 576 over a textured picture: alpha proportional to the value tints ~1% of
    the picture; the report's minimum opacity tints all of it, the hot spot far from the rest."""
    from reports.render import RenderOptions

    img = np.random.default_rng(0).integers(60, 200, (384, 384, 3), dtype=np.uint8)
    heat = np.random.default_rng(1).random((24, 24)).astype(np.float32) * 1e-3
    heat[10:12, 5:8] = 1.0                                           # 1% of the cells, ~all the mass
    hot = np.zeros((384, 384), bool)
    hot[10 * 16:12 * 16, 5 * 16:8 * 16] = True

    def tinted(out):
        return np.abs(out.astype(int) - img.astype(int)).sum(-1) > 24   # a visible change of colour

    before = heatmap_overlay(img, heat, alpha=0.6, interpolation="nearest")
    assert tinted(before).mean() < 0.02
    o = RenderOptions()
    assert 0 < o.min_alpha < o.alpha
    after = heatmap_overlay(img, heat, alpha=o.alpha, min_alpha=o.min_alpha, interpolation="nearest")
    assert tinted(after).mean() > 0.95                                 # the overlay is seen everywhere
    colour = after.astype(float)
    assert np.array_equal(after[hot], before[hot])                     # the hot spot drawn as before,
    gap = np.linalg.norm(colour[hot].mean(0) - colour[~hot].mean(0))
    assert gap > 60                                                    # far from the cold field (~72 of 107)
    # constant maps: the cold colour at the minimum opacity, the picture still under it
    flat = heatmap_overlay(img, np.zeros((G, G)), alpha=0.6, min_alpha=0.3)
    assert np.allclose(flat, img * 0.7 + colorize(np.zeros((1, 1)))[0, 0] * 0.3, atol=1)


def test_scale_heatmap_uses_the_given_range():
    m = np.array([[0.0, 1.0], [2.0, np.nan]])
    assert scale_heatmap(m, 0.0, 4.0).tolist() == [[0.0, 0.25], [0.5, 0.0]]
    assert scale_heatmap(m, 1.0, 1.5).tolist() == [[0.0, 0.0], [1.0, 0.0]]   # clipped to [0, 1]
    assert scale_heatmap(m, 2.0, 2.0).tolist() == [[0.0, 0.0], [0.0, 0.0]]   # empty range: all cold


def test_shared_ranges_span_the_runs_of_each_sample_and_heatmap():
    from reports.build import shared_ranges

    ranges = [{"s0": {"heatmap": [0.0, 1.0], "prior": [0.0, 0.5]}, "s1": {"heatmap": [0.2, 0.4]}},
              {"s0": {"heatmap": [0.1, 3.0]}, "s2": {"heatmap": [0.0, 1e-4]}},
              {"s0": {"heatmap": [-1.0, 0.5]}, "s1": {"enhanced": [0.0, 1.0]}}]
    # s0's heatmap in three runs; prior, s1 (different heatmaps) and s2 in one run each: nothing to share
    assert shared_ranges(ranges) == {"s0": {"heatmap": [-1.0, 3.0]}}


def test_points_are_drawn_at_their_pixels():
    img = grey()
    points = np.array([[37.3, 61.6], [120.0, 20.0], [0.0, 0.0]], np.float32)
    scores = np.array([1.0, 0.5, 0.0], np.float32)  # the last is padding (score 0)
    out = draw_points(img, points, scores, radius=4, annotate=False)
    red = (out == FOREGROUND).all(axis=-1)
    ys, xs = np.nonzero(red)
    lit = changed(out, img)
    for (x, y) in points[:2]:
        near = (np.abs(xs - x) <= 6) & (np.abs(ys - y) <= 6)
        # pixel (i, j) covers [j, j+1) x [i, i+1): the disc's centroid is the point
        assert abs(xs[near].mean() + 0.5 - x) < 0.75 and abs(ys[near].mean() + 0.5 - y) < 0.75
        assert red[int(y), int(x)]
    # nothing drawn away from the two points (black ring included), padding skipped
    yy, xx = np.mgrid[:H, :W]
    around = np.zeros((H, W), bool)
    for (x, y) in points[:2]:
        around |= (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= 7 ** 2
    assert not lit[~around].any()
    assert not lit[:3, :3].any()


def test_points_follow_the_resize_scale_and_labels():
    img = grey(45, 76)  # the picture was downscaled by 0.5; points stay in original pixels
    points = np.array([[60.0, 30.0], [100.0, 70.0]], np.float32)
    out = draw_points(img, points, labels=np.array([1, 0]), scale=0.5, radius=3, annotate=False)
    for (x, y), colour in zip(points * 0.5, (FOREGROUND, BACKGROUND)):
        ys, xs = np.nonzero((out == colour).all(axis=-1))
        assert len(xs) and abs(xs.mean() + 0.5 - x) < 0.75 and abs(ys.mean() + 0.5 - y) < 0.75


def _border_by_neighbours(m):
    """Mask pixels with a 4-neighbour outside the mask or outside the image."""
    h, w = m.shape
    out = np.zeros_like(m)
    for y, x in zip(*np.nonzero(m)):
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w) or not m[yy, xx]:
                out[y, x] = True
                break
    return out


def test_mask_outline_lies_on_the_mask_border():
    yy, xx = np.mgrid[:H, :W]
    mask = (((xx - 90) / 40.0) ** 2 + ((yy - 40) / 25.0) ** 2 <= 1).astype(np.uint8)
    mask[:, :10] = 1                                # touches the image edge
    img = grey()
    out = mask_outline(img, mask, fill_alpha=0.0)
    outline = (out == MASK_COLOR).all(axis=-1)
    assert np.array_equal(outline, _border_by_neighbours(mask.astype(bool)))
    assert np.array_equal(changed(out, img), outline)


def test_mask_outline_of_a_low_resolution_mask_is_on_its_upscaled_border():
    small = np.zeros((30, 40), np.uint8)           # SAM masks cover the whole image at their own size
    small[8:20, 10:31] = 1
    out = mask_outline(grey(), small, fill_alpha=0.0)
    outline = (out == MASK_COLOR).all(axis=-1)
    big = resize_mask(small, H, W)
    assert np.array_equal(outline, _border_by_neighbours(big))
    # the border is where the upscaled rectangle says: rows 8..19 of 30 -> pixels ceil(8*90/30)=24..
    ys, xs = np.nonzero(outline)
    assert ys.min() == 24 and ys.max() == int(np.ceil(20 * H / 30)) - 1
    assert xs.min() == int(np.ceil(10 * W / 40)) and xs.max() == int(np.ceil(31 * W / 40)) - 1


def test_patch_counts_and_drawing():
    patches = np.array([[0, 5, 48], [5, 6, 48]])
    counts = patch_counts(patches, 7)
    assert counts.sum() == 6 and counts[0, 5] == 2 and counts[6, 6] == 2 and counts[0, 6] == 1
    img = grey(value=200)
    out = draw_patches(img, counts)
    x0, y0, x1, y1 = cell_rect(3, 3, 7, H, W)          # never drawn: dimmed
    assert (out[y0:y1, x0:x1] < 200).all()
    x0, y0, x1, y1 = cell_rect(0, 5, 7, H, W)          # drawn twice: outlined in the patch colour
    assert not np.array_equal(out[y0, x0], out[y0 + 3, x0 + 3])


def test_render_views_only_draw_what_is_given():
    img = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    heat = np.random.default_rng(1).random((24, 24)).astype(np.float32)
    assert set(render_views(img, heatmap=heat)) == {"heatmap"}
    views = render_views(img, heatmap=heat, enhanced=heat, points=np.array([[100.0, 50.0]]), scores=np.array([1.0]),
                         mask=np.ones((256, 256), np.uint8), patches=np.array([[1, 2, 3]]),
                         attention=np.stack([heat, heat]), max_side=200)
    assert set(views) == {"heatmap", "enhanced", "points", "mask", "patches", "attention"}
    assert views["heatmap"].shape == (120, 200, 3)      # downscaled to max_side, aspect kept


def test_render_stage_process_with_optional_inputs():
    stage = Render(RenderParams(max_side=128))
    images = [np.full((100, 160, 3), 90, np.uint8), np.full((64, 64, 3), 30, np.uint8)]
    heat = np.random.default_rng(0).random((3, 24, 24)).astype(np.float32)
    batch = Batch({"image": images, "heatmap": heat}, {"image": np.ones(2, bool), "heatmap": np.array([1, 1, 0], bool)},
                  ["a", "b", "c"], image_rows=np.array([0, 0, 1]))
    out = stage.process(batch)
    assert out["points_png"] == [None, None, None] and out["mask_png"] == [None, None, None]
    assert out["heatmap_png"][2] is None                # null heatmap, no picture
    assert decode_png(out["heatmap_png"][0]).shape == (80, 128, 3)
    assert decode_png(out["heatmap_png"][1]).shape == (80, 128, 3)


def test_render_stage_in_a_graph(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import stages
    from runtime.api import run_graph
    from conftest import GRAPHS

    if "render" not in stages.STAGES:   # until it is registered in stages/__init__.py
        monkeypatch.setitem(stages.STAGES, "render", Render)
    graph = tmp_path / "g.yaml"
    graph.write_text(f"""
extends: {GRAPHS / 'esam_enhanced.yaml'}
name: esam_render
nodes:
  render:
    stage: render
    params: {{max_side: 96}}
    inputs: {{image: image.image, heatmap: gradcam.heatmap, enhanced: enhance.heatmap, points: points.points,
              scores: points.scores, labels: points.labels, mask: sam.mask}}
outputs: [render.heatmap_png, render.points_png, render.mask_png, render.patches_png]
""")
    summary = run_graph(graph, executor="local", progress=False, device="cpu", output=tmp_path / "run",
                        cache_dir=tmp_path / "cache",
                        overrides=["dataset.num_images=1", "dataset.questions_per_image=2", "caption.num_captions=1"])
    assert summary.errors == 0
    t = pq.read_table(tmp_path / "run" / "results.parquet")
    for col in ("render.heatmap_png", "render.points_png", "render.mask_png"):
        pics = t.column(col).to_pylist()
        assert [decode_png(p).shape for p in pics] == [(96, 96, 3)] * 2
    assert t.column("render.patches_png").to_pylist() == [None, None]
