"""Drawing of heatmaps, peak points, masks, sampled patches and attention maps over images,
and the ``render`` stage that turns a sample's columns into PNG images.

Images are ``uint8[H, W, 3]`` RGB (as ``load_image`` gives them); colours are RGB tuples.
A heatmap ``[g, g]`` covers the whole image: cell ``(r, c)`` spans the pixels
``x in [x0, x1), y in [y0, y1)`` given by :func:`cell_edges` (``x0 = ceil(c * W / g)``), which is
exactly the pixel set that nearest-neighbour upsampling gives the cell. Bilinear upsampling
(the default) aligns pixel centres with cell centres, so a cell's value spreads half a cell
beyond its rectangle and peaks at its centre.

The drawing functions are pure (numpy + OpenCV); the post-run report (``runtime report``)
uses them directly, and the ``render`` stage offers them inside a graph.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from artifacts.columns import TensorSpec
from stages.base import STAGES, Batch, Input, Output, Resources, Stage, StageParams
from stages.common import optional_column

COLORMAPS: dict[str, int] = {
    "turbo": cv2.COLORMAP_TURBO,
    "jet": cv2.COLORMAP_JET,
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
}
Colormap = Literal["turbo", "jet", "inferno", "viridis", "magma", "plasma"]
Interpolation = Literal["bilinear", "nearest"]

MASK_COLOR = (0, 255, 64)        # outline of SAM masks
PATCH_COLOR = (255, 196, 0)      # outline of sampled patch cells
FOREGROUND = (255, 40, 40)       # foreground point prompts
BACKGROUND = (40, 120, 255)      # background point prompts


# --- geometry -------------------------------------------------------------------------------

def cell_edges(g: int, size: int) -> np.ndarray:
    """Pixel edges ``[g + 1]`` of ``g`` cells over ``size`` pixels: cell ``c`` holds the
    pixels ``p`` with ``floor(p * g / size) == c``, i.e. ``[ceil(c * size / g), ceil((c + 1) * size / g))``."""
    return -(-np.arange(g + 1) * size // g)


def normalise_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Min-max rescale to ``[0, 1]`` float32 (as LAVIS's ``getAttMap``); non-finite cells count
    as the minimum, and a constant map becomes all zeros."""
    h = np.asarray(heatmap, dtype=np.float64)
    finite = np.isfinite(h)
    if not finite.any():
        return np.zeros(h.shape, np.float32)
    lo, hi = h[finite].min(), h[finite].max()
    h = np.where(finite, h, lo)
    return ((h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)).astype(np.float32)


def upsample(grid: np.ndarray, height: int, width: int, interpolation: Interpolation = "bilinear") -> np.ndarray:
    """``[gh, gw]`` float map -> ``[height, width]``.

    ``nearest``: pixel ``(y, x)`` takes cell ``(floor(y * gh / H), floor(x * gw / W))`` exactly.
    ``bilinear``: pixel centres aligned with cell centres (OpenCV's half-pixel convention),
    edges clamped.
    """
    grid = np.asarray(grid, dtype=np.float32)
    gh, gw = grid.shape
    if interpolation == "nearest":
        rows = (np.arange(height) * gh) // height
        cols = (np.arange(width) * gw) // width
        return grid[rows[:, None], cols[None, :]]
    if interpolation != "bilinear":
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got '{interpolation}'")
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A mask at any resolution (covering the whole image) -> bool ``[height, width]``,
    nearest neighbour with the same pixel-to-cell rule as :func:`upsample`."""
    m = np.asarray(mask) != 0
    mh, mw = m.shape
    if (mh, mw) == (height, width):
        return m
    rows = (np.arange(height) * mh) // height
    cols = (np.arange(width) * mw) // width
    return m[rows[:, None], cols[None, :]]


def fit_image(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most ``max_side`` (area interpolation); returns the
    image and the scale applied to pixel coordinates."""
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, 1.0
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), size[0] / w


