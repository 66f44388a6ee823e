"""QA-ViT: published key layout, integration points, loaders (QA-ViT / VisualT5 / plain CLIP),
identity at init, question dependence, padding mask, the reference formulation.

Forward passes use the tiny preset only; l14_336 is built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel

from conftest import hub_snapshot
from models.qavit import (INTEGRATION_POINTS, QAVIT, InstructCLIPEncoderLayer, InstructCLIPVisionModel, build_vision,
                          instruction_layers, integration_point_of, load_qavit, to_vision_layout)
from models.qavit.checkpoint import TINY_GATE
from models.weights import WEIGHTS_ENV, WeightsError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
QUESTIONS = ["what color is the circle?", "how many squares are there?", "is there a red triangle?"]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, report = load_qavit("tiny")
    return model, tokenizer, report


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def _questions(model, tokenizer, questions):
    enc = tokenizer(questions, padding="longest", truncation=True, max_length=30, return_tensors="pt")
    with torch.no_grad():
        return model.encode_question(enc["input_ids"], enc["attention_mask"])


def _plain_clip(tower: InstructCLIPVisionModel) -> CLIPVisionModel:
    """transformers' CLIPVisionModel (eager attention) with the tower's CLIP weights."""
    config = tower.config.clip_config()
    config._attn_implementation = "eager"
    plain = CLIPVisionModel(config).eval()
    state = {k[len("vision_model."):]: v for k, v in tower.state_dict().items()
             if ".instruct" not in k and not k.endswith("position_ids")}
    plain.load_state_dict(state, strict=True)
    return plain


# ---------------------------------------------------------------- layout and integration points

def test_l14_336_matches_the_published_layout():
    ref_file = REFERENCE / "qavit_clip_l14_336_late.keys.json"
    if not ref_file.exists():
        pytest.skip(f"reference key lists not found at {REFERENCE} (../shared/reference next to the clone)")
    reference = json.loads(ref_file.read_text())
    with torch.device("meta"):
        tower = InstructCLIPVisionModel(QAVIT.config("l14_336"))
    own = {key: list(value.shape) for key, value in tower.state_dict().items()}
    assert len(reference) == 488
    assert sorted(set(reference) - set(own)) == []
    assert sorted(set(own) - set(reference)) == []
    assert {k: v for k, v in own.items() if reference[k] != v} == {}


EXPECTED_24 = {
    "all": list(range(24)),
    "early": list(range(12)),
    "late": list(range(12, 24)),
    "late2": list(range(18, 24)),
    "late3": list(range(6, 24)),
    "sparse": list(range(0, 24, 2)),
}


@pytest.mark.parametrize("point", INTEGRATION_POINTS)
def test_integration_points_place_instruction_modules(point):
    assert instruction_layers(24, point) == EXPECTED_24[point]
    for preset in ("tiny", "l14_336"):
        config = QAVIT.config(preset, integration_point=point)
        with torch.device("meta"):
            tower = InstructCLIPVisionModel(config)
        expected = instruction_layers(config.depth, point)
        assert [i for i, layer in enumerate(tower.layers) if isinstance(layer, InstructCLIPEncoderLayer)] == expected
        keyed = sorted({int(k.split("layers.")[1].split(".")[0]) for k in tower.instruction_keys()})
        assert keyed == expected
        assert integration_point_of(config.depth, expected) == point
    assert instruction_layers(4, "late") == [2, 3]
    with pytest.raises(ValueError, match="integration_point"):
        instruction_layers(24, "middle")


# ---------------------------------------------------------------- identity and question dependence

def test_identity_at_init_equals_plain_clip(tiny):
    model, tokenizer, _ = tiny
    tower = build_vision(model.config)  # seeded CLIP init, identity instruction modules
    assert all(tower.layers[i].self_attn.instruction_proj_gate.item() == 0 for i in tower.instruction_layer_ids)
    plain = _plain_clip(tower)
    pixels = _pixels(3)
    states, mask = _questions(model, tokenizer, QUESTIONS)
    with torch.no_grad():
        expected = plain(pixels, output_attentions=True)
        ours = tower.eval()(pixels, states, mask)
    torch.testing.assert_close(ours.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-6)
    for a, b in zip(ours.attentions, expected.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_nonzero_gate_makes_the_output_depend_on_the_question(tiny):
    model, tokenizer, report = tiny
    assert report.kind == "tiny" and report.formulation == "gated"
    assert model.vision.layers[-1].self_attn.instruction_proj_gate.item() == TINY_GATE
    pixels = _pixels(1).expand(2, -1, -1, -1)
    states, mask = _questions(model, tokenizer, QUESTIONS[:2])
    with torch.no_grad():
        out = model(pixels, states, mask, mean_heads=True)
    heat = out.attentions[-1][:, 0, 1:]
    assert (out.last_hidden_state[0] - out.last_hidden_state[1]).abs().max() > 1e-3
    assert (heat[0] - heat[1]).abs().max() > 1e-3 * heat.max()
    # layers before the first instruction layer do not see the question
    first = model.vision.instruction_layer_ids[0]
    torch.testing.assert_close(out.attentions[first - 1][0], out.attentions[first - 1][1], rtol=0, atol=0)


def test_question_padding_is_masked(tiny):
    model, tokenizer, _ = tiny
    pixels = _pixels(1)
    alone_states, alone_mask = _questions(model, tokenizer, QUESTIONS[2:3])
    batch_states, batch_mask = _questions(model, tokenizer, ["what color is the leftmost shape in this picture?",
                                                             QUESTIONS[2]])
    assert batch_mask[1].sum() < batch_mask.shape[1]  # the second question is padded in the batch
    with torch.no_grad():
        alone = model(pixels, alone_states, alone_mask)
        padded = model(pixels.expand(2, -1, -1, -1), batch_states, batch_mask)
        # garbage in the padded positions changes nothing while they are masked ...
        noisy = torch.cat([alone_states, 100 * torch.randn(1, 5, alone_states.shape[-1])], dim=1)
        noisy_mask = torch.cat([alone_mask, torch.zeros(1, 5, dtype=alone_mask.dtype)], dim=1)
        masked = model(pixels, noisy, noisy_mask)
        # ... and would change the result without the mask (the reference ignores it)
        unmasked = model(pixels, noisy, torch.ones_like(noisy_mask))
    torch.testing.assert_close(padded.last_hidden_state[1], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked.last_hidden_state, alone.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked.attentions[-1], alone.attentions[-1], rtol=1e-5, atol=1e-7)
    assert (unmasked.last_hidden_state - alone.last_hidden_state).abs().max() > 1e-3


def test_questions_of_an_image_share_the_question_free_layers(tiny):
    model, tokenizer, _ = tiny
    pixels = _pixels(2, seed=5)
    rows = torch.tensor([0, 1, 0])
    states, mask = _questions(model, tokenizer, QUESTIONS)
    with torch.no_grad():
        shared = model(pixels, states, mask, image_rows=rows, output_attentions=[0, 3])
        direct = model(pixels[rows], states, mask, output_attentions=[0, 3])
    torch.testing.assert_close(shared.last_hidden_state, direct.last_hidden_state, rtol=1e-5, atol=1e-6)
    assert shared.attentions[1] is None and shared.attentions[2] is None
    for i in (0, 3):
        torch.testing.assert_close(shared.attentions[i], direct.attentions[i], rtol=1e-5, atol=1e-7)


def _reference_layer(layer, hidden, question_states):
    """The published MMCLIPEncoderLayer forward, written out: instruction tokens prepended to the
    (layer-normed) image tokens, queries of the instruction tokens dropped, one softmax over all
    keys, no padding mask, out_proj(a) + tanh(g) * instruction_out_proj(a)."""
    attn = layer.self_attn
    kv = layer.instruct_dim_reduce(question_states)
    x = torch.cat([kv, layer.layer_norm1(hidden)], dim=1)
    b, t, w = x.shape
    h, d = attn.num_heads, w // attn.num_heads
    q = (attn.q_proj(x) * attn.scale).view(b, t, h, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, h, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, h, d).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2))[:, :, kv.shape[1]:].softmax(-1)
    a = (weights @ v).transpose(1, 2).reshape(b, -1, w)
    out = attn.out_proj(a) + attn.instruction_out_proj(a) * attn.instruction_proj_gate.tanh()
    hidden = hidden + out
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def test_reference_formulation_is_the_published_computation(tiny):
    model, tokenizer, _ = tiny
    tower = model.vision
    pixels = _pixels(2, seed=1)
    states, mask = _questions(model, tokenizer, QUESTIONS[:1] * 2)  # no padding: the reference's case
    try:
        tower.formulation = "reference"
        with torch.no_grad():
            ours = tower(pixels, states, mask).last_hidden_state
            hidden = tower.vision_model.pre_layrnorm(tower.vision_model.embeddings(pixels))
            for layer in tower.layers:
                if isinstance(layer, InstructCLIPEncoderLayer):
                    hidden = _reference_layer(layer, hidden, states)
                else:
                    hidden = layer(hidden, None)
        torch.testing.assert_close(ours, hidden, rtol=1e-5, atol=1e-5)
        # the reference is not the plain ViT at gate 0: the instruction keys dilute the attention
        identity = build_vision(model.config, formulation="reference")
        with torch.no_grad():
            plain = _plain_clip(identity)(pixels).last_hidden_state
            diff = (identity.eval()(pixels, states, mask).last_hidden_state - plain).abs().max()
        assert diff > 1e-4
    finally:
        tower.formulation = "gated"


# ---------------------------------------------------------------- loaders

def _tiny_qavit_state(integration_point: str = "late") -> dict[str, torch.Tensor]:
    tower = build_vision(QAVIT.config("tiny", integration_point=integration_point))
    tower.set_gates(0.3)
    return tower.state_dict()


def test_plain_clip_weights_load_with_identity_instructions(tiny, tmp_path):
    model, tokenizer, _ = tiny
    config = QAVIT.config("tiny").clip_config()
    clip = CLIPVisionModel(config)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.01 * torch.randn_like(p))
    clip.save_pretrained(tmp_path / "clip")  # transformers 5: keys without the vision_model. prefix
    torch.save({k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in clip.state_dict().items()},
               tmp_path / "clip_vision.pth")
    pixels = _pixels(2, seed=2)
    states, mask = _questions(model, tokenizer, QUESTIONS[:2])
    config._attn_implementation = "eager"
    reference = CLIPVisionModel.from_pretrained(tmp_path / "clip", attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(pixels).last_hidden_state
    hub_snapshot(tmp_path / "hub", "openai/clip-tiny", tmp_path / "clip")
    for source in (tmp_path / "clip", tmp_path / "clip_vision.pth", "hf:openai/clip-tiny"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
            loaded, _, report = load_qavit("tiny", checkpoint=source)
        assert report.kind == "clip" and report.formulation == "gated" and report.integration_point == "late"
        assert sorted(report.identity_initialised) == sorted(loaded.vision.instruction_keys())
        assert not report.vision.missing and not report.vision.unexpected
        for i in loaded.vision.instruction_layer_ids:
            attn = loaded.vision.layers[i].self_attn
            assert attn.instruction_proj_gate.item() == 0 and attn.instruction_gate.item() == 0
            assert torch.equal(attn.instruction_out_proj.weight, attn.out_proj.weight)
            assert torch.equal(attn.instruction_out_proj.bias, attn.out_proj.bias)
        with torch.no_grad():
            out = loaded(pixels, states, mask).last_hidden_state
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prefix", ["", "vision.vision_tower.", "base_model.model.vision.vision_tower."])
def test_qavit_checkpoint_prefixes_are_stripped(tmp_path, prefix):
    state = _tiny_qavit_state()
    lm = {"shared.weight": torch.zeros(4, 2), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2),
          f"{prefix}translation_mlp.layers.0.weight": torch.zeros(2, 2)}
    torch.save({"model": {**{prefix + k: v for k, v in state.items()}, **lm}}, tmp_path / "qavit.pth")
    model, _, report = load_qavit("tiny", checkpoint=tmp_path / "qavit.pth")
    assert report.kind == "qavit" and report.prefix == prefix and report.formulation == "reference"
    assert sorted(report.vision.ignored) == sorted(["vision_model.embeddings.position_ids", *lm])
    own = model.vision.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert model.vision.layers[-1].self_attn.instruction_proj_gate.item() == pytest.approx(0.3)


def test_integration_point_is_read_from_the_checkpoint(tmp_path):
    torch.save(_tiny_qavit_state("all"), tmp_path / "all.pth")
    model, _, report = load_qavit("tiny", checkpoint=tmp_path / "all.pth")
    assert report.integration_point == "all" and model.vision.instruction_layer_ids == [0, 1, 2, 3]
    with pytest.raises(WeightsError, match="integration_point 'all'"):
        load_qavit("tiny", checkpoint=tmp_path / "all.pth", integration_point="late")


def test_question_encoder_folder_and_width_check(tmp_path):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from models.fid_t5 import TINY_TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), local_files_only=True)
    narrow = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                     num_heads=4, feed_forward_proj="relu"))
    narrow.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    model, _, report = load_qavit("tiny", question_encoder=tmp_path / "t5")
    assert model.config.text_dim == 32 and report.question_encoder == str(tmp_path / "t5")
    states, mask = _questions(model, tokenizer, QUESTIONS[:1])
    assert states.shape[-1] == 32
    torch.save(_tiny_qavit_state(), tmp_path / "qavit.pth")  # 64-wide instructions
    with pytest.raises(WeightsError, match="question_encoder"):
        load_qavit("tiny", checkpoint=tmp_path / "qavit.pth", question_encoder=tmp_path / "t5")


def test_missing_weights_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(WeightsError, match="qavit-base2.pth.*clip-vit-large-patch14-336"):
        load_qavit("l14_336")
    (tmp_path / "qavit-base2.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="flan-t5-base"):
        QAVIT.fingerprint("l14_336")
    with pytest.raises(WeightsError, match="no CLIP vision tower"):
        to_vision_layout({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(1)})


def test_tiny_is_deterministic_and_fingerprinted(tiny):
    model, _, _ = tiny
    state = torch.random.get_rng_state()
    again, _, _ = load_qavit("tiny")
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert QAVIT.fingerprint("tiny") == QAVIT.fingerprint("tiny")
    assert QAVIT.fingerprint("tiny") != QAVIT.fingerprint("tiny", integration_point="all")


# ---------------------------------------------------------------- the shapes preset

def _shapes_file(folder: Path, *, question_encoder: bool = True) -> dict[str, torch.Tensor]:
    """A runtime-train-qavit-style file for ``shapes`` in ``folder``: vision tower (gates 0.4),
    a perturbed question encoder (without T5's tied embedding copy), an answer head."""
    from safetensors.torch import save_file

    from models.qavit.checkpoint import TIED_EMBEDDING, load_question_encoder

    tower = build_vision(QAVIT.config("shapes"))
    tower.set_gates(0.4)
    encoder, _, _ = load_question_encoder("shapes")
    tensors = {k: v.clone() for k, v in tower.state_dict().items()}
    if question_encoder:
        tensors.update({f"question_encoder.{k}": v + 0.01 for k, v in encoder.state_dict().items()
                        if k != TIED_EMBEDDING})
    tensors.update({"answer_head.weight": torch.zeros(17, 128), "answer_head.bias": torch.zeros(17)})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "qavit.safetensors"), metadata={"formulation": "gated", "preset": "shapes"})
    return tensors


