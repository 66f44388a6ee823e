"""``--dtype``: model stages computing in bfloat16 stay close to float32 (CPU), the dtype is part
of the cache key, and a dtype a model cannot take is refused before any work."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GRAPHS
from runtime.errors import GraphError
from runtime.graph import load_graph
from runtime.run import node_identity
from shapes.dataset import ShapesParams, iter_samples
from stages.base import Batch
from stages.blip import Caption, ItmGradcam
from stages.images import PreprocessImage, decode_image
from stages.qa import QAFiD

pytestmark = pytest.mark.slow


def ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=bool)


@pytest.fixture(scope="module")
def shapes_batch():
    samples = list(iter_samples(ShapesParams(seed=9100, num_images=3, questions_per_image=2)))
    images = [decode_image(s["image_bytes"], "image bytes") for s in samples[::2]]
    pixels = PreprocessImage(PreprocessImage.Params(family="blip")).process(
        Batch({"image": images}, {"image": ones(3)}, ["i0", "i1", "i2"]))["pixels"]
    return pixels, [s["question"] for s in samples], [s["sample_id"] for s in samples]


def pipeline(dtype: str, pixels, questions, ids):
    rows = np.repeat(np.arange(len(pixels)), 2)
    gradcam = ItmGradcam(ItmGradcam.Params(preset="shapes", dtype=dtype))
    gradcam.setup("cpu")
    heat = gradcam.process(Batch({"pixels": pixels, "question": questions},
                                 {"pixels": ones(len(pixels)), "question": ones(len(ids))}, ids, rows))["heatmap"]
    caption = Caption(Caption.Params(preset="shapes", dtype=dtype, num_captions=3, min_length=5))
    caption.setup("cpu")
    captions = caption.process(Batch({"pixels": pixels, "heatmap": heat},
                                     {"pixels": ones(len(pixels)), "heatmap": ones(len(ids))}, ids, rows))["captions"]
    qa = QAFiD(QAFiD.Params(preset="shapes", dtype=dtype))
    qa.setup("cpu")
    answers = qa.process(Batch({"question": questions, "captions": captions},
                               {"question": ones(len(ids)), "captions": ones(len(ids))}, ids))["answer"]
    return heat, answers


def test_bfloat16_heatmaps_and_answers_stay_close_to_float32(shapes_batch):
    heat32, answers32 = pipeline("float32", *shapes_batch)
    heat16, answers16 = pipeline("bfloat16", *shapes_batch)
    assert heat16.dtype == np.float32 and heat16.shape == heat32.shape
    assert np.abs(heat16 - heat32).max() <= 0.02 * heat32.max()          # bfloat16 keeps ~3 significant digits
    for a, b in zip(heat32, heat16):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
        assert np.unravel_index(a.argmax(), a.shape) == np.unravel_index(b.argmax(), b.shape)
    assert sum(x == y for x, y in zip(answers32, answers16)) >= len(answers32) - 1


def test_dtype_option_sets_model_nodes_and_their_keys_only():
    plain = load_graph(GRAPHS / "pnp_vqa.yaml")
    half = load_graph(GRAPHS / "pnp_vqa.yaml", dtype="bfloat16")
    models = {"gradcam", "caption", "answer"}
    assert {n for n, nd in half.nodes.items() if getattr(nd.stage.params, "dtype", None) == "bfloat16"} == models
    changed = {n for n in plain.nodes if node_identity(plain, n, "cpu", None) != node_identity(half, n, "cpu", None)}
    assert changed == models  # (their descendants' keys follow through their input keys)
    assert node_identity(half, "caption", "cpu", None)["dtype"] == "bfloat16"


def test_float16_fid_is_refused_with_the_node_and_field():
    with pytest.raises(GraphError) as exc:
        load_graph(GRAPHS / "pnp_vqa.yaml", dtype="float16")
    text = str(exc.value)
    assert "answer" in text and "dtype" in text and "bfloat16" in text
    with pytest.raises(GraphError, match="no node .* has a dtype param"):
        load_graph(GRAPHS / "oracle_heatmap.yaml", dtype="bfloat16")
