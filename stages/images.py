"""Image stages: decode files or bytes to RGB arrays, resize and normalise for a model."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from pydantic import Field, field_validator

from artifacts.columns import TensorSpec, tensor_type, variable_tensor_type
from artifacts.location import is_uri, object_bytes
from stages.base import STAGES, Batch, Granularity, Input, Output, Resources, Stage, StageParams
from stages.common import optional_column

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Each model family's preprocessing (LAVIS BLIP, EfficientSAM, CLIP ViT-L/14-336).
FAMILIES: dict[str, dict[str, Any]] = {
    "blip": {"image_size": 384, "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD},
    "sam": {"image_size": 1024, "interpolation": "bilinear",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "clip": {"image_size": 336, "interpolation": "bicubic", "mean": CLIP_MEAN, "std": CLIP_STD},
}

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


DEFAULT_MAX_PIXELS = 50_000_000  # a 7000 x 7000 photo; VQAv2 / GQA images are under 1 megapixel


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> ``uint8[H, W, 3]`` upright RGB; ValueError naming ``source``.

    The size is read from the header before any pixel is decoded: a JPEG above ``max_pixels``
    is decoded at 1/2, 1/4 or 1/8 scale (JPEG draft mode, no full-size buffer), any other image
    above it is refused, so memory stays bounded whatever the dataset holds. Every mode keeps
    its real range (:func:`to_rgb`).
    """
    if not data:
        raise ValueError(f"{source} is empty")
    try:
        with warnings.catch_warnings():  # sizes are checked below, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            w, h = img.size
            if w * h > max_pixels:
                if img.format != "JPEG":
                    raise ImageTooLarge(f"{source} is {w} x {h} = {w * h:,} pixels, above max_pixels "
                                        f"({max_pixels:,}); raise load_image.max_pixels to read it")
                scale = next((s for s in (2, 4, 8) if (w // s) * (h // s) <= max_pixels), None)
                if scale is None:
                    raise ImageTooLarge(f"{source} is {w} x {h} pixels; even at 1/8 scale it is above "
                                        f"max_pixels ({max_pixels:,})")
                img.draft("RGB", (w // scale, h // scale))  # the JPEG decoder's own 1/scale reduction
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageTooLarge as exc:
        raise ValueError(str(exc)) from None
    except Image.DecompressionBombError as exc:  # PIL's own limit (twice MAX_IMAGE_PIXELS), from the header
        raise ValueError(f"{source} is refused as too large: {exc}") from None
    except Exception as exc:  # PIL raises many types for bad data; any of them fails this row
        raise ValueError(f"cannot decode {source}: {type(exc).__name__}: {exc}") from exc


class ImageTooLarge(Exception):
    pass


def to_rgb(img: Image.Image) -> np.ndarray:
    """``uint8[H, W, 3]`` from any PIL mode, each with its real range: 16-bit grayscale
    (``I;16*``) and 32-bit integer (``I``, as 16-bit PNGs open) scaled from 0..65535; float (``F``)
    from 0..1 when it stays there, else 0..255, else its own min..max; every other mode (L, LA,
    P with or without transparency, RGBA, CMYK, YCbCr, 1) through PIL's own RGB conversion, which
    drops alpha as LAVIS's ``convert("RGB")`` does."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        gray = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or gray.max(initial=0) <= 65535 else float(gray.max())
        gray = np.clip(gray, 0, top) / top * 255.0
    elif mode == "F":
        gray = np.asarray(img, dtype=np.float64)
        finite = gray[np.isfinite(gray)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0 and hi <= 1:
            gray = gray * 255.0
        elif not (lo >= 0 and hi <= 255):
            gray = (gray - lo) / (hi - lo or 1.0) * 255.0
        gray = np.nan_to_num(gray, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def read_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file (a path, or a URI such as ``s3://bucket/key``); ValueError
    saying which file and why (ConnectionError, a transient error, when a store does not answer)."""
    if is_uri(path):
        try:
            return decode_image(object_bytes(path), f"image {path}", max_pixels)
        except FileNotFoundError:
            raise ValueError(f"image not found: {path}") from None
        except OSError as exc:  # the store did not answer (after retries): not the image's fault
            raise ConnectionError(f"cannot read image {path}: {exc}") from exc
    p = Path(path)
    if not p.exists():
        raise ValueError(f"image file not found: {path}")
    if not p.is_file():
        raise ValueError(f"image path is not a file: {path}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    return decode_image(data, f"image file {path}", max_pixels)


class LoadImageParams(StageParams):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest image (width x height) decoded at full "
                            "size: a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale, any other larger image fails its "
                            "row; read from the header, so memory per worker stays bounded")


@STAGES.add
class LoadImage(Stage):
    """Decode an image file or bytes to upright RGB pixels.

    EXIF orientation is applied and every mode becomes RGB with its real range (16-bit and
    float images scaled, not clipped; palette, LA and RGBA through PIL's conversion). Bytes win
    when a row has both. Missing, empty, undecodable or too large images fail their row.
    """

    name = "load_image"
    Params = LoadImageParams
    granularity = Granularity.IMAGE
    cacheable = False
    resources = Resources(batch_size=32)
    INPUTS = {
        "image_path": Input(pa.string(), "path of the image file", optional=True),
        "image_bytes": Input(pa.binary(), "encoded image (JPEG, PNG, ...)", optional=True),
    }
    OUTPUTS = {
        "image": Output(variable_tensor_type("uint8", 3), "RGB pixels [H, W, 3]"),
        "size": Output(tensor_type("int32", [2]), "(height, width) of the decoded image"),
    }

    def process(self, batch: Batch) -> dict[str, Any]:
        paths, has_path = optional_column(batch, "image_path", [None] * len(batch))
        blobs, has_bytes = optional_column(batch, "image_bytes", [None] * len(batch))
        images: list[np.ndarray | None] = []
        for i in range(len(batch)):
            try:
                if has_bytes[i]:
                    images.append(decode_image(blobs[i], "image bytes", self.params.max_pixels))
                elif has_path[i]:
                    images.append(read_image(paths[i], self.params.max_pixels))
                else:
                    raise ValueError("row has neither image_path nor image_bytes")
            except ValueError as exc:
                batch.fail(i, str(exc))
                images.append(None)
        sizes = np.array([(0, 0) if im is None else im.shape[:2] for im in images], dtype=np.int32)
        return {"image": images, "size": sizes.reshape(len(batch), 2)}


class PreprocessParams(StageParams):
    family: Literal["blip", "sam", "clip"] = Field(
        "blip", description="model family whose size, interpolation and mean/std are the defaults "
        "(blip: 384 bicubic CLIP mean/std; sam: 1024 bilinear ImageNet; clip: 336 bicubic CLIP)")
    image_size: int | None = Field(
        None, ge=16, le=4096, description="output side S in pixels (None = the family's)")
    mean: tuple[float, float, float] | None = Field(
        None, description="per-channel mean of [0, 1] pixels, RGB, each in [0, 1] "
        "(None = the family's)")
    std: tuple[float, float, float] | None = Field(
        None, description="per-channel std, RGB, each > 0 (None = the family's)")
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = Field(
        None, description="PIL resampling filter (None = the family's)")

    @field_validator("mean")
    @classmethod
    def _mean_in_unit_range(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and not all(0 <= x <= 1 for x in v):
            raise ValueError("each mean must be in [0, 1]")
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and not all(x > 0 for x in v):
            raise ValueError("each std must be > 0")
        return v

    def resolved(self, key: str) -> Any:
        """The explicit value of ``key``, else the family's default."""
        value = getattr(self, key)
        return FAMILIES[self.family][key] if value is None else value


@STAGES.add
class PreprocessImage(Stage):
    """Resize an RGB image to S x S and normalise it for a model family.

    The resize (aspect ratio not kept) runs in PIL on the uint8 image, as torchvision's
    ``Resize`` does on PIL images; pixels are then scaled to [0, 1] and normalised.
    """

    name = "preprocess_image"
    granularity = Granularity.IMAGE
    cacheable = False
    Params = PreprocessParams
    resources = Resources(batch_size=32)
    INPUTS = {"image": Input(TensorSpec("uint8", None, ndim=3), "RGB pixels [H, W, 3]")}

    def outputs(self) -> dict[str, Output]:
        s = self.params.resolved("image_size")
        return {"pixels": Output(tensor_type("float32", [3, s, s]), "normalised pixels [3, S, S]")}

    def process(self, batch: Batch) -> dict[str, Any]:
        p = self.params
        s = p.resolved("image_size")
        resample = RESAMPLE[p.resolved("interpolation")]
        resized = np.stack([
            np.asarray(Image.fromarray(im).resize((s, s), resample)) for im in batch["image"]
        ])
        # Same float32 operations as ToTensor + Normalize, so values agree to rounding.
        x = resized.astype(np.float32) / np.float32(255)
        mean = np.asarray(p.resolved("mean"), dtype=np.float32)
        std = np.asarray(p.resolved("std"), dtype=np.float32)
        return {"pixels": ((x - mean) / std).transpose(0, 3, 1, 2)}