def test_shapes_preset_sizes():
    from models.qavit import clip_preprocess
    from models.qavit.checkpoint import load_question_encoder
    from stages.qavit import QAViTAttention

    cfg = QAVIT.config("shapes")
    assert (cfg.image_size, cfg.patch_size, cfg.grid, cfg.width, cfg.depth) == (168, 14, 12, 128, 6)
    assert cfg.instruction_layers == [3, 4, 5] and clip_preprocess("shapes")["image_size"] == 168
    with torch.device("meta"):
        tower = InstructCLIPVisionModel(cfg)
    encoder, tokenizer, source = load_question_encoder("shapes")
    assert source == "shapes" and encoder.config.d_model == cfg.text_dim and encoder.config.dropout_rate == 0
    params = sum(p.numel() for p in tower.parameters()) + sum(p.numel() for p in encoder.parameters())
    assert params * 4 < 8e6  # float32 weights under 8 MB
    stage = QAViTAttention(QAViTAttention.Params(preset="shapes"))
    assert stage.inputs()["pixels"].spec.shape == [3, 168, 168]
    assert stage.outputs()["native_heatmap"].spec.shape == [12, 12]


def test_shapes_weights_missing_say_how_to_make_them(monkeypatch, tmp_path):
    from stages.qavit import QAViTAttention

    monkeypatch.setattr("models.weights.SHAPES_WEIGHTS_DIR", tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="train-shapes qavit"):
        load_qavit("shapes")
    with pytest.raises(WeightsError, match="qavit.safetensors"):
        QAVIT.fingerprint("shapes")
    problems = QAViTAttention(QAViTAttention.Params(preset="shapes")).problems()
    assert [f for f, _ in problems] == ["preset"] and "train-shapes qavit" in problems[0][1]


