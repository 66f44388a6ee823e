"""FiD T5 (UnifiedQA-v2): reference passage format, FiD encoding = per-passage T5 encoding,
generation (greedy / beams / batched), loading a Hugging Face folder, weights errors."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from conftest import hub_snapshot
from models import fid_t5, fid_t5_family
from models.fid_t5 import (FID_T5, TINY_TOKENIZER_DIR, FiDT5, load_fid_t5, make_passages, passage_token_ids,
                           tokenize_passages)
from models.weights import WEIGHTS_ENV, WeightsError

BS = "\\"  # one backslash character
REFERENCE_README = Path(__file__).resolve().parents[2] / "shared" / "reference" / "README.md"
BASE_NAME = "unifiedqa-v2-t5-base-1363200"


@pytest.fixture(scope="module")
def tiny():
    return load_fid_t5("tiny")


@pytest.fixture(scope="module")
def batch(tiny):
    """Two samples with different passage counts and lengths: ids, mask ``[2, 3, L]``."""
    _, tok = tiny
    passages = [
        make_passages("What color is the circle?", ["a red circle", "a blue square", "two green diamonds",
                                                    "a yellow triangle at the top"], 2),  # 2 passages
        make_passages("how many squares are there?", ["two squares", "a square and a circle",
                                                      "an image with three purple objects"], 1),  # 3
    ]
    return passages, *tokenize_passages(tok, passages)


# ---------------------------------------------------------------- passages (reference format)

def test_passages_one_caption_each():
    got = make_passages("  What color is the Circle? ", [" A red circle ", "a BLUE square"], 1)
    assert got == [
        "what color is the circle? " + BS + "n a red circle.",
        "what color is the circle? " + BS + "n a blue square.",
    ]
    assert got[0] == r"what color is the circle? \n a red circle."
    assert "\n" not in "".join(got)  # backslash + n, never a newline


def test_passages_grouped_with_remainder_group():
    caps = ["c1", "C2", "c3 ", "c4", "c5"]
    q = "Is there a red square?"
    assert make_passages(q, caps, 2) == [
        r"is there a red square? \n c1. c2.",
        r"is there a red square? \n c3. c4.",
        r"is there a red square? \n c5.",
    ]
    assert make_passages(q, caps, 5) == [r"is there a red square? \n c1. c2. c3. c4. c5."]
    assert make_passages(q, caps, 10) == [r"is there a red square? \n c1. c2. c3. c4. c5."]
    assert make_passages(q, caps[:4], 2) == [r"is there a red square? \n c1. c2.", r"is there a red square? \n c3. c4."]


def test_passages_num_captions_as_in_reference():
    caps = ["c1", "c2", "c3", "c4", "c5"]
    # only the first num_captions captions are used; the last of them closes the last group
    assert make_passages("q?", caps, 2, num_captions=3) == [r"q? \n c1. c2.", r"q? \n c3."]
    # fewer captions than num_captions: the trailing incomplete group is never closed (dropped)
    assert make_passages("q?", caps, 2, num_captions=6) == [r"q? \n c1. c2.", r"q? \n c3. c4."]
    assert make_passages("q?", caps, 3, num_captions=100) == [r"q? \n c1. c2. c3."]
    assert make_passages("q?", [], 1) == []
    with pytest.raises(ValueError):
        make_passages("q?", caps, 0)


def test_tiny_tokenizer(tiny):
    _, tok = tiny
    fast = PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    for t in (tok, fast):
        assert (t.pad_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2)
        ids = t(r"What color is the circle? \n a red circle.")["input_ids"]
        assert t.convert_ids_to_tokens(ids) == ["what", "color", "is", "the", "circle", "?", BS, "n", "a",
                                                "red", "circle", ".", "</s>"]
        assert t.decode(ids, skip_special_tokens=True) == r"what color is the circle? \ n a red circle."


def test_tiny_tokenizer_covers_the_shapes_dataset(tiny):
    _, tok = tiny
    from shapes.questions import NUMBER_WORDS, ask_questions, human_answers
    from shapes.scene import COLORS, SHAPES, draw_scene

    texts = list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(NUMBER_WORDS) + ["yes", "no"]
    texts += ["0 1 2 3 4 5 6 7 8 9 10", r"what shape is at the bottom? \n a picture of an image with a left "
              "and a right object. what color is the leftmost shape? the rightmost? at the top"]
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = draw_scene(rng, 128, 1, 5, 0.0)
        for q in ask_questions(rng, scene, 8):
            texts += [q.text, *human_answers(rng, q.answer)]
    ids = tok(texts)["input_ids"]
    unknown = {w for text, row in zip(texts, ids) if tok.unk_token_id in row for w in text.split()}
    assert not unknown


# ---------------------------------------------------------------- FiD encoding and generation

def test_encode_is_per_passage_encoding_concatenated(tiny, batch):
    model, _ = tiny
    _, ids, mask = batch
    b, n, length = ids.shape
    with torch.no_grad():
        hidden, fused_mask = model.encode(ids, mask)
        assert hidden.shape == (b, n * length, model.config.d_model)
        for i in range(b):
            per_passage = [model.t5.encoder(input_ids=ids[i, j:j + 1], attention_mask=mask[i, j:j + 1])
                           .last_hidden_state[0] for j in range(n)]
            torch.testing.assert_close(hidden[i], torch.cat(per_passage), atol=1e-6, rtol=0)
            assert torch.equal(fused_mask[i], mask[i].reshape(-1))
    assert not torch.isnan(hidden).any()  # fully masked padding passages stay finite


def _manual_greedy(model: FiDT5, ids, mask, max_new_tokens: int, min_new_tokens: int = 0):
    cfg = model.config
    with torch.no_grad():
        hidden, fused = model.encode(ids, mask)
        enc = BaseModelOutput(last_hidden_state=hidden)
        out = torch.full((ids.size(0), 1), cfg.decoder_start_token_id, dtype=torch.long)
        done = torch.zeros(ids.size(0), dtype=torch.bool)
        for step in range(max_new_tokens):
            logits = model.t5(encoder_outputs=enc, attention_mask=fused, decoder_input_ids=out).logits[:, -1]
            if step < min_new_tokens:
                logits[:, cfg.eos_token_id] = -float("inf")
            nxt = torch.where(done, torch.full_like(done, cfg.pad_token_id, dtype=torch.long), logits.argmax(-1))
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == cfg.eos_token_id
            if done.all():
                break
    return out


@pytest.mark.parametrize("max_new, min_new", [(20, 0), (6, 3)])
def test_greedy_generate_equals_manual_loop(tiny, batch, max_new, min_new):
    model, _ = tiny
    _, ids, mask = batch
    got = model.generate(ids, mask, max_new_tokens=max_new, min_new_tokens=min_new)
    assert got.dtype == torch.long and got.shape[0] == 2 and got.shape[1] <= max_new + 1
    assert torch.equal(got, _manual_greedy(model, ids, mask, max_new, min_new))


def test_greedy_stops_at_eos_and_pads(tiny, batch):
    """Make a token the tiny model emits at step >= 2 the end token: generation stops there
    (pads the finished row) unless ``min_new_tokens`` forbids it; equal to the manual loop."""
    model, _ = tiny
    _, ids, mask = batch
    plain = model.generate(ids, mask, max_new_tokens=8)[0].tolist()
    stop = next(i for i in range(2, len(plain)) if plain[i] not in plain[:i])
    eos = plain[stop]
    other = copy.deepcopy(model)
    other.t5.config.eos_token_id = other.t5.generation_config.eos_token_id = eos
    for min_new in (0, 4):
        got = other.generate(ids, mask, max_new_tokens=8, min_new_tokens=min_new)
        assert torch.equal(got, _manual_greedy(other, ids, mask, 8, min_new))
        row = got[0].tolist()
        if min_new == 0:
            assert row.index(eos) == stop and set(row[stop + 1:]) <= {0}  # stopped, then padded
        else:
            assert eos not in row[1:min_new + 1]  # position 0 is the start token


def test_forward_logits_match_t5_on_fused_encoding(tiny, batch):
    model, _ = tiny
    _, ids, mask = batch
    dec = torch.tensor([[0, 5, 7], [0, 9, 1]])
    with torch.no_grad():
        hidden, fused = model.encode(ids, mask)
        ref = model.t5(encoder_outputs=(hidden,), attention_mask=fused, decoder_input_ids=dec).logits
        torch.testing.assert_close(model(ids, mask, dec).logits, ref, atol=1e-6, rtol=0)


def _strip(row: torch.Tensor) -> list[int]:
    tokens = row.tolist()
    while len(tokens) > 1 and tokens[-1] == 0:
        tokens.pop()
    return tokens


@pytest.mark.parametrize("beams", [1, 3])
def test_batch_equals_one_by_one(tiny, batch, beams):
    model, tok = tiny
    passages, ids, mask = batch
    together = model.generate(ids, mask, num_beams=beams, max_new_tokens=8, min_new_tokens=2)
    assert together.shape[0] == 2 and together[:, 0].eq(0).all()
    for i, sample in enumerate(passages):
        one_ids, one_mask = tokenize_passages(tok, [sample])
        alone = model.generate(one_ids, one_mask, num_beams=beams, max_new_tokens=8, min_new_tokens=2)
        assert _strip(alone[0]) == _strip(together[i])


@pytest.mark.parametrize("chunk_tokens", [1, 20, 4096])  # one passage per call, a few, all at once
def test_encode_packed_is_encode_without_padding(tiny, batch, chunk_tokens):
    model, tok = tiny
    passages, ids, mask = batch
    with torch.no_grad():
        hidden, fused_mask = model.encode(ids, mask)
        packed, packed_mask = model.encode_packed(passage_token_ids(tok, passages), chunk_tokens)
    for i in range(len(passages)):
        real = hidden[i][fused_mask[i].bool()]                       # [T_i, d]: the real tokens in order
        assert packed_mask[i].sum() == len(real) and packed_mask[i, :len(real)].all()
        torch.testing.assert_close(packed[i, :len(real)], real, atol=1e-5, rtol=1e-5)
        assert not packed[i, len(real):].any()
    assert packed.shape[1] == max(int(m.sum()) for m in fused_mask)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_packed_equals_generate(tiny, batch, beams):
    model, tok = tiny
    passages, ids, mask = batch
    padded = model.generate(ids, mask, num_beams=beams, max_new_tokens=8, min_new_tokens=2)
    packed = model.generate_packed(passage_token_ids(tok, passages), num_beams=beams, max_new_tokens=8,
                                   min_new_tokens=2, chunk_tokens=30)
    assert [_strip(r) for r in packed] == [_strip(r) for r in padded]


def test_passage_token_ids_are_the_real_tokens(tiny, batch):
    _, tok = tiny
    passages, ids, mask = batch
    for i, sample in enumerate(passage_token_ids(tok, passages)):
        assert len(sample) == len(passages[i])
        for j, row in enumerate(sample):
            assert row == ids[i, j][mask[i, j].bool()].tolist()


def test_beam_search_returns_sequences(tiny, batch):
    model, _ = tiny
    _, ids, mask = batch
    out = model.generate(ids, mask, num_beams=3, max_new_tokens=5)
    assert out.dtype == torch.long and out.shape[0] == 2 and 2 <= out.shape[1] <= 6


def test_tiny_is_deterministic_and_fingerprinted(tiny):
    model, _ = tiny
    again, _ = load_fid_t5("tiny")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert not model.training
    assert FID_T5.fingerprint("tiny") == FID_T5.fingerprint("tiny")
    assert re.fullmatch(r"[0-9a-f]{32}", FID_T5.fingerprint("tiny"))


# ---------------------------------------------------------------- real presets: local folders

def test_load_real_layout_folder(tiny, batch, tmp_path, monkeypatch):
    model, tok = tiny
    _, ids, mask = batch
    folder = tmp_path / "weights" / BASE_NAME
    model.t5.save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    expected = model.generate(ids, mask, max_new_tokens=6)
    for loaded, loaded_tok in (load_fid_t5("base"), load_fid_t5("base", folder), load_fid_t5("tiny", folder)):
        assert isinstance(loaded, FiDT5) and not loaded.training
        assert loaded_tok(r"is there a red circle? \n a circle.")["input_ids"] == \
            tok(r"is there a red circle? \n a circle.")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(ids, mask)[0], model.encode(ids, mask)[0], atol=0, rtol=0)
        assert torch.equal(loaded.generate(ids, mask, max_new_tokens=6), expected)
    assert FID_T5.find("base") == folder and FID_T5.find("tiny") is None
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # the same folder as a Hugging Face id
    snapshot = hub_snapshot(tmp_path / "hub", "allenai/unifiedqa-v2-t5-base-1363200", folder)
    assert FID_T5.find("base", "hf:allenai/unifiedqa-v2-t5-base-1363200") == snapshot
    assert FID_T5.fingerprint("base", "hf:allenai/unifiedqa-v2-t5-base-1363200") == FID_T5.fingerprint("base")
    assert FID_T5.fingerprint("base") == FID_T5.fingerprint("base", folder)
    before = FID_T5.fingerprint("base")
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("\"d_ff\": 128", "\"d_ff\": 129"))
    assert FID_T5.fingerprint("base") != before


def test_missing_folder_or_files_is_a_weights_error(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(WeightsError, match=rf"{BASE_NAME}.*huggingface\.co/allenai/{BASE_NAME}"):
        load_fid_t5("base")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(WeightsError, match="unifiedqa-v2-t5-large-1363200.*huggingface.co/allenai/"
                                           "unifiedqa-v2-t5-large-1363200"):
        load_fid_t5("large")
    with pytest.raises(WeightsError, match=rf"{BASE_NAME}.*huggingface\.co/allenai/{BASE_NAME}"):
        load_fid_t5("base", tmp_path / "nowhere")
    folder = tmp_path / "unifiedqa-v2-t5-3b-1363200"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"lacks model weights.*tokenizer.*huggingface\.co/allenai/"):
        load_fid_t5("3b")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "spiece.model").write_bytes(b"")
    monkeypatch.setattr(fid_t5_family, "_has_sentencepiece", lambda: False)
    with pytest.raises(WeightsError, match=r"spiece\.model only.*pip install sentencepiece"):
        load_fid_t5("3b")
    with pytest.raises(ValueError, match="unknown FiD T5 preset"):
        load_fid_t5("xl")
    with pytest.raises(WeightsError, match="lacks config.json"):
        load_fid_t5("tiny", tmp_path)


def test_t5_base_state_dict_matches_reference_count():
    if not REFERENCE_README.exists():
        pytest.skip(f"reference facts not found at {REFERENCE_README}")
    stated = re.search(r"t5-base: (\d+) entries", REFERENCE_README.read_text())
    if stated is None:
        pytest.skip("the reference README states no t5-base entry count")
    cfg = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                   num_heads=12, feed_forward_proj="relu", tie_word_embeddings=True)
    with torch.device("meta"):
        fid = FiDT5(T5ForConditionalGeneration(cfg))
    keys = fid.t5.state_dict()
    assert len(keys) == int(stated.group(1)) == 260
    assert "lm_head.weight" in keys and fid.t5.lm_head.weight is fid.t5.shared.weight
    assert len(fid.state_dict()) == len(keys)  # the FiD wrapper adds no parameters


# ---------------------------------------------------------------- the shapes preset (bundled weights file)

def _shapes_file(tmp_path, name="fid_t5.safetensors", seed=5):
    """A shapes-architecture weights file (a random init other than the preset's own)."""
    from safetensors.torch import save_file

    model, _ = fid_t5.build_fid_t5("shapes", seed=seed)
    path = tmp_path / name
    save_file(fid_t5.fid_t5_state(model), str(path), metadata={"format": fid_t5.WEIGHTS_FORMAT, "preset": "shapes"})
    return model, path


def test_shapes_preset_builds_small_with_the_tiny_tokenizer():
    model, tok = fid_t5.build_fid_t5("shapes")
    cfg = model.config
    assert "shapes" in FID_T5.built_in
    assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers, cfg.num_heads) == (128, 512, 3, 3, 4)
    assert cfg.vocab_size == len(tok) and tok.pad_token_id == cfg.pad_token_id == 0
    assert cfg.dropout_rate == 0.0 and cfg.tie_word_embeddings
    state = fid_t5.fid_t5_state(model)
    assert sum(v.numel() * v.element_size() for v in state.values()) < 6e6  # < 6 MB float32
    # the tied embeddings are stored once
    assert "shared.weight" in state and not {"lm_head.weight", "encoder.embed_tokens.weight"} & set(state)
    again, _ = fid_t5.build_fid_t5("shapes")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_shapes_weights_file_round_trip(tmp_path, batch):
    from models.weights import file_fingerprint

    model, path = _shapes_file(tmp_path)
    passages, ids, mask = batch
    loaded, tok = load_fid_t5("shapes", path)
    assert isinstance(loaded, FiDT5) and not loaded.training
    assert loaded.t5.lm_head.weight is loaded.t5.shared.weight  # still tied after loading
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=4), model.generate(ids, mask, max_new_tokens=4))
    assert FID_T5.find("shapes", path) == path
    assert FID_T5.fingerprint("shapes", path) == file_fingerprint(path)
    with pytest.raises(WeightsError, match="'shapes' FiD T5, not 'tiny'"):
        load_fid_t5("tiny", path)
    with pytest.raises(WeightsError, match="not found"):
        load_fid_t5("shapes", tmp_path / "missing.safetensors")
    tiny_model, _ = load_fid_t5("tiny")
    from safetensors.torch import save_file

    save_file(fid_t5.fid_t5_state(tiny_model), str(tmp_path / "tiny.safetensors"))  # no metadata
    with pytest.raises(WeightsError, match="does not fit the model"):
        load_fid_t5("shapes", tmp_path / "tiny.safetensors")


def test_shapes_preset_reads_the_bundled_file(tmp_path, monkeypatch):
    from models import weights
    from stages.qa import QAFiD

    monkeypatch.setattr(weights, "SHAPES_WEIGHTS_DIR", tmp_path / "shapes")
    with pytest.raises(WeightsError, match=r"shapes.*fid_t5\.safetensors.*missing.*bin/train-shapes fid"):
        load_fid_t5("shapes")
    with pytest.raises(WeightsError, match="bin/train-shapes fid"):
        FID_T5.fingerprint("shapes")
    stage = QAFiD(QAFiD.Params(preset="shapes"))
    assert [field for field, _ in stage.problems()] == ["preset"]
    (tmp_path / "shapes").mkdir()
    model, path = _shapes_file(tmp_path / "shapes")
    assert FID_T5.find("shapes") == path
    loaded, _ = load_fid_t5("shapes")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert FID_T5.fingerprint("shapes") == FID_T5.fingerprint("shapes", path) != FID_T5.fingerprint("tiny")
    assert stage.problems() == [] and stage.weights_fingerprint() == FID_T5.fingerprint("shapes")
