"""The qavit_attention stage: attention rollout by hand, grid resampling, heatmap statistics,
layer selection, a batch with per-image pixels, validation, and the qavit graph end to end."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import stages
from artifacts.columns import column_to_python
from conftest import GRAPHS
from models.qavit.maps import attention_rollout, cls_to_patches, rollout_row
from models.weights import WEIGHTS_ENV
from runtime.api import run_graph
from stages.base import Batch
from stages.qavit import QAViTAttention, heatmap_statistics, map_layers, resample_heatmaps

QUESTIONS = ["What color is the circle?", "how many squares are there?", "Is there a red triangle?"]


def batch_of(columns: dict, image_rows, row_ids) -> Batch:
    validity = {k: np.ones(len(v), bool) for k, v in columns.items()}
    return Batch(columns, validity, list(row_ids), np.asarray(image_rows))


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 112, 112)).astype(np.float32)


@pytest.fixture(scope="module")
def stage():
    s = QAViTAttention(QAViTAttention.Params(top_k=5))
    s.setup("cpu")
    return s


# ---------------------------------------------------------------- rollout by hand

def test_attention_rollout_of_two_hand_made_layers():
    a1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # with the residual: A1^ = [[.5,.5,0],[0,1,0],[0,0,1]], A2^ = [[.5,0,.5],[.5,.5,0],[0,.5,.5]]
    # rollout (first layer first) = A2^ @ A1^; the other order gives A1^ @ A2^
    first_then_second = torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.75, 0.0], [0.0, 0.5, 0.5]])
    second_then_first = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    layers = [torch.stack([a1, a2]), torch.stack([a2, a1])]  # batch row 1 has the layers swapped
    rollout = attention_rollout(layers)
    torch.testing.assert_close(rollout[0], first_then_second)
    torch.testing.assert_close(rollout[1], second_then_first)
    torch.testing.assert_close(rollout_row(layers), torch.stack([first_then_second[0], second_then_first[0]]))
    torch.testing.assert_close(rollout_row(layers, row=1)[0], first_then_second[1])
    torch.testing.assert_close(rollout_row(layers)[:, 1:], torch.tensor([[0.25, 0.5], [0.25, 0.25]]))
    # a single layer: just the residual-mixed attention; CLS row over the patches
    torch.testing.assert_close(attention_rollout([a1[None]])[0], 0.5 * a1 + 0.5 * torch.eye(3))
    heads = torch.stack([a1, a2])[None]  # [1, H=2, 3, 3]
    torch.testing.assert_close(cls_to_patches(heads), torch.tensor([[0.5, 0.5]]))


def test_rollout_row_equals_the_full_product_on_random_maps():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 6, 6, generator=g).softmax(-1) for _ in range(5)]
    torch.testing.assert_close(rollout_row(maps), attention_rollout(maps)[:, 0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- resampling and statistics

def test_resampling_to_another_grid():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 8, 8)).astype(np.float32)
    bilinear = resample_heatmaps(maps, 24, "bilinear")
    expected = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(24, 24), mode="bilinear",
                                               align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(bilinear, expected, rtol=1e-5, atol=1e-6)
    down = resample_heatmaps(rng.random((1, 24, 24)), 8, "bilinear")
    assert down.shape == (1, 8, 8) and down.dtype == np.float32
    # area: upsampling by 3 repeats each cell in a 3x3 block; downsampling averages blocks
    area_up = resample_heatmaps(maps, 24, "area")
    np.testing.assert_allclose(area_up, np.repeat(np.repeat(maps, 3, axis=1), 3, axis=2), rtol=1e-6)
    small = np.array([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]]])
    np.testing.assert_allclose(resample_heatmaps(small, 2, "area"), [[[3.5, 5.5], [0.0, 4.0]]])
    odd = rng.random((3, 6, 6))
    np.testing.assert_allclose(resample_heatmaps(odd, 4, "area").mean(axis=(1, 2)), odd.mean(axis=(1, 2)), rtol=1e-6)
    # equal grids: unchanged
    same = resample_heatmaps(maps, 8, "bilinear")
    assert np.array_equal(same, maps) and same is not maps
    # constant maps stay constant either way
    np.testing.assert_allclose(resample_heatmaps(np.full((1, 8, 8), 0.25), 24, "bilinear"), 0.25, rtol=1e-6)


def test_heatmap_statistics():
    uniform = np.full((1, 24, 24), 3.0, dtype=np.float32)
    stats = heatmap_statistics(uniform, 4)
    assert stats["entropy"][0] == pytest.approx(math.log(576), rel=1e-6)
    assert stats["mean"][0] == 3.0 and stats["std"][0] == 0.0 and stats["max"][0] == 3.0
    assert stats["top_patches"][0].tolist() == [0, 1, 2, 3]  # ties: lowest index first
    peaked = np.zeros((2, 4, 4), dtype=np.float32)
    peaked[0, 1, 2] = 1.0
    peaked[1] = np.arange(16).reshape(4, 4)
    stats = heatmap_statistics(peaked, 3)
    assert stats["entropy"][0] == 0.0
    assert stats["top_patches"][0][0] == 6 and stats["top_patches"][1].tolist() == [15, 14, 13]
    p = np.arange(16) / np.arange(16).sum()
    assert stats["entropy"][1] == pytest.approx(-(p[1:] * np.log(p[1:])).sum(), rel=1e-6)
    assert stats["max"][1] == 15 and stats["mean"][1] == pytest.approx(7.5)
    assert stats["std"][1] == pytest.approx(np.arange(16).std(), rel=1e-6)
    assert np.isnan(heatmap_statistics(np.zeros((1, 2, 2)), 1)["entropy"][0])  # nothing positive


def test_layer_selection():
    assert map_layers((3, 7, 11), 24, 12) == [7, 15, 23]
    assert map_layers((3, 7, 11), 4, 12) == [0, 2, 3]
    assert map_layers((1, -1), 4, None) == [1, 3]
    make = lambda **kw: QAViTAttention(QAViTAttention.Params(**kw))  # noqa: E731
    assert make().selected_layers() == [3]  # block_num -1 = the last of the tiny 4 layers
    assert make(mode="rollout", block_num=2).selected_layers() == [0, 1, 2]
    assert make(mode="layers").selected_layers() == [0, 2, 3]
    assert make(mode="layers", layers=(0, 1), layers_depth=None).selected_layers() == [0, 1]


def test_problems_before_work(monkeypatch, tmp_path):
    make = lambda **kw: QAViTAttention(QAViTAttention.Params(**kw)).problems()  # noqa: E731
    assert make() == []
    assert [f for f, _ in make(block_num=4)] == ["block_num"]
    assert [f for f, _ in make(mode="layers", layers=(12,))] == ["layers"]
    assert [f for f, _ in make(mode="layers", layers=(5,), layers_depth=None)] == ["layers"]
    assert [f for f, _ in make(top_k=577)] == ["top_k"]
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    problems = make(preset="l14_336")
    assert [f for f, _ in problems] == ["preset", "preset"]
    assert "qavit-base2.pth" in problems[0][1] and "flan-t5-base" in problems[1][1]
    (tmp_path / "qavit-base2.pth").write_bytes(b"")
    (tmp_path / "clip").mkdir()
    problems = make(preset="l14_336", checkpoint=str(tmp_path / "clip"))
    assert len(problems) == 1 and "flan-t5-base" in problems[0][1]
    assert [f for f, _ in make(preset="l14_336", checkpoint=str(tmp_path / "nowhere.pth"))][0] == "checkpoint"
    with pytest.raises(Exception, match="extra"):
        QAViTAttention.Params(unknown=1)


# ---------------------------------------------------------------- the stage on a batch

def test_stage_on_a_batch_with_per_image_pixels(stage):
    px = pixels(2)
    questions = QUESTIONS + [" "]
    batch = batch_of({"pixels": px, "question": questions}, [0, 1, 0, 1], ["a", "b", "c", "d"])
    out = stage.process(batch)
    assert batch.failures == {3: "empty question"}
    assert out["heatmap"].shape == (4, 24, 24) and out["heatmap"].dtype == np.float32
    assert out["native_heatmap"].shape == (4, 8, 8) and out["top_patches"].shape == (4, 5)
    assert out["top_patches"].dtype == np.int32
    # the CLS row of the last layer's head-mean attention over the image patches, from the model
    model, tokenizer = stage.model, stage.tokenizer
    enc = tokenizer(questions[:3], padding="longest", truncation=True, max_length=30, return_tensors="pt")
    with torch.no_grad():
        states, mask = model.encode_question(enc["input_ids"], enc["attention_mask"])
        att = model(torch.from_numpy(px)[[0, 1, 0]], states, mask).attentions[-1]
    expected = att.mean(dim=1)[:, 0, 1:].numpy().reshape(3, 8, 8)
    np.testing.assert_allclose(out["native_heatmap"][:3], expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(out["heatmap"], resample_heatmaps(out["native_heatmap"], 24), rtol=1e-6)
    # CLS attention to the patches: the row minus CLS's own share
    assert np.all(out["native_heatmap"] > 0) and np.all(out["native_heatmap"].sum(axis=(1, 2)) < 1)
    # same image, another question: another heatmap
    assert np.abs(out["native_heatmap"][0] - out["native_heatmap"][2]).max() > 1e-3 * out["native_heatmap"][0].max()
    stats = heatmap_statistics(out["heatmap"], 5)
    for key in ("mean", "std", "max", "top_patches"):
        np.testing.assert_array_equal(out[key], stats[key])
    np.testing.assert_allclose(out["entropy"], stats["entropy"], rtol=1e-6)
    assert all(0 < e < math.log(576) for e in out["entropy"])
    # a row does not depend on the rest of its batch
    alone = stage.process(batch_of({"pixels": px[:1], "question": QUESTIONS[2:3]}, [0], ["c"]))
    np.testing.assert_allclose(alone["native_heatmap"][0], out["native_heatmap"][2], rtol=1e-5, atol=1e-8)


def test_rollout_and_layers_modes_follow_the_model(stage):
    px = pixels(1, seed=3)
    rollout = QAViTAttention(QAViTAttention.Params(mode="rollout", output_grid=8))
    layers = QAViTAttention(QAViTAttention.Params(mode="layers", layers=(0, 3), layers_depth=None, output_grid=8))
    for s in (rollout, layers):
        s.model, s.tokenizer, s.device = stage.model, stage.tokenizer, "cpu"
    batch = batch_of({"pixels": px, "question": QUESTIONS[:2]}, [0, 0], ["a", "b"])
    out_rollout, out_layers = rollout.process(batch), layers.process(batch)
    assert out_rollout["heatmap"].shape == (2, 8, 8)
    np.testing.assert_array_equal(out_rollout["heatmap"], out_rollout["native_heatmap"])  # equal grids
    enc = stage.tokenizer(QUESTIONS[:2], padding="longest", return_tensors="pt")
    with torch.no_grad():
        states, mask = stage.model.encode_question(enc["input_ids"], enc["attention_mask"])
        att = [a.mean(dim=1) for a in stage.model(torch.from_numpy(px)[[0, 0]], states, mask).attentions]
    expected = attention_rollout(att)[:, 0, 1:].numpy().reshape(2, 8, 8)
    np.testing.assert_allclose(out_rollout["native_heatmap"], expected, rtol=1e-5, atol=1e-8)
    expected = ((att[0] + att[3]) / 2)[:, 0, 1:].numpy().reshape(2, 8, 8)
    np.testing.assert_allclose(out_layers["native_heatmap"], expected, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- the graph

def test_qavit_graph_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(stages.STAGES, QAViTAttention.name, QAViTAttention)
    summary = run_graph(GRAPHS / "qavit.yaml", overrides=["dataset.num_images=2", "dataset.questions_per_image=2",
                                                         "caption.num_captions=2"],
                        executor="local", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                        progress=False, device="cpu")
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert summary.samples == table.num_rows == 4 and summary.errors == 0
    heat, valid = column_to_python(table.column("qavit.heatmap"))
    assert valid.all() and heat.shape == (4, 24, 24) and np.all(heat > 0)
    top, _ = column_to_python(table.column("qavit.top_patches"))
    assert top.shape == (4, 10) and np.all((top >= 0) & (top < 576))
    rows = table.to_pylist()
    assert all(0 < r["qavit.entropy"] <= math.log(576) + 1e-4 and r["qavit.max"] >= r["qavit.mean"] for r in rows)
    assert all(len(r["caption.captions"]) == 2 and isinstance(r["answer.answer"], str) for r in rows)
    assert all(0.0 <= r["accuracy.accuracy"] <= 1.0 for r in rows)
    assert summary.nodes["clip_pixels"].rows == 2 and summary.nodes["qavit"].rows == 4
