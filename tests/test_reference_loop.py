"""bench/reference_loop.py does LAVIS's work and still gives the runtime's results: GradCAM by a
full backward (ViT included) equals the stages' leaf gradient, and the decoding loop that
projects the cross-attention keys/values at every step gives the runtime's caption ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.reference_loop import forward_cap, forward_itm, lavis_generate, lavis_vit_attention
from stages.base import Batch
from stages.blip import Caption, ItmGradcam

QUESTIONS = ["What color is the circle?", "how many squares are there?", "Is there a red (small) triangle?"]


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 384, 384)).astype(np.float32)


def batch_of(columns: dict, image_rows, row_ids) -> Batch:
    validity = {k: np.ones(len(v), bool) for k, v in columns.items()}
    return Batch(columns, validity, list(row_ids), np.asarray(image_rows))


def test_itm_full_backward_equals_the_runtime_gradcam():
    stage = ItmGradcam(ItmGradcam.Params(block_num=7))
    stage.setup("cpu")
    px = pixels(2)
    runtime = stage.process(batch_of({"pixels": px, "question": QUESTIONS}, [0, 1, 0], ["a", "b", "c"]))
    model = stage.model
    model.visual_encoder.patch_embed.proj.weight.requires_grad_(False)  # restored afterwards
    lavis_vit_attention(model.visual_encoder)  # LAVIS's explicit attention, as load_models sets it
    reference = forward_itm({"gradcam": stage}, torch.from_numpy(px[[0, 1, 0]]), QUESTIONS)
    expected = runtime["heatmap"].reshape(3, -1)
    assert reference.shape == expected.shape and np.abs(expected).max() > 0
    assert np.abs(reference - expected).max() <= 1e-5 * np.abs(expected).max()
    # the backward reached every parameter, the ViT's included, and requires_grad is as before
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().max() > 0
    assert model.visual_encoder.blocks[0].attn.qkv.weight.grad.abs().max() > 0
    assert not model.visual_encoder.patch_embed.proj.weight.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "visual_encoder.patch_embed.proj.weight")


@pytest.fixture(scope="module")
def caption_stage():
    stage = Caption(Caption.Params(num_captions=4, max_rounds=2, min_length=5, top_k=0))
    stage.setup("cpu")
    return stage


def test_per_step_cross_attention_decoding_gives_the_runtime_ids(caption_stage):
    model = caption_stage.model
    rng = np.random.default_rng(1)
    encoded = model.encode_image(torch.from_numpy(pixels(1, seed=2)))
    states = encoded[:, rng.choice(encoded.shape[1], size=(6, 20))[:, :, None].ravel()].reshape(6, 20, -1)
    steps = caption_stage.params.max_length - len(caption_stage.prompt_ids)
    uniforms = torch.from_numpy(rng.random((6, steps)))
    special = dict(eos_token_id=caption_stage.tokenizer.sep_token_id, pad_token_id=caption_stage.tokenizer.pad_token_id)
    p = caption_stage.params
    expected = model.generate(states, caption_stage.prompt_ids, uniforms, max_length=p.max_length,
                              min_length=p.min_length, top_k=p.top_k, top_p=p.top_p,
                              repetition_penalty=p.repetition_penalty, **special)
    ids = lavis_generate(caption_stage, states, uniforms)
    assert torch.equal(ids, expected)
    assert len({tuple(row) for row in ids.tolist()}) > 1  # rows that differ


def test_reference_captions_equal_the_runtime_stage(caption_stage):
    px = pixels(2, seed=3)
    heat = np.random.default_rng(5).random((3, 24, 24)).astype(np.float32)
    ids = ["q0", "q1", "q2"]
    runtime = caption_stage.process(batch_of({"pixels": px, "heatmap": heat}, [0, 1, 0], ids))
    lavis_vit_attention(caption_stage.model.visual_encoder)
    try:
        reference = forward_cap({"caption": caption_stage}, torch.from_numpy(px[[0, 1, 0]]), heat.reshape(3, -1), ids)
    finally:
        lavis_vit_attention(caption_stage.model.visual_encoder, explicit=False)
    assert reference == runtime["captions"]
    assert sum(len(c) for c in reference) > 3
