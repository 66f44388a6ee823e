"""Hugging Face BLIP folders and ``hf:`` ids: small random models built with transformers' own
BLIP classes, saved with ``save_pretrained``, loaded into this project's models, and compared
with transformers' forward on the same inputs (an independent implementation of the model)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from artifacts.columns import describe_type
from conftest import hub_snapshot
from models.blip.checkpoint import load_blip_caption, load_blip_itm
from models.blip.config import TINY_TOKENIZER_DIR
from models.blip.family import BLIP_CAPTION, BLIP_ITM
from models.hf_hub import resolve_hub_id
from models.weights import WeightsError
from stages.base import Batch
from stages.blip import Caption, ItmGradcam

TOL = 1e-6  # measured: 2e-7 (float32 rounding of the same operations)


def hf_config() -> BlipConfig:
    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=96, patch_size=16),
        text_config=dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=64),
        image_text_hidden_size=16)


def save(model_cls, folder, seed: int, **kwargs):
    torch.manual_seed(seed)
    model = model_cls(hf_config()).eval()
    with torch.no_grad():  # LayerNorms away from 1 / 0 so that a missed one shows
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, **kwargs)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    itm = save(BlipForImageTextRetrieval, root / "itm", 1)
    cap = save(BlipForConditionalGeneration, root / "caption", 2)
    return root, itm, cap


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 96, 96, generator=g)
    ids = torch.randint(1000, 30000, (2, 7), generator=g)
    ids[:, 0] = 30523                                   # [ENC], as the ITM is fed
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0                                     # a padded row
    return pixels, ids, mask


def test_itm_folder_equals_transformers_vit_logits_and_gradcam_attention(folders):
    root, hf, _ = folders
    ours, report = load_blip_itm("tiny", root / "itm")
    assert not report.missing and not report.unexpected and not report.mismatched and report.loaded
    pixels, ids, mask = inputs()
    with torch.no_grad():
        theirs_img = hf.vision_model(pixel_values=pixels).last_hidden_state
        img = ours.encode_image(pixels)
        assert torch.allclose(img, theirs_img, atol=TOL)
        theirs = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
        assert torch.allclose(ours.itm_logits(img, ids, mask), theirs, atol=TOL)
        # GradCAM reads the cross-attention probabilities of one text layer
        out = hf.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=theirs_img,
                              output_attentions=True, return_dict=True)
    block = 2
    mine = ours.text_encoder(ids, mask, img, probs_layer=block).cross_probs
    assert torch.allclose(mine, out.cross_attentions[block], atol=TOL)
    assert BLIP_ITM.config("tiny", root / "itm").vit.grid == 6 and BLIP_ITM.config("tiny", root / "itm").gradcam_block == 2


def test_caption_folder_equals_transformers_logits(folders):
    root, _, hf = folders
    ours, report = load_blip_caption("tiny", root / "caption")
    assert not report.missing and not report.unexpected and not report.mismatched
    pixels, ids, mask = inputs(1)
    ids[:, 0] = 30522                                   # [DEC]
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, input_ids=ids).logits
        mine = ours.decoder_logits(ids, ours.encode_image(pixels))
    assert torch.allclose(mine, theirs, atol=TOL)


def test_pytorch_bin_folder_loads_and_a_missing_key_is_reported(folders, tmp_path):
    root, hf, _ = folders
    (tmp_path / "bin").mkdir()  # the older layout (transformers 5 writes safetensors only)
    shutil.copy(root / "itm" / "config.json", tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model, _ = load_blip_itm("tiny", tmp_path / "bin")
    assert torch.equal(model.itm_head.weight, hf.itm_head.weight)
    state = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    del state["vision_model.encoder.layers.1.layer_norm2.weight"]
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"1 missing \(visual_encoder\.blocks\.1\.norm2\.weight"):
        load_blip_itm("tiny", tmp_path / "bin")


def test_wrong_kind_and_not_a_folder_are_named(folders, tmp_path):
    root, _, _ = folders
    with pytest.raises(WeightsError, match="BlipForConditionalGeneration.*retrieval model"):
        load_blip_itm("tiny", root / "caption")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="without config.json"):
        load_blip_itm("tiny", tmp_path / "empty")


def test_hub_ids_resolve_offline_in_the_cache_and_missing_ones_say_where(folders, tmp_path, monkeypatch):
    root, _, _ = folders
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hub_snapshot(tmp_path / "hub", "Salesforce/blip-itm-tiny", root / "itm", "abc123")
    assert resolve_hub_id("hf:Salesforce/blip-itm-tiny") == snapshot
    assert resolve_hub_id("hf:Salesforce/blip-itm-tiny@abc123") == snapshot
    model, _ = load_blip_itm("tiny", "hf:Salesforce/blip-itm-tiny")
    assert model.visual_encoder.pos_embed.shape == (1, 37, 32)
    assert BLIP_ITM.fingerprint("tiny", "hf:Salesforce/blip-itm-tiny") == BLIP_ITM.fingerprint("tiny", snapshot)
    assert BLIP_ITM.fingerprint("tiny", snapshot) != BLIP_CAPTION.fingerprint("tiny", root / "caption")
    with pytest.raises(WeightsError, match=r"not in the Hugging Face cache \(looked for .*models--Salesforce--nope"):
        resolve_hub_id("hf:Salesforce/nope")
    with pytest.raises(WeightsError, match="revision 'v2' is not in .*snapshots: abc123"):
        resolve_hub_id("hf:Salesforce/blip-itm-tiny@v2")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "hub").rename(tmp_path / "moved")
    with pytest.raises(WeightsError, match=str(tmp_path / "hub")):
        resolve_hub_id("hf:Salesforce/blip-itm-tiny")


def test_stages_run_on_a_hugging_face_folder(folders, tmp_path):
    root, _, _ = folders
    folder = tmp_path / "itm"
    shutil.copytree(root / "itm", folder)
    for f in TINY_TOKENIZER_DIR.iterdir():  # a folder that ships its tokenizer
        shutil.copy(f, folder / f.name)
    stage = ItmGradcam(ItmGradcam.Params(preset="shapes", checkpoint=str(folder)))
    assert stage.problems() == []
    assert describe_type(stage.outputs()["heatmap"].spec) == "float32[6, 6]"  # the folder's grid, not the preset's
    assert stage.block_num == 2                                              # its 4 text layers
    stage.setup("cpu")
    batch = Batch({"pixels": inputs()[0][:1].numpy(), "question": ["what color is the circle?", "is it red?"]},
                  {"pixels": np.ones(1, bool), "question": np.ones(2, bool)}, ["a", "b"], np.array([0, 0]))
    out = stage.process(batch)
    assert out["heatmap"].shape == (2, 6, 6) and np.isfinite(out["heatmap"]).all() and (out["heatmap"] >= 0).all()
    # a folder without tokenizer files falls back to bert-base-uncased, which must then be in --weights
    cap = Caption(Caption.Params(preset="tiny", checkpoint=str(root / "caption"), num_captions=1, max_rounds=1))
    assert [(f, "bert-base-uncased" in m) for f, m in cap.problems()] == [("preset", True)]
