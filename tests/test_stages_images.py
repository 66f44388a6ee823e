"""load_image and preprocess_image on hand-made images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from stages.base import Batch
from stages.images import FAMILIES, LoadImage, PreprocessImage

RED, BLUE = (255, 0, 0), (0, 0, 255)


def make_batch(**columns) -> Batch:
    n = len(next(iter(columns.values())))
    validity = {k: np.array([v is not None for v in col]) for k, col in columns.items()}
    return Batch(columns=columns, validity=validity, row_ids=[f"r{i}" for i in range(n)])


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def load(**columns):
    batch = make_batch(**columns)
    return LoadImage(LoadImage.Params()).process(batch), batch


def marked_jpeg(orientation: int) -> bytes:
    """40 wide x 20 tall, top-left quadrant red, the rest blue, with an EXIF orientation."""
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def is_color(pixel: np.ndarray, color) -> bool:
    return bool(np.abs(pixel.astype(int) - color).max() < 40)


@pytest.mark.parametrize("orientation, red_at", [
    (1, (5, 10)),    # upright: red top-left of a 20 x 40 image
    (6, (10, 15)),   # rotate 90 clockwise: top-left goes to top-right of a 40 x 20 image
    (8, (30, 5)),    # rotate 90 counter-clockwise: top-left goes to bottom-left
])
def test_exif_orientation_is_applied(orientation, red_at):
    out, batch = load(image_bytes=[marked_jpeg(orientation)])
    assert not batch.failures
    image = out["image"][0]
    h, w = (20, 40) if orientation == 1 else (40, 20)
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert out["size"].tolist() == [[h, w]]
    assert is_color(image[red_at], RED)
    red = np.all(np.abs(image.astype(int) - RED) < 40, axis=-1)
    assert 0.2 < red.mean() < 0.3  # one quadrant, wherever it went


def test_modes_become_rgb(tmp_path):
    gray = Image.new("L", (6, 4), 77)
    rgba = Image.new("RGBA", (6, 4), (10, 20, 30, 0))
    cmyk = Image.new("CMYK", (6, 4), (255, 0, 0, 0))  # pure cyan
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    (tmp_path / "cmyk.tif").write_bytes(encode(cmyk, "TIFF"))
    out, batch = load(
        image_bytes=[encode(gray, "PNG"), encode(rgba, "PNG"), None, encode(palette, "PNG")],
        image_path=[None, None, str(tmp_path / "cmyk.tif"), None],
    )
    assert not batch.failures
    expected = [(77, 77, 77), (10, 20, 30), (0, 255, 255), (200, 100, 50)]
    for image, color in zip(out["image"], expected):
        assert image.shape == (4, 6, 3)
        assert (image == np.array(color, np.uint8)).all()
    assert out["size"].tolist() == [[4, 6]] * 4


def test_bad_images_fail_with_a_message(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    truncated = marked_jpeg(1)[:200]
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.new("RGB", (3, 2), RED), "PNG"))
    paths = [str(tmp_path / "missing.jpg"), str(tmp_path / "empty.jpg"), str(tmp_path / "junk.jpg"),
             str(tmp_path), None, None, None, str(good)]
    blobs = [None, None, None, None, b"", truncated, None, None]
    out, batch = load(image_path=paths, image_bytes=blobs)
    f = batch.failures
    assert set(f) == {0, 1, 2, 3, 4, 5, 6}
    assert "not found" in f[0] and "missing.jpg" in f[0]
    assert "empty" in f[1] and "empty.jpg" in f[1]
    assert "cannot decode" in f[2] and "junk.jpg" in f[2]
    assert "not a file" in f[3]
    assert "image bytes is empty" in f[4]
    assert "cannot decode image bytes" in f[5]
    assert "neither" in f[6]
    assert out["image"][:7] == [None] * 7
    assert out["image"][7].shape == (2, 3, 3)
    assert out["size"].tolist()[7] == [2, 3]


def test_bytes_win_over_path(tmp_path):
    out, batch = load(image_path=[str(tmp_path / "missing.jpg")],
                      image_bytes=[encode(Image.new("RGB", (5, 7), RED), "PNG")])
    assert not batch.failures and out["size"].tolist() == [[7, 5]]


def test_path_only_column(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("RGB", (5, 7), RED), "PNG"))
    out, batch = load(image_path=[str(path)])
    assert not batch.failures and out["image"][0].shape == (7, 5, 3)


def torchvision_reference(image, size: int, interpolation: str, mean, std) -> np.ndarray:
    mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}[interpolation]
    t = transforms.Compose([
        transforms.Resize((size, size), interpolation=mode),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    return t(Image.fromarray(image)).numpy()


@pytest.mark.parametrize("params", [
    {"family": "blip"},
    {"family": "sam", "image_size": 96},
    {"family": "clip", "image_size": 50},
    {"family": "blip", "image_size": 64, "interpolation": "nearest",
     "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 1.0)},
])
def test_preprocess_matches_torchvision(params):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
              rng.integers(0, 256, (90, 20, 3), dtype=np.uint8)]
    stage = PreprocessImage(PreprocessImage.Params(**params))
    out = stage.process(make_batch(image=images))["pixels"]
    family = FAMILIES[params["family"]]
    size = params.get("image_size", family["image_size"])
    assert out.shape == (2, 3, size, size) and out.dtype == np.float32
    assert stage.outputs()["pixels"].spec.shape == [3, size, size]
    for image, pixels in zip(images, out):
        ref = torchvision_reference(
            image, size, params.get("interpolation", family["interpolation"]),
            params.get("mean", family["mean"]), params.get("std", family["std"]))
        np.testing.assert_allclose(pixels, ref, rtol=0, atol=1e-6)


def test_preprocess_family_defaults():
    assert FAMILIES["blip"]["image_size"] == 384 and FAMILIES["blip"]["interpolation"] == "bicubic"
    assert FAMILIES["sam"]["image_size"] == 1024 and FAMILIES["sam"]["interpolation"] == "bilinear"
    assert FAMILIES["sam"]["mean"] == (0.485, 0.456, 0.406)
    assert FAMILIES["clip"]["image_size"] == 336
    stage = PreprocessImage(PreprocessImage.Params(family="sam"))
    assert stage.outputs()["pixels"].spec.shape == [3, 1024, 1024]


@pytest.mark.parametrize("bad", [
    {"family": "vit"}, {"std": (0.0, 1.0, 1.0)}, {"mean": (0.5, 2.0, 0.5)}, {"std": (1.0, 1.0)},
    {"image_size": 8}, {"interpolation": "lanczos"},
    {"size": 384},
])
def test_preprocess_params_are_validated(bad):
    with pytest.raises(ValidationError):
        PreprocessImage.Params(**bad)


def test_an_image_store_that_does_not_answer_is_a_connection_error(monkeypatch):
    """Opening an s3:// URI asks the store for the bucket's region: an unreachable store (a
    worker that does not know the endpoint, a network fault) is no fault of the image, and its
    row fails as transient (node_runner: a ConnectionError), not as bad data."""
    from types import SimpleNamespace

    import pyarrow as pa

    from artifacts import location
    from stages.images import read_image

    def opening_with(from_uri):  # pyarrow's FileSystem type cannot be patched: the module seen by location can
        monkeypatch.setattr(location, "pafs", SimpleNamespace(FileSystem=SimpleNamespace(from_uri=from_uri)))

    def unreachable(uri):
        raise OSError("When resolving region for bucket 'b': AWS Error NETWORK_CONNECTION during HeadBucket operation")

    def unknown(uri):
        raise pa.ArrowInvalid(f"Unrecognized filesystem type in URI: {uri}")

    opening_with(unreachable)
    with pytest.raises(ConnectionError, match="cannot read image s3://b/a.png: .*NETWORK_CONNECTION"):
        read_image("s3://b/a.png")
    opening_with(unknown)
    with pytest.raises(ValueError, match="s3://b/a.png: not a URI pyarrow can open"):
        read_image("s3://b/a.png")