def test_shapes_weights_load_with_their_question_encoder(monkeypatch, tmp_path):
    monkeypatch.setattr("models.weights.SHAPES_WEIGHTS_DIR", tmp_path)
    tensors = _shapes_file(tmp_path)
    model, tokenizer, report = load_qavit("shapes")
    assert report.kind == "qavit" and report.formulation == "gated" and report.integration_point == "late"
    assert report.question_encoder.endswith("(question_encoder.*)")
    assert sorted(report.vision.ignored) == ["answer_head.bias", "answer_head.weight",
                                             "vision_model.embeddings.position_ids"]
    own = model.question_encoder.state_dict()
    assert all(torch.equal(own[k[len("question_encoder."):]], v) for k, v in tensors.items()
               if k.startswith("question_encoder."))
    assert torch.equal(own["encoder.embed_tokens.weight"], tensors["question_encoder.shared.weight"])
    assert model.vision.layers[-1].self_attn.instruction_proj_gate.item() == pytest.approx(0.4)
    states, mask = _questions(model, tokenizer, QUESTIONS[:2])
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 168, 168), states[:1], mask[:1], mean_heads=True)
    assert out.attentions[-1].shape == (1, 145, 145)
    fingerprint = QAVIT.fingerprint("shapes")
    assert fingerprint == QAVIT.fingerprint("shapes", tmp_path / "qavit.safetensors")
    assert load_qavit("shapes", formulation="reference")[2].formulation == "reference"
    _shapes_file(tmp_path, question_encoder=False)
    with pytest.raises(WeightsError, match="question_encoder"):
        load_qavit("shapes")
    assert QAVIT.fingerprint("shapes") != fingerprint