# --- drawing --------------------------------------------------------------------------------

def colorize(values: np.ndarray, colormap: str = "turbo") -> np.ndarray:
    """``[H, W]`` values in [0, 1] -> RGB ``uint8[H, W, 3]`` through an OpenCV colormap."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap '{colormap}'; choose one of {', '.join(COLORMAPS)}")
    u8 = np.clip(np.rint(np.asarray(values, np.float32) * 255), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)


def scale_heatmap(heatmap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(heatmap - lo) / (hi - lo)`` clipped to ``[0, 1]`` float32 (non-finite cells as ``lo``):
    a map drawn on a range it shares with others, not its own min-max."""
    h = np.asarray(heatmap, dtype=np.float64)
    h = np.where(np.isfinite(h), h, lo)
    return np.clip((h - lo) / (hi - lo) if hi > lo else np.zeros_like(h), 0.0, 1.0).astype(np.float32)


def heatmap_overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.6, colormap: str = "turbo",
                    interpolation: Interpolation = "bilinear", normalise: bool = True,
                    min_alpha: float = 0.0) -> np.ndarray:
    """Blend a heatmap ``[g, g]`` over ``image``: the map is normalised (:func:`normalise_heatmap`),
    upsampled to the image size and coloured; each pixel mixes in the colour with weight
    ``min_alpha + (alpha - min_alpha) * value``. With ``min_alpha`` 0 cold regions show the image
    unchanged and only heat is tinted; above 0 the cold colour covers the whole image, so a map
    whose heat sits in a few cells still reads as a map (hot spot against a cold field)."""
    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    grid = normalise_heatmap(heatmap) if normalise else np.clip(np.asarray(heatmap, np.float32), 0, 1)
    values = np.clip(upsample(grid, h, w, interpolation), 0.0, 1.0)
    weight = (min_alpha + (alpha - min_alpha) * values)[..., None]
    out = image.astype(np.float32) * (1.0 - weight) + colorize(values, colormap).astype(np.float32) * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _label(img: np.ndarray, text: str, x: int, y: int, scale: float) -> None:
    """White text with a dark outline, kept inside the image."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    h, w = img.shape[:2]
    x = int(min(max(x, 1), max(w - tw - 1, 1)))
    y = int(min(max(y, th + 1), max(h - base - 1, th + 1)))
    cv2.putText(img, text, (x, y), font, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (x, y), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def draw_points(image: np.ndarray, points: np.ndarray, scores: np.ndarray | None = None,
                labels: np.ndarray | None = None, scale: float = 1.0, radius: int | None = None,
                annotate: bool = True) -> np.ndarray:
    """Draw point prompts ``[K, 2]`` (x, y in pixels of the original image, multiplied by
    ``scale`` for a resized ``image``) as filled discs with a black ring: red foreground
    (label 1), blue background (label 0); padding (label -1, or score 0 without labels) is
    skipped. ``annotate`` writes each point's rank next to it and a legend of the scores in
    the top-left corner."""
    out = np.array(image, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    k = len(pts)
    sc = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
    elif sc is not None:
        lab = np.where(sc > 0, 1, -1)
    else:
        lab = np.ones(k, dtype=np.int64)
    r = radius if radius is not None else max(3, round(min(h, w) / 64))
    text_scale = max(0.4, min(h, w) / 560)
    shift = 4  # sub-pixel precision for cv2.circle: centres in 1/16 pixels
    legend: list[str] = []
    for i in range(k):
        if lab[i] < 0 or not np.isfinite(pts[i]).all():
            continue
        x, y = pts[i] * scale
        centre = (int(round(x * (1 << shift))), int(round(y * (1 << shift))))
        colour = FOREGROUND if lab[i] == 1 else BACKGROUND
        cv2.circle(out, centre, (r + 1) << shift, (0, 0, 0), -1, cv2.LINE_8, shift)
        cv2.circle(out, centre, r << shift, colour, -1, cv2.LINE_8, shift)
        if annotate:
            _label(out, f"{i + 1}", int(x) + r + 1, int(y) - r + 1, text_scale)
            if sc is not None:
                legend.append(f"{i + 1}: {sc[i]:.2f}" + ("" if lab[i] == 1 else " bg"))
    if legend:
        _legend(out, legend, text_scale)
    return out


def _legend(img: np.ndarray, lines: list[str], scale: float) -> None:
    """Lines of text in a translucent dark box in the top-left corner."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    sizes = [cv2.getTextSize(t, font, scale, 1)[0] for t in lines]
    step = max(h for _, h in sizes) + 5
    w = min(img.shape[1], max(w for w, _ in sizes) + 8)
    h = min(img.shape[0], step * len(lines) + 4)
    box = img[:h, :w].astype(np.float32)
    img[:h, :w] = np.rint(box * 0.35).astype(np.uint8)
    for k, text in enumerate(lines):
        cv2.putText(img, text, (4, step * (k + 1) - 2), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def mask_border(mask: np.ndarray) -> np.ndarray:
    """Pixels of a bool mask with a 4-neighbour outside it (the image edge counts as outside)."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def mask_outline(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = MASK_COLOR, thickness: int = 1,
                 fill_alpha: float = 0.25) -> np.ndarray:
    """Outline a mask (any resolution, covering the whole image) on ``image``: the mask's
    border pixels (:func:`mask_border`, dilated to ``thickness``) take ``color``; the inside
    is tinted with ``fill_alpha``."""
    out = np.array(image, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    m = resize_mask(mask, h, w)
    if fill_alpha > 0:
        tint = out[m].astype(np.float32) * (1 - fill_alpha) + np.float32(color) * fill_alpha
        out[m] = np.clip(np.rint(tint), 0, 255).astype(np.uint8)
    border = mask_border(m)
    if thickness > 1:
        border = cv2.dilate(border.astype(np.uint8), np.ones((thickness, thickness), np.uint8)).astype(bool)
    out[border] = color
    return out


def patch_counts(patches: np.ndarray, g: int) -> np.ndarray:
    """How often each cell of the ``g x g`` grid was drawn: ``[g, g]`` counts from patch index
    sets (any shape; 0-based flat indices, negatives ignored)."""
    idx = np.asarray(patches, dtype=np.int64).reshape(-1)
    idx = idx[(idx >= 0) & (idx < g * g)]
    return np.bincount(idx, minlength=g * g).reshape(g, g)


def draw_patches(image: np.ndarray, counts: np.ndarray, color: Sequence[int] = PATCH_COLOR,
                 dim: float = 0.45) -> np.ndarray:
    """Sampled patches: cells never drawn are dimmed by ``dim``, drawn cells are tinted and
    outlined, more strongly the more often they were drawn (``counts [g, g]``)."""
    out = np.array(image, dtype=np.float32, copy=True)
    h, w = out.shape[:2]
    counts = np.asarray(counts)
    g = counts.shape[0]
    top = counts.max() if counts.size else 0
    freq = counts / top if top > 0 else counts.astype(np.float64)
    f = upsample(freq, h, w, "nearest")[..., None]
    drawn = f > 0
    out = np.where(drawn, out * (1 - 0.35 * f) + np.float32(color) * 0.35 * f, out * (1 - dim))
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    xs, ys = cell_edges(g, w), cell_edges(g, h)
    for r, c in zip(*np.nonzero(counts)):
        thickness = 1 if freq[r, c] < 0.5 else 2
        shade = tuple(int(v * (0.5 + 0.5 * freq[r, c])) for v in color)
        cv2.rectangle(out, (int(xs[c]), int(ys[r])), (int(xs[c + 1]) - 1, int(ys[r + 1]) - 1), shade, thickness)
    return out


def attention_grid(image: np.ndarray, maps: np.ndarray, alpha: float = 0.6, colormap: str = "turbo",
                   interpolation: Interpolation = "bilinear", columns: int = 4, tile: int = 192,
                   min_alpha: float = 0.0) -> np.ndarray:
    """Attention maps per layer ``[L, g, g]`` as overlays tiled ``columns`` per row, each
    labelled with its layer number (tiles ``tile`` pixels on the longer side)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 2:
        maps = maps[None]
    small, _ = fit_image(image, tile)
    th, tw = small.shape[:2]
    n = len(maps)
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    pad = 4
    sheet = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, np.uint8)
    for i, m in enumerate(maps):
        r, c = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        sheet[y:y + th, x:x + tw] = heatmap_overlay(small, m, alpha, colormap, interpolation, min_alpha=min_alpha)
        _label(sheet, f"layer {i}", x + 3, y + 14, 0.4)
    return sheet


