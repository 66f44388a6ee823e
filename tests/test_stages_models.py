"""The BLIP and UnifiedQA stages on tiny presets: equal to the models they wrap, one image
encoding per image, caption dedup and bounded rounds, per-row determinism, the pnp_vqa graph."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from artifacts.columns import column_to_python
from conftest import GRAPHS
from models.blip.tokenizer import tokenize_questions
from runtime.api import run_graph
from stages.base import Batch
from stages.blip import Caption, ItmGradcam
from stages.qa import QAFiD
from stages.text import blip_question

QUESTIONS = ["What color is the circle?", "how many squares are there?", "Is there a red (small) triangle?"]


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 384, 384)).astype(np.float32)


def batch_of(columns: dict, image_rows, row_ids) -> Batch:
    validity = {k: np.ones(len(v), bool) for k, v in columns.items()}
    return Batch(columns, validity, list(row_ids), np.asarray(image_rows))


@pytest.fixture(scope="module")
def gradcam_stage():
    stage = ItmGradcam(ItmGradcam.Params(block_num=7))
    stage.setup("cpu")
    return stage


@pytest.fixture(scope="module")
def caption_stage():
    stage = Caption(Caption.Params(num_captions=3, max_rounds=4))
    stage.setup("cpu")
    return stage


def test_blip_question_processing():
    assert blip_question('What is "this" (really)?!  ') == "what is this really?"
    assert blip_question(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_itm_gradcam_equals_model_and_encodes_each_image_once(gradcam_stage, monkeypatch):
    model = gradcam_stage.model
    encoded = []
    original = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x: encoded.append(len(x)) or original(x))
    px = pixels(2)
    batch = batch_of({"pixels": px, "question": QUESTIONS}, [0, 1, 0], ["a", "b", "c"])
    out = gradcam_stage.process(batch)
    assert encoded == [2]  # three questions, two images: one encoding each
    assert out["heatmap"].shape == (3, 24, 24) and out["itm_score"].shape == (3,)
    ids, mask = tokenize_questions(gradcam_stage.tokenizer, [blip_question(q) for q in QUESTIONS], 35)
    with torch.no_grad():
        embeds = original(torch.from_numpy(px))[[0, 1, 0]]
    heatmap, score = model.gradcam(embeds, ids, mask, 7)
    np.testing.assert_allclose(out["heatmap"], heatmap.numpy(), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(out["itm_score"], score.numpy(), rtol=1e-6)
    assert np.abs(out["heatmap"]).max() > 0


def test_gradcam_block_num_is_validated_before_work():
    problems = ItmGradcam(ItmGradcam.Params(block_num=11)).problems()
    assert problems and problems[0][0] == "block_num" and "0..10" in problems[0][1]


def test_gradcam_block_num_defaults_to_the_presets():
    assert ItmGradcam(ItmGradcam.Params()).block_num == 7  # tiny: LAVIS's layer 7 of 12
    assert ItmGradcam(ItmGradcam.Params(preset="shapes")).block_num == 2  # 4 text layers
    assert ItmGradcam(ItmGradcam.Params(preset="shapes", block_num=1)).block_num == 1
    problems = ItmGradcam(ItmGradcam.Params(preset="shapes", block_num=3)).problems()
    assert problems[0][0] == "block_num" and "0..2" in problems[0][1]


def test_caption_dedup_and_bounded_rounds(caption_stage, monkeypatch):
    heat = np.random.default_rng(0).random((2, 24, 24)).astype(np.float32)
    batch = batch_of({"pixels": pixels(1), "heatmap": heat}, [0, 0], ["q1", "q2"])
    # the first row always decodes the same text, the second grows distinct ones
    script = iter([["same", "same", "same", "a red circle", "red circle", "a red circle on blue"]]
                  + [["same", "same", "same", "a red circle", "red", "blue square"]] * 10)

    def fake_decode(images, image_of, index, uniforms):
        assert index.shape[1:] == (3, 20) and int(index.min()) >= 1  # CLS (0) is never drawn
        texts = next(script)
        return [texts[:3], texts[3:]][:len(image_of)] if len(image_of) == 2 else [texts[:3]]

    monkeypatch.setattr(caption_stage, "_decode", fake_decode)
    out = caption_stage.process(batch)
    assert out["captions"][0] == ["same"] and out["shortfall"][0] == 2 and out["rounds"][0] == 4
    # "red circle" is a substring of a kept caption; "blue square" arrives in round 2
    assert out["captions"][1] == ["a red circle", "a red circle on blue", "blue square"]
    assert out["shortfall"][1] == 0 and out["rounds"][1] == 2


def test_caption_rows_do_not_depend_on_batch(caption_stage):
    heat = np.random.default_rng(1).random((3, 24, 24)).astype(np.float32)
    px = pixels(2, seed=3)
    both = caption_stage.process(batch_of({"pixels": px, "heatmap": heat}, [0, 1, 1], ["x", "y", "z"]))
    alone = caption_stage.process(batch_of({"pixels": px[1:], "heatmap": heat[2:]}, [0], ["z"]))
    assert both["captions"][2] == alone["captions"][0]
    assert all(len(c) == 3 and all(isinstance(t, str) and t for t in c) for c in both["captions"])
    again = caption_stage.process(batch_of({"pixels": px, "heatmap": heat}, [0, 1, 1], ["x", "y", "z"]))
    assert again["captions"] == both["captions"]


def test_caption_problems():
    assert Caption(Caption.Params(num_patches=600)).problems()[0][0] == "num_patches"
    assert Caption(Caption.Params(min_length=30)).problems()[0][0] == "min_length"


def test_qa_fid_matches_model_and_fails_rows_without_captions():
    from models.fid_t5 import make_passages, tokenize_passages

    stage = QAFiD(QAFiD.Params())
    stage.setup("cpu")
    captions = [["a red circle", "a blue square"], [], ["three shapes"]]
    batch = Batch({"question": QUESTIONS, "captions": captions}, {}, ["a", "b", "c"])
    out = stage.process(batch)
    assert batch.failures == {1: "no captions to answer from"}
    ids, mask = tokenize_passages(stage.tokenizer, [make_passages(QUESTIONS[0], captions[0], 1)], 512)
    expected = stage.tokenizer.batch_decode(stage.model.generate(ids, mask, max_new_tokens=19),
                                            skip_special_tokens=True)[0].strip()
    assert out["answer"][0] == expected and isinstance(out["answer"][2], str)


def test_qa_fid_answers_equal_the_reference_loop():
    """Packed passages, questions of several lengths and caption counts, answered in several
    decoder groups: LAVIS's answers (one padded generate per question, bench/reference_loop.py)."""
    from bench.reference_loop import forward_qa

    stage = QAFiD(QAFiD.Params(decode_tokens=120, encode_tokens=64))
    stage.setup("cpu")
    rng = np.random.default_rng(4)
    words = ["a", "red", "blue", "circle", "square", "two", "small", "triangle", "on", "the", "left", "big"]
    questions = [QUESTIONS[i % 3] + " " * i for i in range(8)]
    captions = [[" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(rng.integers(1, 12))]
                for _ in questions]
    out = stage.process(Batch({"question": questions, "captions": captions}, {}, [str(i) for i in range(8)]))
    assert out["answer"] == forward_qa({"answer": stage}, questions, captions)
    assert len(set(out["answer"])) > 1  # answers that vary with the passages


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_pnp_vqa_graph_runs(tmp_path, executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_session")
    summary = run_graph(GRAPHS / "pnp_vqa.yaml", overrides=["dataset.num_images=2", "dataset.questions_per_image=2",
                                                           "caption.num_captions=2"],
                        executor=executor, output=tmp_path / "out", cache_dir=tmp_path / "cache",
                        progress=False, device="cpu")
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert summary.samples == table.num_rows == 4 and summary.errors == 0
    heat, valid = column_to_python(table.column("gradcam.heatmap"))
    assert valid.all() and heat.shape == (4, 24, 24) and np.abs(heat).max() > 0
    rows = table.to_pylist()
    assert all(len(r["caption.captions"]) == 2 and isinstance(r["answer.answer"], str) for r in rows)
    assert all(0.0 <= r["accuracy.accuracy"] <= 1.0 for r in rows)
    assert summary.nodes["pixels"].rows == 2 and summary.nodes["gradcam"].rows == 4


def test_caption_beam_search_and_whole_image_captioning(caption_stage):
    from models.blip.beam_search import beam_search

    beam = Caption(Caption.Params(num_captions=1, decoding="beam", num_beams=3, max_rounds=2))
    beam.setup("cpu")
    px = pixels(2, seed=5)
    out = beam.process(batch_of({"pixels": px}, [0, 1], ["a", "b"]))  # no heatmap: the whole image
    assert [len(c) for c in out["captions"]] == [1, 1] and list(out["rounds"]) == [1, 1]
    # the text is beam search over every image token (CLS included), decoded as LAVIS does
    import torch

    with torch.no_grad():
        tokens = beam.model.encode_image(torch.from_numpy(px))
        ids, _ = beam_search(beam.model.text_decoder, tokens, beam.prompt_ids, num_beams=3, max_length=20,
                          min_length=10, repetition_penalty=1.0, length_penalty=1.0, length_rule="lavis",
                          eos_token_id=beam.tokenizer.sep_token_id, pad_token_id=beam.tokenizer.pad_token_id)
    want = [t[len("a picture of "):] for t in beam.tokenizer.batch_decode(ids, skip_special_tokens=True,
                                                                          clean_up_tokenization_spaces=True)]
    assert [c[0] for c in out["captions"]] == want
    # with a heatmap, beam search is deterministic per patch set (and per row)
    heat = np.random.default_rng(2).random((2, 24, 24)).astype(np.float32)
    three = Caption(Caption.Params(num_captions=3, decoding="beam", max_rounds=3))
    three.setup("cpu")
    batch = batch_of({"pixels": px, "heatmap": heat}, [0, 1], ["a", "b"])
    assert three.process(batch)["captions"] == three.process(batch)["captions"]
    # beam search on the whole image cannot give several distinct captions: refused before work
    problems = Caption(Caption.Params(num_captions=3, decoding="beam")).wiring_problems({"pixels"})
    assert problems and problems[0][0] == "params.num_captions"
