"""BLIP models: LAVIS key layout, checkpoint loading, GradCAM formula, caption generation, tokenizer.

Forward passes use the tiny presets only; base/large are built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.blip import (BLIP, BLIP_CAPTION, BLIP_ITM, TINY_TOKENIZER_DIR, BlipCaption, BlipITM, caption_prompt_ids,
                         load_blip_caption, load_blip_itm, load_blip_tokenizer, resize_pos_embed, tokenize_questions)
from models.blip.checkpoint import build_model
from models.blip.tokenizer import load_blip_tokenizer_for
from models.weights import WEIGHTS_ENV, WeightsError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
QUESTIONS = ["what color is the circle?", "how many squares are there?", "is there a blue diamond?",
             "what color is the leftmost shape?"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_blip_tokenizer(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def itm():
    model, _ = load_blip_itm("tiny")
    return model


@pytest.fixture(scope="module")
def captioner():
    model, _ = load_blip_caption("tiny")
    return model


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 384, 384, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- key layout

@pytest.mark.parametrize("kind, preset", [("itm", "base"), ("itm", "large"), ("caption", "base"),
                                          ("caption", "large")])
def test_state_dict_matches_lavis_keys(kind, preset):
    ref_file = REFERENCE / f"blip_{kind}_{preset}.keys.json"
    if not ref_file.exists():
        pytest.skip(f"reference key lists not found at {REFERENCE} (../shared/reference next to the clone)")
    reference = json.loads(ref_file.read_text())
    with torch.device("meta"):
        model = (BlipITM if kind == "itm" else BlipCaption)(BLIP[kind].config(preset))
    own = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(reference) - set(own)) == []
    assert sorted(set(own) - set(reference)) == []
    assert {k: v for k, v in own.items() if reference[k] != v} == {}


def test_caption_decoder_is_tied(captioner):
    predictions = captioner.text_decoder.cls.predictions
    assert predictions.decoder.weight is captioner.text_decoder.bert.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias


# ---------------------------------------------------------------- checkpoints

def _lavis_retrieval_state(model: BlipITM, scale: float = 1.1) -> dict[str, torch.Tensor]:
    """A tiny state dict in the layout of ``model_*_retrieval_coco.pth``: model keys (values
    changed, so loading is visible), momentum copies, queues, temperature; no position_ids."""
    state = {k: v.clone() * scale for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    for key, value in list(state.items()):
        head, rest = key.split(".", 1)
        if head in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
            state[f"{head}_m.{rest}"] = value.clone()
    state.update(image_queue=torch.randn(256, 16), text_queue=torch.randn(256, 16),
                 idx_queue=torch.zeros(1, 16, dtype=torch.long), ptr_queue=torch.zeros(1, dtype=torch.long),
                 temp=torch.tensor(0.07))
    return state


def test_lavis_layout_checkpoint_loads(itm, tmp_path):
    state = _lavis_retrieval_state(itm)
    path = tmp_path / "model_base_retrieval_coco.pth"
    torch.save({"model": state, "epoch": 5}, path)
    model, report = load_blip_itm("tiny", path)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    ignored = set(report.ignored)
    assert {"image_queue", "text_queue", "idx_queue", "ptr_queue", "temp"} <= ignored
    assert all(k in ignored for k in state if "_m." in k)
    assert not any("_m." in k for k in report.loaded)
    for key, value in model.state_dict().items():
        expected = state.get(key, itm.state_dict()[key])  # position_ids: recomputed buffer
        assert torch.equal(value, expected), key
    assert not model.training
    pixels = _pixels(1)
    assert model.encode_image(pixels).shape == (1, 577, 64)


def test_caption_checkpoint_without_tied_keys_loads(captioner, tmp_path):
    state = {k: v * 0.9 for k, v in captioner.state_dict().items()
             if not k.endswith(("position_ids", "predictions.decoder.weight", "predictions.decoder.bias"))}
    path = tmp_path / "model_large_caption.pth"
    torch.save({"model": state}, path)
    model, report = load_blip_caption("tiny", path)
    assert report.missing == []
    dec = model.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
    assert torch.equal(dec.cls.predictions.decoder.weight, state["text_decoder.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(dec.bert.embeddings.position_ids, torch.arange(64)[None])


def test_wrong_model_checkpoint_is_refused(captioner, itm, tmp_path):
    path = tmp_path / "model_large_caption.pth"
    torch.save({"model": captioner.state_dict()}, path)
    with pytest.raises(WeightsError, match="caption checkpoint"):
        load_blip_itm("tiny", path)
    path = tmp_path / "retrieval.pth"
    torch.save({"model": itm.state_dict()}, path)
    with pytest.raises(WeightsError, match="ITM/retrieval checkpoint"):
        load_blip_caption("tiny", path)


def test_checkpoint_of_another_size_is_refused(itm, tmp_path):
    state = dict(itm.state_dict())
    state["itm_head.weight"] = torch.zeros(2, 32)
    path = tmp_path / "other.pth"
    torch.save({"model": state}, path)
    with pytest.raises(WeightsError, match="does not fit the model"):
        load_blip_itm("tiny", path)


def test_truncated_checkpoint_is_refused(itm, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": itm.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_blip_itm("tiny", path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": _Payload()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_blip_itm("tiny", path)


def test_missing_checkpoint_names_file_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(WeightsError, match=r"model_base_retrieval_coco\.pth.*storage\.googleapis\.com"):
        load_blip_itm("base")
    with pytest.raises(WeightsError, match=r"model_large_caption\.pth.*also accepted"):
        load_blip_caption("large")
    with pytest.raises(ValueError, match="unknown BLIP preset"):
        load_blip_itm("huge")
    with pytest.raises(WeightsError, match="bert-base-uncased"):
        load_blip_tokenizer_for("large")
    assert BLIP_ITM.find("tiny") is None
    with pytest.raises(WeightsError, match="does not exist"):
        BLIP_CAPTION.find("tiny", tmp_path / "nope.pth")


def test_pos_embed_is_interpolated(itm, tmp_path):
    state = dict(itm.state_dict())
    small = resize_pos_embed(state["visual_encoder.pos_embed"], 6)
    assert small.shape == (1, 37, 64)
    state["visual_encoder.pos_embed"] = small
    path = tmp_path / "trained_at_96px.pth"
    torch.save({"model": state}, path)
    model, report = load_blip_itm("tiny", path)
    assert report.missing == [] and report.mismatched == []
    pos = model.visual_encoder.pos_embed
    assert pos.shape == (1, 577, 64)
    assert torch.equal(pos[:, 0], small[:, 0])  # CLS kept
    assert torch.allclose(pos, resize_pos_embed(small, 24))
    assert model.encode_image(_pixels(2)).shape == (2, 577, 64)


def test_resize_pos_embed_same_grid_and_errors():
    pos = torch.randn(1, 65, 8)
    assert resize_pos_embed(pos, 8) is pos
    assert resize_pos_embed(pos, 4).shape == (1, 17, 8)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 11, 8), 4)


def test_tiny_is_deterministic_and_fingerprinted():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("itm", "tiny")
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    torch.rand(10)
    b = build_model("itm", "tiny")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    fp = BLIP_ITM.fingerprint("tiny")
    assert fp == BLIP_ITM.fingerprint("tiny") != BLIP_CAPTION.fingerprint("tiny")


def test_file_fingerprint_for_path(itm, tmp_path):
    path = tmp_path / "a.pth"
    torch.save({"model": itm.state_dict()}, path)
    assert BLIP_ITM.fingerprint("large", path) == BLIP_ITM.fingerprint("tiny", path)
    assert BLIP_ITM.fingerprint("tiny", path) != BLIP_ITM.fingerprint("tiny")


# ---------------------------------------------------------------- ITM / ITC / GradCAM

def _reference_gradcam(model: BlipITM, embeds, input_ids, attention_mask, block_num):
    """The PNP-VQA formula, written out row by row on the full autograd graph."""
    out = model.text_encoder(input_ids, attention_mask, embeds, probs_layer=block_num)
    logits = model.itm_head(out.hidden[:, 0])
    (grads,) = torch.autograd.grad(logits[:, 1].sum(), out.cross_probs)
    probs = out.cross_probs.detach()
    grid = int((probs.shape[-1] - 1) ** 0.5)
    maps = []
    for b in range(probs.shape[0]):
        length = int(attention_mask[b].sum())
        mask = attention_mask[b].float()[None, :, None]
        cam = (probs[b, :, :, 1:] * mask) * (grads[b, :, :, 1:].clamp(min=0) * mask)  # [heads, T, P]
        per_token = cam.mean(dim=0)
        maps.append(per_token[1:length - 1].sum(dim=0) / (length - 2))
    return torch.stack(maps).reshape(-1, grid, grid), logits.softmax(-1)[:, 1].detach()


def _close(actual, expected, rtol):
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(actual / scale, expected / scale, rtol=rtol, atol=rtol)


def test_itm_shapes_and_properties(itm, tokenizer):
    ids, mask = tokenize_questions(tokenizer, QUESTIONS[:2])
    embeds = itm.encode_image(_pixels(2))
    assert embeds.shape == (2, 577, 64)
    assert itm.grid == 24 and itm.num_text_layers == 12 and itm.num_heads == 4
    assert itm.itm_logits(embeds, ids, mask).shape == (2, 2)


def test_probs_path_matches_fused_attention(itm, tokenizer):
    ids, mask = tokenize_questions(tokenizer, QUESTIONS)
    embeds = itm.encode_image(_pixels(4))
    with torch.no_grad():
        plain = itm.text_encoder(ids, mask, embeds)
        with_probs = itm.text_encoder(ids, mask, embeds, probs_layer=1)
    torch.testing.assert_close(plain.hidden, with_probs.hidden, rtol=1e-5, atol=1e-6)
    probs = with_probs.cross_probs
    assert probs.shape == (4, 4, ids.shape[1], 577)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


@pytest.mark.parametrize("block_num", [0, 1])
def test_gradcam_equals_formula(itm, tokenizer, block_num):
    ids, mask = tokenize_questions(tokenizer, QUESTIONS)
    assert len(set(mask.sum(1).tolist())) > 1  # padded batch, different lengths
    embeds = itm.encode_image(_pixels(4)).detach()
    heatmap, score = itm.gradcam(embeds, ids, mask, block_num)
    assert heatmap.shape == (4, 24, 24) and heatmap.dtype == torch.float32
    expected, expected_score = _reference_gradcam(itm, embeds, ids, mask, block_num)
    _close(heatmap, expected, rtol=1e-6)
    torch.testing.assert_close(score, expected_score)
    assert bool((heatmap >= 0).all())
    # every row equals that row computed alone (no padding)
    for b, question in enumerate(QUESTIONS):
        ids_b, mask_b = tokenize_questions(tokenizer, [question])
        alone, _ = itm.gradcam(embeds[b:b + 1], ids_b, mask_b, block_num)
        _close(heatmap[b:b + 1], alone, rtol=1e-5)


def test_gradcam_under_inference_mode(itm, tokenizer):
    ids, mask = tokenize_questions(tokenizer, QUESTIONS[:2])
    embeds = itm.encode_image(_pixels(2)).detach()
    expected, _ = itm.gradcam(embeds, ids, mask, 1)
    with torch.inference_mode():
        embeds_inf = itm.encode_image(_pixels(2))
        heatmap, _ = itm.gradcam(embeds_inf, ids, mask, 1)
    _close(heatmap, expected, rtol=1e-5)
    assert not any(p.grad is not None for p in itm.parameters())


def test_last_layer_gradcam_is_zero_and_block_num_validated(itm, tokenizer):
    ids, mask = tokenize_questions(tokenizer, QUESTIONS[:2])
    embeds = itm.encode_image(_pixels(2)).detach()
    last, _ = _reference_gradcam(itm, embeds, ids, mask, itm.num_text_layers - 1)
    assert bool((last == 0).all())
    for bad in (-1, 11, 12):
        with pytest.raises(ValueError, match=r"valid GradCAM layers are 0\.\.10"):
            itm.gradcam(embeds, ids, mask, bad)


# ---------------------------------------------------------------- generation

def _states(captioner, n: int, seed: int = 0, patches: int = 20) -> torch.Tensor:
    with torch.no_grad():
        tokens = captioner.encode_image(_pixels(n, seed))
    return tokens[:, 1:patches + 1]


def _generate(captioner, tokenizer, states, uniforms, **kw):
    kw.setdefault("eos_token_id", tokenizer.sep_token_id)
    kw.setdefault("pad_token_id", tokenizer.pad_token_id)
    return captioner.generate(states, caption_prompt_ids(tokenizer), uniforms, **kw)


def test_greedy_is_deterministic(captioner, tokenizer):
    states = _states(captioner, 3)
    first = _generate(captioner, tokenizer, states, None)
    assert torch.equal(first, _generate(captioner, tokenizer, states, None))
    assert first.shape[0] == 3 and first.shape[1] <= 20
    assert torch.equal(first[:, :4], caption_prompt_ids(tokenizer).expand(3, 4))


def _eos_biased(captioner, tokenizer, bias: float) -> BlipCaption:
    model = build_model("caption", "tiny")
    model.load_state_dict(captioner.state_dict())
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[tokenizer.sep_token_id] = bias
    return model.eval()


def _varied(captioner, tokenizer, eos_bias: float = 4.0) -> BlipCaption:
    """The tiny captioner made image-dependent (cross-attention values x50) with an eos logit
    that varies by position, so rows differ and end at different steps."""
    model = _eos_biased(captioner, tokenizer, eos_bias)
    with torch.no_grad():
        sep = tokenizer.sep_token_id
        embeddings = model.text_decoder.bert.embeddings.word_embeddings.weight
        embeddings[sep] = 0.3 * torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(0))
        for layer in model.text_decoder.bert.encoder.layer:
            layer.crossattention.self.value.weight.mul_(50)
    return model


def test_same_uniforms_same_tokens_alone_or_batched(captioner, tokenizer):
    model = _varied(captioner, tokenizer)
    states = _states(captioner, 6, seed=1)
    uniforms = torch.rand(6, 16, generator=torch.Generator().manual_seed(7))
    batch = _generate(model, tokenizer, states, uniforms)
    lengths = set()
    for i in range(6):
        alone = _generate(model, tokenizer, states[i:i + 1], uniforms[i:i + 1])[0]
        lengths.add(alone.numel())
        assert torch.equal(batch[i, :alone.numel()], alone)
        assert bool((batch[i, alone.numel():] == tokenizer.pad_token_id).all())
    assert len(lengths) > 1  # rows ended at different steps
    other = _generate(model, tokenizer, states, torch.rand(6, 16, generator=torch.Generator().manual_seed(8)))
    assert not torch.equal(other, batch)


def test_min_length_and_early_stop(captioner, tokenizer):
    model = _eos_biased(captioner, tokenizer, 50.0)  # eos wins whenever it is allowed
    states = _states(captioner, 3)
    uniforms = torch.rand(3, 16, generator=torch.Generator().manual_seed(0))
    out = _generate(model, tokenizer, states, uniforms, min_length=10)
    eos = tokenizer.sep_token_id
    assert out.shape == (3, 11)  # stops once every row has its eos at length 10
    assert not bool((out[:, :10] == eos).any())
    assert bool((out[:, 10] == eos).all())
    greedy = _generate(model, tokenizer, states, None, min_length=6)
    assert greedy.shape == (3, 7)


def test_finished_rows_are_padded(captioner, tokenizer):
    model = _varied(captioner, tokenizer, eos_bias=2.0)
    states = _states(captioner, 8, seed=3)
    uniforms = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    out = _generate(model, tokenizer, states, uniforms, min_length=5)
    eos, pad = tokenizer.sep_token_id, tokenizer.pad_token_id
    early = 0
    for row in out:
        hits = (row == eos).nonzero().flatten()
        if hits.numel():
            assert hits[0] >= 5
            assert bool((row[hits[0] + 1:] == pad).all())
            early += int(hits[0] + 1 < out.shape[1])
    assert early > 0


def _hf_twin(model, *, decoder: bool):
    """transformers' own BERT with our weights (tiny: encoder_width == hidden, so its
    cross-attention can hold them); token-type embeddings zeroed."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertLMHeadModel as HFBertLMHeadModel
    from transformers import BertModel as HFBertModel

    c = model.config.bert
    config = HFBertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                          num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                          max_position_embeddings=c.max_position, layer_norm_eps=c.layer_norm_eps,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=1,
                          is_decoder=decoder, add_cross_attention=decoder, attn_implementation="eager")
    if decoder:
        twin = HFBertLMHeadModel(config)
        prefix, state = "text_decoder.", model.state_dict()
    else:
        twin = HFBertModel(config, add_pooling_layer=False)
        prefix = "text_encoder."
        state = {k: v for k, v in model.state_dict().items() if "crossattention" not in k}
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("position_ids")}
    result = twin.load_state_dict(own, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == [
        ("bert." if decoder else "") + "embeddings.token_type_embeddings.weight"]
    with torch.no_grad():
        (twin.bert if decoder else twin).embeddings.token_type_embeddings.weight.zero_()
    return twin.eval()


def test_decoder_and_greedy_match_transformers_bert(captioner, tokenizer):
    model = _varied(captioner, tokenizer)
    twin = _hf_twin(model, decoder=True)
    states = _states(captioner, 8, seed=5)
    ids = torch.randint(7, model.config.bert.vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.decoder_logits(ids, states)
        theirs = twin(input_ids=ids, encoder_hidden_states=states).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    prompt = caption_prompt_ids(tokenizer)
    ours = _generate(model, tokenizer, states, None, max_length=20, min_length=10)
    # transformers 5.24's BERT cross-attention cache breaks generate: compare without its cache
    theirs = twin.generate(input_ids=prompt.expand(8, -1), encoder_hidden_states=states, do_sample=False,
                           max_length=20, min_length=10, eos_token_id=tokenizer.sep_token_id,
                           pad_token_id=tokenizer.pad_token_id, num_beams=1, use_cache=False)
    assert torch.equal(ours, theirs)
    assert (ours == tokenizer.sep_token_id).any(dim=1).any()


def test_text_mode_matches_transformers_bert(itm, tokenizer):
    twin = _hf_twin(itm, decoder=False)
    ids, mask = tokenize_questions(tokenizer, QUESTIONS)
    with torch.no_grad():
        ours = itm.text_encoder(ids, mask).hidden
        theirs = twin(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-5, atol=1e-5)


def test_max_length_bound(captioner, tokenizer):
    model = _eos_biased(captioner, tokenizer, -1e4)  # eos never chosen
    states = _states(captioner, 2)
    out = _generate(model, tokenizer, states, torch.rand(2, 12), max_length=16, min_length=0)
    assert out.shape == (2, 16)
    with pytest.raises(ValueError, match="uniforms must be"):
        _generate(model, tokenizer, states, torch.rand(2, 16), max_length=16)
    with pytest.raises(ValueError, match="no room"):
        _generate(model, tokenizer, states, None, max_length=4)


def test_kv_cache_equals_recomputation(captioner, tokenizer):
    states = _states(captioner, 3, seed=2)
    out = _generate(captioner, tokenizer, states, torch.rand(3, 16, generator=torch.Generator().manual_seed(3)),
                    min_length=0)
    with torch.no_grad():
        full = captioner.decoder_logits(out, states)  # no cache, teacher forced
        cross = captioner.text_decoder.bert.cross_kv(states)
        logits, cache = captioner.text_decoder(out[:, :4], cross_kv=cross, use_cache=True)
        steps = [logits]
        for t in range(4, out.shape[1]):
            logits, cache = captioner.text_decoder(out[:, t:t + 1], cross_kv=cross, cache=cache, use_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    greedy = _generate(captioner, tokenizer, states, None, min_length=0)
    with torch.no_grad():
        teacher = captioner.decoder_logits(greedy, states)
    assert torch.equal(teacher[:, 3:-1].argmax(-1), greedy[:, 4:])


# ---------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_offline(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_blip_tokenizer(TINY_TOKENIZER_DIR)
    assert len(tok) == build_model("itm", "tiny").config.bert.vocab_size
    assert tok.convert_ids_to_tokens([0, 5, 6]) == ["[PAD]", "[DEC]", "[ENC]"]
    assert tok.bos_token_id == 5 and tok.enc_token_id == 6
    words = {w for q in QUESTIONS for w in q.strip("?").split()} | {"circles", "leftmost", "purple", "orange"}
    assert tok.unk_token_id not in tok.convert_tokens_to_ids(tok.tokenize(" ".join(sorted(words))))


def test_tokenize_questions(tokenizer):
    ids, mask = tokenize_questions(tokenizer, ["What color is the circle?", "is there a red square? "])
    assert ids.shape == (2, 7)  # [ENC] + 5 words + [SEP], no '?' token
    ids, mask = tokenize_questions(tokenizer, ["What color is the circle?", "is a red square at the top?"])
    assert bool((ids[:, 0] == tokenizer.enc_token_id).all())
    assert tokenizer.convert_tokens_to_ids("?") not in ids.tolist()[0] + ids.tolist()[1]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "what color is the circle"
    assert mask.tolist() == [[1] * 7 + [0, 0], [1] * 9]  # [ENC] + words + [SEP], right padding
    long_ids, long_mask = tokenize_questions(tokenizer, ["red " * 50], max_length=35)
    assert long_ids.shape == (1, 35) and long_ids[0, -1].item() == tokenizer.sep_token_id


def test_caption_prompt(tokenizer):
    prompt = caption_prompt_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(prompt) == ["[DEC]", "a", "picture", "of"]


# ---------------------------------------------------------------- beam search and caption text

def _hf_decoder(captioner):
    """transformers' own BLIP text decoder holding our captioner's decoder weights."""
    from transformers.models.blip.configuration_blip import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

    c = captioner.config.bert
    config = BlipTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, encoder_hidden_size=c.encoder_width,
                            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                            num_attention_heads=c.num_heads, max_position_embeddings=c.max_position,
                            layer_norm_eps=c.layer_norm_eps, hidden_act="gelu", pad_token_id=c.pad_token_id,
                            bos_token_id=None, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    hf = BlipTextLMHeadModel(config).eval()
    missing, unexpected = hf.load_state_dict(captioner.text_decoder.state_dict(), strict=False)
    assert not missing and set(unexpected) <= {"bert.embeddings.position_ids"}
    return hf


def _until_eos(row, eos):
    row = row.tolist()
    return row[:row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("num_beams, min_length, penalty, length_penalty",
                         [(3, 10, 1.0, 1.0), (4, 5, 1.3, 1.0), (2, 0, 1.0, 0.5)])
def test_beam_search_equals_transformers_generate(captioner, tokenizer, num_beams, min_length, penalty,
                                                  length_penalty):
    from models.blip.beam_search import beam_search

    hf = _hf_decoder(captioner)
    prompt = caption_prompt_ids(tokenizer)
    states = _states(captioner, 3, seed=4)
    with torch.no_grad():
        ours, scores = beam_search(captioner.text_decoder, states, prompt, num_beams=num_beams, max_length=14,
                           min_length=min_length, repetition_penalty=penalty, length_penalty=length_penalty,
                           length_rule="generated", eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
        theirs = hf.generate(input_ids=prompt.expand(3, -1), encoder_hidden_states=states, num_beams=num_beams,
                             max_length=14, min_length=min_length, repetition_penalty=penalty,
                             length_penalty=length_penalty, do_sample=False, eos_token_id=tokenizer.sep_token_id,
                             pad_token_id=tokenizer.pad_token_id, early_stopping=False,
                             return_dict_in_generate=True, output_scores=True)
    for a, b in zip(ours, theirs.sequences):
        assert _until_eos(a, tokenizer.sep_token_id) == _until_eos(b, tokenizer.sep_token_id)
    assert torch.allclose(scores, theirs.sequences_scores, atol=1e-5)


def test_caption_text_is_lavis_and_never_shows_word_pieces(tokenizer):
    from stages.blip import caption_texts

    prompt = caption_prompt_ids(tokenizer)
    piece = tokenizer.convert_tokens_to_ids("##9")
    words = tokenizer.convert_tokens_to_ids(["red", "circle"])
    ids = torch.tensor([[*prompt.tolist(), piece, *words, tokenizer.sep_token_id],
                        [*prompt.tolist(), *words, tokenizer.sep_token_id, tokenizer.pad_token_id]])
    # LAVIS: decode everything, cut len("a picture of ") characters: "##9" glued to "of" goes with it
    assert caption_texts(tokenizer, ids, len(prompt), "a picture of ", "reference") == [" red circle", "red circle"]
    assert caption_texts(tokenizer, ids, len(prompt), "a picture of ", "tokens") == ["red circle", "red circle"]