def encode_png(image: np.ndarray, compression: int = 6) -> bytes:
    """RGB ``uint8[H, W, 3]`` -> PNG bytes."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """RGB ``uint8[H, W, 3]`` -> PNG (lossless) or JPEG (``quality``; a tenth of the size on
    photos and noisy overlays) bytes."""
    if fmt == "png":
        return encode_png(image)
    if fmt not in ("jpeg", "jpg"):
        raise ValueError(f"image format must be png or jpeg, got '{fmt}'")
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# --- one sample -----------------------------------------------------------------------------

VIEWS = ("heatmap", "enhanced", "points", "mask", "patches", "attention")
"""What :func:`render_views` draws, each only when its inputs are there."""


def render_views(image: np.ndarray, *, heatmap: np.ndarray | None = None, enhanced: np.ndarray | None = None,
                 points: np.ndarray | None = None, scores: np.ndarray | None = None,
                 labels: np.ndarray | None = None, mask: np.ndarray | None = None,
                 patches: np.ndarray | None = None, attention: np.ndarray | None = None,
                 alpha: float = 0.6, colormap: str = "turbo", interpolation: Interpolation = "bilinear",
                 max_side: int | None = 384, views: Sequence[str] = VIEWS,
                 min_alpha: float = 0.0) -> dict[str, np.ndarray]:
    """The views of one sample as RGB images (at most ``max_side`` pixels on the longer side):

    ``heatmap`` / ``enhanced``: overlays of the GradCAM and the enhanced heatmap; ``points``:
    the peak points with rank and score over the heatmap overlay; ``mask``: the SAM mask
    outlined (with its prompt points); ``patches``: the cells drawn for the captions, by how
    often (``patches`` are flat cell indices of the heatmap grid); ``attention``: one overlay
    per layer. A view whose inputs are missing is left out. ``alpha`` / ``min_alpha``: the
    overlays' opacity at the hottest and the coldest value (:func:`heatmap_overlay`).
    """
    small, scale = fit_image(image, max_side)
    out: dict[str, np.ndarray] = {}
    base = None
    if heatmap is not None:
        base = heatmap_overlay(small, heatmap, alpha, colormap, interpolation, min_alpha=min_alpha)
        if "heatmap" in views:
            out["heatmap"] = base
    if enhanced is not None and "enhanced" in views:
        out["enhanced"] = heatmap_overlay(small, enhanced, alpha, colormap, interpolation, min_alpha=min_alpha)
    if points is not None and "points" in views:
        out["points"] = draw_points(base if base is not None else small, points, scores, labels, scale)
    if mask is not None and "mask" in views:
        outlined = mask_outline(small, mask, thickness=max(1, round(min(small.shape[:2]) / 160)))
        out["mask"] = draw_points(outlined, points, scores, labels, scale, annotate=False) \
            if points is not None else outlined
    if patches is not None and "patches" in views:
        grid = heatmap.shape[0] if heatmap is not None else int(np.ceil(np.sqrt(np.max(patches) + 1)))
        out["patches"] = draw_patches(small, patch_counts(patches, grid))
    if attention is not None and "attention" in views:
        out["attention"] = attention_grid(small, attention, alpha, colormap, interpolation, min_alpha=min_alpha)
    return out


# --- the stage ------------------------------------------------------------------------------

class RenderParams(StageParams):
    alpha: float = Field(0.6, ge=0, le=1, description="opacity of the hottest heatmap colour (cold cells "
                         "leave the image as it is)")
    colormap: Colormap = Field("turbo", description="OpenCV colormap of the overlays")
    interpolation: Interpolation = Field("bilinear", description="heatmap upsampling to the image size")
    max_side: int = Field(384, ge=32, le=4096, description="images are downscaled to at most this many "
                          "pixels on the longer side before drawing")


@STAGES.add
class Render(Stage):
    """Draw a sample's heatmaps, peak points, SAM mask, sampled patches and attention maps
    over its image, as PNG bytes.

    Every input but the image is optional, so one stage serves ``pnp_vqa`` (heatmap only)
    and ``esam_enhanced`` (points, mask, enhanced heatmap); an output is null when its
    inputs are not wired or null. The report (``runtime report``) draws the same pictures
    from ``results.parquet`` without this stage; wire it into a graph to keep the pictures
    in the results (``render.heatmap_png`` etc. as kept outputs).
    """

    name = "render"
    version = "1"
    Params = RenderParams
    resources = Resources(batch_size=32)
    INPUTS = {
        "image": Input(TensorSpec("uint8", None, ndim=3), "RGB pixels [H, W, 3] (load_image.image)", per_image=True),
        "heatmap": Input(TensorSpec("float32", ("g", "g")), "heatmap [g, g] (e.g. gradcam.heatmap)", optional=True),
        "enhanced": Input(TensorSpec("float32", ("g", "g")), "enhanced heatmap [g, g] (enhance.heatmap)",
                          optional=True),
        "points": Input(TensorSpec("float32", ("k", 2)), "point prompts (x, y) in image pixels [K, 2]",
                        optional=True),
        "scores": Input(TensorSpec("float32", ("k",)), "point scores [K] (drawn next to the points)", optional=True),
        "labels": Input(TensorSpec("int32", ("k",)), "1 foreground, 0 background, -1 padding [K]", optional=True),
        "mask": Input(TensorSpec("uint8", (None, None)), "mask over the whole image (sam.mask)", optional=True),
        "patches": Input(TensorSpec("int32", (None, None)), "sampled patch indices [sets, patches] "
                         "(sample_patches.patches)", optional=True),
        "attention": Input(TensorSpec("float32", (None, None, None)), "attention maps per layer [L, h, w]",
                           optional=True),
    }
    OUTPUTS = {f"{v}_png": Output(pa.binary(), f"PNG of the {v} view (null without its inputs)") for v in VIEWS}

    def process(self, batch: Batch) -> dict[str, Any]:
        p = self.params
        n = len(batch)
        images = batch["image"]
        image_rows = batch.image_rows if batch.image_rows is not None else np.arange(n)
        cols = {}
        for name in ("heatmap", "enhanced", "points", "scores", "labels", "mask", "patches", "attention"):
            values, valid = optional_column(batch, name, None)
            cols[name] = (values, valid)
        out: dict[str, list[bytes | None]] = {f"{v}_png": [None] * n for v in VIEWS}
        for i in range(n):
            image = images[image_rows[i]]
            if image is None:
                batch.fail(i, "no image")
                continue
            args = {name: (values[i] if valid[i] else None) for name, (values, valid) in cols.items()
                    if values is not None}
            views = render_views(image, alpha=p.alpha, colormap=p.colormap, interpolation=p.interpolation,
                                 max_side=p.max_side, **args)
            for v, img in views.items():
                out[f"{v}_png"][i] = encode_png(img)
        return out
