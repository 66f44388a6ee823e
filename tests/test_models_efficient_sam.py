"""EfficientSAM: published key layout, checkpoint loading, prompt handling, mask shapes, embedding reuse.

Forward passes use the tiny preset (256-px inputs, 16x16 grid, 64x64 low-res masks); vitt/vits are
built on the meta device only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.efficient_sam import (EFFICIENT_SAM, PIXEL_MEAN, PIXEL_STD, EfficientSam, build_model, grid_pos_embed,
                                  load_efficient_sam, preprocess)
from models.efficient_sam.prompt_encoder import PromptEncoder
from models.weights import WEIGHTS_ENV, WeightsError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
H, W = 120, 200  # original image size used for the prompts


@pytest.fixture(scope="module")
def sam():
    model, _ = load_efficient_sam("tiny")
    return model


@pytest.fixture(scope="module")
def embedding(sam):
    images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return sam.embed(sam.preprocess(images))


def _prompts(seed: int = 0, b: int = 2, q: int = 3, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(b, q, n, 2, generator=g) * torch.tensor([W, H])
    labels = torch.randint(0, 2, (b, q, n), generator=g)
    return points, labels


def _predict(sam, emb, points, labels, **kw):
    with torch.no_grad():
        return sam.predict_masks(emb, points, labels, (H, W), **kw)


# ---------------------------------------------------------------- key layout and presets

@pytest.mark.parametrize("preset", ["vitt", "vits"])
def test_state_dict_matches_published_keys(preset):
    ref_file = REFERENCE / f"efficient_sam_{preset}.keys.json"
    if not ref_file.exists():
        pytest.skip(f"reference key lists not found at {REFERENCE} (../shared/reference next to the clone)")
    reference = json.loads(ref_file.read_text())
    with torch.device("meta"):
        model = EfficientSam(EFFICIENT_SAM.config(preset))
    own = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert len(reference) == 278
    assert sorted(set(reference) - set(own)) == []
    assert sorted(set(own) - set(reference)) == []
    assert {k: v for k, v in own.items() if reference[k] != v} == {}
    # the 14x14 (+ CLS) pretraining table is resized to the 64x64 grid at run time
    pos = model.image_encoder.pos_embed
    assert pos.shape[1] == 197
    assert grid_pos_embed(pos, (64, 64)).shape == (1, 64, 64, EFFICIENT_SAM.config(preset).encoder_width)


def test_configs():
    for preset, width in (("vitt", 192), ("vits", 384)):
        cfg = EFFICIENT_SAM.config(preset)
        assert (cfg.image_size, cfg.embed_grid, cfg.embed_dim, cfg.low_res_size) == (1024, 64, 256, 256)
        assert (cfg.encoder_width, cfg.encoder_depth, cfg.max_points) == (width, 12, 6)
    tiny = EFFICIENT_SAM.config("tiny")
    assert (tiny.image_size, tiny.embed_grid, tiny.low_res_size, tiny.decoder_depth) == (256, 16, 64, 2)
    with pytest.raises(ValueError, match="unknown EfficientSAM preset"):
        EFFICIENT_SAM.config("vitl")


def test_pos_embed_resized_at_run_time(sam):
    pos = sam.image_encoder.pos_embed
    assert pos.shape == (1, 197, 32)  # stored at the pretraining grid, as in the published files
    resized = grid_pos_embed(pos, (16, 16))
    expected = F.interpolate(pos[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2), size=(16, 16),
                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(resized, expected)
    assert torch.equal(grid_pos_embed(pos, (14, 14)), pos[:, 1:].reshape(1, 14, 14, 32))
    with pytest.raises(ValueError, match="square"):
        grid_pos_embed(torch.zeros(1, 11, 4), (4, 4))


def test_pixel_stats_are_not_in_the_state_dict(sam):
    keys = sam.state_dict().keys()
    assert "pixel_mean" not in keys and "pixel_std" not in keys
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in keys


# ---------------------------------------------------------------- checkpoints

def _save(state: dict, path: Path) -> Path:
    torch.save({"model": state}, path)
    return path


def test_real_layout_checkpoint_loads(sam, tmp_path):
    state = {k: v.clone() * 1.1 for k, v in sam.state_dict().items()}
    path = _save(state, tmp_path / "efficient_sam_tiny.pt")
    model, report = load_efficient_sam("tiny", path)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert sorted(report.loaded) == sorted(state)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(model.pixel_mean.flatten(), torch.tensor(PIXEL_MEAN))  # refilled after meta build
    assert EFFICIENT_SAM.fingerprint("vitt", path) == EFFICIENT_SAM.fingerprint("tiny", path) != EFFICIENT_SAM.fingerprint("tiny")


def test_wrong_checkpoints_are_refused(sam, tmp_path):
    state = dict(sam.state_dict())
    blip = _save({"visual_encoder.pos_embed": torch.zeros(1, 577, 8)}, tmp_path / "blip.pth")
    with pytest.raises(WeightsError, match="not an EfficientSAM checkpoint"):
        load_efficient_sam("tiny", blip)
    missing = _save({k: v for k, v in state.items() if not k.startswith("mask_decoder.iou_prediction_head")},
                    tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="missing"):
        load_efficient_sam("tiny", missing)
    extra = _save({**state, "mask_decoder.extra_head.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match="unexpected"):
        load_efficient_sam("tiny", extra)
    with pytest.raises(WeightsError, match="width 32 but the 'vitt' preset is 192"):
        load_efficient_sam("vitt", _save(state, tmp_path / "tiny.pt"))
    zipped = tmp_path / "efficient_sam_vits.pt.zip"
    zipped.write_bytes(b"PK")
    with pytest.raises(WeightsError, match="zip archive: unzip it"):
        load_efficient_sam("vits", zipped)


def test_missing_checkpoint_names_file_and_url(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(WeightsError, match=r"efficient_sam_vitt\.pt.*no weights folder"):
        EFFICIENT_SAM.find("vitt")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(WeightsError, match=r"efficient_sam_vitt\.pt.*github\.com/yformer/EfficientSAM"):
        load_efficient_sam("vitt")
    with pytest.raises(WeightsError, match=r"efficient_sam_vits\.pt.*distributed zipped"):
        EFFICIENT_SAM.fingerprint("vits")
    (tmp_path / "efficient_sam_vits.pt.zip").write_bytes(b"PK")
    with pytest.raises(WeightsError, match="unzip it into"):
        EFFICIENT_SAM.find("vits")
    (tmp_path / "efficient_sam_vitt.pt").write_bytes(b"x")
    assert EFFICIENT_SAM.find("vitt") == tmp_path / "efficient_sam_vitt.pt"
    assert EFFICIENT_SAM.find("tiny") is None
    with pytest.raises(WeightsError, match="does not exist"):
        EFFICIENT_SAM.find("tiny", tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown EfficientSAM preset"):
        load_efficient_sam("huge")


def test_tiny_is_deterministic_and_fingerprinted():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("tiny")
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    torch.rand(10)
    b = build_model("tiny")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert EFFICIENT_SAM.fingerprint("tiny") == EFFICIENT_SAM.fingerprint("tiny")


# ---------------------------------------------------------------- preprocessing

def test_preprocess_resizes_then_normalises():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 50, 70, 3), dtype=torch.uint8, generator=g)
    out = preprocess(images, 64)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    unit = images.permute(0, 3, 1, 2).float() / 255  # as torchvision's ToTensor
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    expected = (F.interpolate(unit, size=(64, 64), mode="bilinear", align_corners=False) - mean) / std
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(preprocess(unit, 64), out, atol=1e-6)  # float [B, 3, H, W] in [0, 1]
    assert torch.allclose(preprocess(images.numpy()[0], 64), out[:1], atol=1e-6)  # one HWC numpy image
    other = torch.randint(0, 256, (30, 20, 3), dtype=torch.uint8, generator=g)
    mixed = preprocess([images[0].numpy(), other], 64)  # a list of images of different sizes
    assert mixed.shape == (2, 3, 64, 64)
    assert torch.equal(mixed[0], out[0]) and torch.equal(mixed[1], preprocess(other, 64)[0])
    with pytest.raises(ValueError, match="ambiguous"):
        preprocess(torch.zeros(1, 3, 5, 3))
    assert preprocess(torch.zeros(1, 3, 5, 3), 8, channels_last=False).shape == (1, 3, 8, 8)


# ---------------------------------------------------------------- prompts and masks

def test_prompt_encoder_labels_and_shapes():
    enc = PromptEncoder(16, (4, 4), (64, 64))
    assert enc.dense_pe().shape == (1, 16, 4, 4)
    points = torch.tensor([[[10.0, 20.0]] * 5])
    labels = torch.tensor([[-1, 0, 1, 2, 3]])
    with torch.no_grad():
        tokens = enc(points, labels)
    assert tokens.shape == (1, 5, 16)
    background = tokens[0, 1]  # label 0: the position encoding alone
    assert torch.allclose(background, enc.pe_layer.points(points[0, :1] + 0.5, (64, 64))[0])
    for i, emb in enumerate([enc.invalid_points, None, enc.point_embeddings, enc.bbox_top_left_embeddings,
                             enc.bbox_bottom_right_embeddings]):
        if emb is not None:
            assert torch.allclose(tokens[0, i] - background, emb.weight[0], atol=1e-6)


def test_mask_and_iou_shapes(sam, embedding):
    points, labels = _prompts()
    logits, iou = _predict(sam, embedding, points, labels, output_size=(H, W))
    assert logits.shape == (2, 3, 3, H, W) and iou.shape == (2, 3, 3)
    low, iou_low = _predict(sam, embedding, points, labels)  # output_size None: low-res logits
    assert low.shape == (2, 3, 3, 64, 64) and torch.equal(iou_low, iou)
    grid, _ = _predict(sam, embedding, points, labels, output_size=(16, 16))  # e.g. a heatmap grid
    assert grid.shape == (2, 3, 3, 16, 16)
    single, iou1 = _predict(sam, embedding, points, labels, multimask=False)
    assert single.shape == (2, 3, 1, 64, 64) and iou1.shape == (2, 3, 1)
    assert embedding.shape == (2, 32, 16, 16)


def test_output_size_input_size_is_the_reference_upsampling(sam, embedding):
    points, labels = _prompts(1)
    low, _ = _predict(sam, embedding, points, labels)
    full, _ = _predict(sam, embedding, points, labels, output_size=(H, W))
    expected = F.interpolate(low.reshape(2, 9, 64, 64), size=(H, W), mode="bicubic", align_corners=False)
    assert torch.equal(full, expected.reshape(2, 3, 3, H, W))
    # forward = preprocess + embed + predict_masks at the input size, as the reference's forward
    images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        end_to_end, _ = sam(images, points, labels)
    assert torch.allclose(end_to_end, full, atol=1e-5)


def test_padding_points_do_not_change_masks(sam, embedding):
    points, labels = _prompts(2, n=2)
    pad_points = torch.cat([points, torch.tensor([5.0, 7.0]).expand(2, 3, 3, 2)], dim=2)  # any coordinates
    pad_labels = torch.cat([labels, torch.full((2, 3, 3), -1)], dim=2)
    a = _predict(sam, embedding, points, labels)
    b = _predict(sam, embedding, pad_points, pad_labels)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5)
    # more points than max_points: fine when the extra ones are padding, an error otherwise
    many_points = torch.cat([pad_points, pad_points[:, :, :3]], dim=2)
    c = _predict(sam, embedding, many_points, torch.cat([pad_labels, torch.full((2, 3, 3), -1)], dim=2))
    assert torch.allclose(c[0], a[0], atol=1e-5)
    with pytest.raises(ValueError, match="at most 6 points"):
        _predict(sam, embedding, many_points, torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        _predict(sam, embedding, points, torch.full_like(labels, 4))


def test_points_are_rescaled_from_the_image_frame(sam, embedding):
    points, labels = _prompts(3)
    a = _predict(sam, embedding, points, labels)
    size = sam.config.image_size
    scaled = points * torch.tensor([size / W, size / H])
    with torch.no_grad():
        b = sam.predict_masks(embedding, scaled, labels, (size, size))
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-4)


def test_batch_equals_one_by_one(sam, embedding):
    points, labels = _prompts(4)
    logits, iou = _predict(sam, embedding, points, labels, output_size=(32, 48))
    for i in range(2):
        for j in range(3):
            one_logits, one_iou = _predict(sam, embedding[i:i + 1], points[i:i + 1, j:j + 1],
                                           labels[i:i + 1, j:j + 1], output_size=(32, 48))
            assert torch.allclose(one_logits[0, 0], logits[i, j], atol=1e-5)
            assert torch.allclose(one_iou[0, 0], iou[i, j], atol=1e-5)


def test_embedding_is_reused_for_several_prompt_sets(sam, embedding):
    first_points, first_labels = _prompts(5)
    second_points, second_labels = _prompts(6, q=2, n=4)
    kept = embedding.clone()
    first = _predict(sam, embedding, first_points, first_labels)
    second = _predict(sam, embedding, second_points, second_labels)
    assert torch.equal(embedding, kept)  # not modified by the decoder
    again = _predict(sam, embedding, first_points, first_labels)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fresh = sam.embed(sam.preprocess(images))
    assert torch.equal(fresh, embedding)
    for x, y in zip(_predict(sam, fresh, second_points, second_labels), second):
        assert torch.allclose(x, y, atol=1e-6)
    assert second[0].shape == (2, 2, 3, 64, 64)
    assert sam.mask_threshold == 0.0  # a mask pixel is on where its logit is > 0


# ---------------------------------------------------------------- the shapes preset

def test_shapes_preset_builds_small_and_fast_sizes():

    cfg = EFFICIENT_SAM.config("shapes")
    assert (cfg.image_size, cfg.embed_grid, cfg.low_res_size, cfg.max_points) == (256, 16, 64, 6)
    assert (cfg.encoder_width, cfg.encoder_depth, cfg.embed_dim) == (64, 4, 64)
    model = build_model("shapes", empty=False).eval()
    assert sum(p.numel() for p in model.parameters()) * 4 < 4e6  # float32 weights file under 4 MB
    with torch.no_grad():
        emb = model.embed(model.preprocess(torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))))
        logits, iou = model.predict_masks(emb, *_prompts(b=1), (H, W))
    assert emb.shape == (1, 64, 16, 16)
    assert logits.shape == (1, 3, 3, 64, 64) and iou.shape == (1, 3, 3)
    again = build_model("shapes", empty=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert EFFICIENT_SAM.random_fingerprint("shapes") != EFFICIENT_SAM.random_fingerprint("tiny")
    assert EFFICIENT_SAM.random_fingerprint("tiny") == EFFICIENT_SAM.fingerprint("tiny")


def test_shapes_preset_loads_a_file_and_names_how_to_train_it_when_missing(tmp_path, monkeypatch):
    import models.weights
    from safetensors.torch import save_file

    monkeypatch.setattr(models.weights, "SHAPES_WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsError, match=r"efficient_sam\.safetensors.*bin/train-shapes sam"):
        load_efficient_sam("shapes")
    with pytest.raises(WeightsError, match="train-shapes sam"):
        EFFICIENT_SAM.fingerprint("shapes")
    state = build_model("shapes", empty=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "efficient_sam.safetensors"))
    assert EFFICIENT_SAM.find("shapes") == tmp_path / "efficient_sam.safetensors"
    model, report = load_efficient_sam("shapes")
    assert report.missing == [] and report.unexpected == [] and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model.pixel_std.flatten(), torch.tensor(PIXEL_STD))
    assert EFFICIENT_SAM.fingerprint("shapes") == EFFICIENT_SAM.fingerprint("tiny", tmp_path / "efficient_sam.safetensors")
    with pytest.raises(WeightsError, match="width 32 but the 'shapes' preset is 64"):
        load_efficient_sam("shapes", _save(dict(build_model("tiny").state_dict()), tmp_path / "tiny.pt"))
