"""Bad input never gives a wrong row marked ok and never loses a run: odd image modes, huge
images, broken weights, bad dataset records, duplicate ids, bad arguments (docs/reliability.md)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import stages
from conftest import GRAPHS
from runtime.api import run_graph
from runtime.cli import main
from runtime.errors import GraphError, UsageError
from stages.base import Output, Stage
from stages.images import decode_image

IMAGE_GRAPH = """
dataset: {{source: manifest, params: {{path: {path}}}}}
nodes:
  image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
outputs: [image.size, source.answers]
"""


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def run_manifest(tmp_path, write_graph, lines, name="m.jsonl", raw: bytes | None = None, **kw):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    elif name.endswith(".csv"):
        path.write_text(lines)
    else:
        path.write_text("\n".join(json.dumps(x) for x in lines))
    graph = write_graph(IMAGE_GRAPH.format(path=path), name="g.yaml")
    summary = run_graph(graph, executor="local", output=tmp_path / "out", cache_dir=tmp_path / "cache",
                        progress=False, device="cpu", **kw)
    rows = {r["sample_id"]: r for r in pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()}
    return summary, rows


# -- image modes and sizes --------------------------------------------------------------------

def test_sixteen_bit_and_float_images_keep_their_range():
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(1, 256)  # 0 .. 65535
    got = decode_image(png_bytes(Image.fromarray(ramp)), "16-bit gray")
    assert got.shape == (1, 256, 3) and np.array_equal(got[0, :, 0], np.arange(256)) and (got[..., 0] == got[..., 2]).all()
    buf = io.BytesIO()
    Image.fromarray(ramp.astype(np.int32), mode="I").save(buf, format="TIFF")  # 32-bit integer samples
    assert np.array_equal(decode_image(buf.getvalue(), "I")[0, :, 1], np.arange(256))
    unit = np.linspace(0, 1, 11, dtype=np.float32).reshape(1, 11)
    buf = io.BytesIO()
    Image.fromarray(unit, mode="F").save(buf, format="TIFF")
    assert decode_image(buf.getvalue(), "float")[0, :, 0].tolist() == np.rint(unit[0].astype(np.float64) * 255).tolist()


def test_palette_transparency_and_gray_alpha_become_their_colours():
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1])
    pal.info["transparency"] = 1
    assert decode_image(png_bytes(pal, transparency=1), "P").tolist() == [[[255, 0, 0], [0, 0, 255]]]
    la = Image.fromarray(np.array([[[10, 0], [200, 255]]], np.uint8), mode="LA")
    assert decode_image(png_bytes(la), "LA").tolist() == [[[10, 10, 10], [200, 200, 200]]]


def test_huge_images_fail_fast_or_decode_smaller_without_a_full_buffer():
    big = png_bytes(Image.new("L", (12000, 12000)))
    assert len(big) < 600_000
    start = time.perf_counter()
    with pytest.raises(ValueError, match="12000 x 12000 .* above max_pixels"):
        decode_image(big, "big")
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing decoded
    jpeg = io.BytesIO()
    Image.new("RGB", (4000, 3000), (30, 140, 220)).save(jpeg, format="JPEG")
    small = decode_image(jpeg.getvalue(), "photo", max_pixels=1_000_000)
    assert small.shape == (750, 1000, 3) and abs(int(small[0, 0, 2]) - 220) < 4  # 1/4 scale, draft mode


# -- weights and outputs -----------------------------------------------------------------------

def test_non_finite_weights_are_refused_at_load(tmp_path):
    import torch

    from models.fusion import FusionConfig, build_fusion, load_fusion, save_fusion
    from models.weights import WeightsError

    config = FusionConfig(mode="difnet", blip_width=64, sam_dim=32, grid=4, width=32, heads=4)
    module = build_fusion(config)
    with torch.no_grad():
        module.out_proj.weight.fill_(float("nan"))
    path = save_fusion(module, config, tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match="NaN or infinite values in 1 tensors \\(out_proj.weight\\)"):
        load_fusion(path)


def cut_short(source, target, missing: int = 100):
    """``target``: a copy of ``source`` without its last ``missing`` bytes (a download that did not finish)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes()[:-missing])
    return target


def test_truncated_safetensors_fail_validation_and_loading_naming_the_file(tmp_path, monkeypatch):
    import subprocess
    import sys

    from models.blip.family import BLIP_ITM
    from models.fusion import load_fusion
    from models.weights import SHAPES_WEIGHTS_DIR, WeightsError, load_checkpoint

    fusion = cut_short(SHAPES_WEIGHTS_DIR / "fusion_difnet.safetensors", tmp_path / "fusion.safetensors")
    caption = cut_short(SHAPES_WEIGHTS_DIR / "blip_caption.safetensors", tmp_path / "caption.safetensors")
    repo = tmp_path / "hub" / "models--org--blip-itm"  # hf:org/blip-itm in a Hugging Face cache
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    hf_weights = cut_short(SHAPES_WEIGHTS_DIR / "blip_itm.safetensors", repo / "snapshots" / "abc" / "model.safetensors")
    (hf_weights.parent / "config.json").write_text(json.dumps({"model_type": "blip",
                                                               "architectures": ["BlipForImageTextRetrieval"]}))
    proc = subprocess.run([sys.executable, "-m", "runtime", "validate", str(GRAPHS / "fusion_caption.yaml"),
                           "--set", f"fusion.weights={fusion}", "--set", f"caption.checkpoint={caption}",
                           "--set", "gradcam.checkpoint=hf:org/blip-itm"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for node, field, path in (("fusion", "weights", fusion), ("caption", "checkpoint", caption),
                              ("gradcam", "checkpoint", hf_weights)):
        assert re.search(rf"node '{node}', field 'params.{field}': {re.escape(str(path))} is damaged or cut short: it has "
                         rf"\d+ bytes, its header describes \d+", proc.stderr), proc.stderr
    # a shipped preset file cut short: the preset's problem, naming the file
    shipped = tmp_path / "shipped"
    cut_short(SHAPES_WEIGHTS_DIR / "blip_itm.safetensors", shipped / "blip_itm.safetensors")
    monkeypatch.setattr("models.weights.SHAPES_WEIGHTS_DIR", shipped)
    [(field, message)] = BLIP_ITM.problems("shapes")
    assert field == "preset" and f"{shipped / 'blip_itm.safetensors'} is damaged or cut short" in message
    # loading names the file too, also where the sizes add up but safetensors refuses the header
    with pytest.raises(WeightsError, match=f"{re.escape(str(caption))} is damaged or cut short"):
        load_checkpoint(caption)
    with pytest.raises(WeightsError, match=f"{re.escape(str(fusion))} is damaged or cut short"):
        load_fusion(fusion)
    header = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for name in "ab"}).encode()
    overlapping = tmp_path / "overlapping.safetensors"
    overlapping.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(WeightsError, match=f"{re.escape(str(overlapping))} is not a readable checkpoint .*SafetensorError"):
        load_checkpoint(overlapping)


class NaNHeatmap(Stage):
    """A stage whose output goes NaN for one row, as a model with broken weights would."""

    name = "test_nan_heatmap"
    OUTPUTS = {"heatmap": Output(stages.heatmaps.tensor_type("float32", [24, 24]), "heatmap")}

    def process(self, batch):
        out = np.ones((len(batch), 24, 24), np.float32)
        out[[i for i, rid in enumerate(batch.row_ids) if rid.endswith("q1")]] = np.nan
        return {"heatmap": out}


def test_non_finite_outputs_become_error_rows(tmp_path, write_graph, monkeypatch):
    monkeypatch.setitem(stages.STAGES, NaNHeatmap.name, NaNHeatmap)
    graph = write_graph(f"""
        dataset: {{source: shapes, params: {{num_images: 2, questions_per_image: 2}}}}
        nodes:
          heat: {{stage: test_nan_heatmap}}
          metrics: {{stage: heatmap_metrics, inputs: {{heatmap: heat.heatmap, gt_mask: source.gt_mask}}}}
        outputs: [heat.heatmap, metrics.energy_in_mask]
        """)
    summary = run_graph(graph, executor="local", output=tmp_path / "o", cache_dir=tmp_path / "c", progress=False,
                        device="cpu")
    rows = pq.read_table(tmp_path / "o" / "results.parquet").to_pylist()
    bad = [r for r in rows if r["sample_id"].endswith("q1")]
    assert summary.errors == len(bad) == 2
    assert all(r["status"] == "error" and "non-finite values" in r["error"] and r["heat.heatmap"] is None for r in bad)
    assert all(r["status"] == "ok" for r in rows if r not in bad)


def test_fusion_file_that_does_not_fit_its_config_fails_validation(tmp_path):
    import torch
    from safetensors.torch import save_file

    from models.fusion import FusionConfig, build_fusion
    from models.fusion.checkpoint import FORMAT
    from runtime.graph import load_graph

    config = FusionConfig(mode="difnet", blip_width=64, sam_dim=32, grid=24, width=32, heads=4)
    state = {k: v.clone() for k, v in build_fusion(config).state_dict().items()}
    state["out_proj.weight"] = torch.zeros(64, 16)
    del state["layers.0.fc1.bias"]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"format": FORMAT, "fusion_config": config.to_json()})
    with pytest.raises(GraphError) as err:
        load_graph(GRAPHS / "fusion_caption.yaml", [f"fusion.weights={path}", "fusion.mode=difnet"], presets=["tiny"])
    text = str(err.value)
    assert "node 'fusion', field 'weights'" in text and "missing layers.0.fc1.bias" in text
    assert "out_proj.weight is (64, 16), the module needs (64, 32)" in text


# -- dataset records -----------------------------------------------------------------------------

def test_bad_values_in_a_manifest_become_error_rows_naming_line_and_field(tmp_path, write_graph):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    lines = [
        {"sample_id": "ok", "image": "a.png", "question": "what?", "answers": ["x"]},
        {"sample_id": "number", "image": "a.png", "question": 5},
        {"sample_id": "list_image_id", "image": "a.png", "image_id": ["a"], "question": "what?"},
        {"sample_id": "answers", "image": "a.png", "question": "what?", "answers": 7},
        {"sample_id": "base64", "image_bytes": "not base64 !", "question": "what?"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    raw = text.encode() + b'{"sample_id": "latin1", "image": "a.png", "question": "caf\xe9?"}\n'
    summary, rows = run_manifest(tmp_path, write_graph, None, raw=raw)
    assert rows["ok"]["status"] == "ok" and summary.errors == 5
    expect = {"number": "line 2: question must be text, got int 5",
              "list_image_id": "line 3: image_id must be text or a whole number, got list",
              "answers": "line 4: answers must be a list of answers (text), got int 7",
              "base64": "line 5: image_bytes is not valid base64",
              "latin1": "line 6: not valid UTF-8 text (byte 0xe9"}
    for sid, message in expect.items():
        assert rows[sid]["status"] == "error" and rows[sid]["error_kind"] == "source", sid
        assert str(tmp_path / "m.jsonl") in rows[sid]["error"] and message in rows[sid]["error"], rows[sid]["error"]


def test_bad_json_in_a_csv_answers_cell_is_an_error_row(tmp_path, write_graph):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    csv_text = 'sample_id,image,question,answers\nok,a.png,what?,"[""x""]"\nbad,a.png,what?,"[""x"", "\n'
    summary, rows = run_manifest(tmp_path, write_graph, csv_text, name="m.csv")
    assert rows["ok"]["status"] == "ok" and rows["ok"]["answers"] == ["x"]
    assert rows["bad"]["status"] == "error" and "line 3: answers is not a valid JSON list" in rows["bad"]["error"]


def test_broken_jsonl_lines_become_error_rows_naming_file_and_line(tmp_path, write_graph):
    import subprocess
    import sys

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    lines = ['{"sample_id": "ok", "image": "a.png", "question": "what?"}',
             '{"sample_id": "comma", "image": "a.png", "question": "what?",}',  # a trailing comma
             '{"image": "a.png", "question": "what?"', '[1, 2]', '7', 'null',
             '{"sample_id": "no_question", "image": "a.png"}', '{"image": "a.png", "question": "last?"}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    graph = write_graph(IMAGE_GRAPH.format(path=tmp_path / "m.jsonl"))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "runtime", "run", str(graph), "--executor", "local", "--quiet",
                               "--device", "cpu", "--cache", str(tmp_path / "c"), *args],
                              capture_output=True, text=True, timeout=300)

    proc = run("--output", str(tmp_path / "o"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = {r["sample_id"]: r for r in pq.read_table(tmp_path / "o" / "results.parquet").to_pylist()}
    assert rows["ok"]["status"] == rows["7"]["status"] == "ok"  # the row number of the last line, as before
    expect = {"m.jsonl:2": "line 2: not valid JSON", "m.jsonl:3": "line 3: not valid JSON",
              "m.jsonl:4": "line 4: a row must be a JSON object, got [1, 2]", "m.jsonl:5": "line 5: a row must be a "
              "JSON object, got 7", "m.jsonl:6": "line 6: a row must be a JSON object, got null",
              "no_question": "line 7: no 'question'"}
    assert len(rows) == 8
    for sid, message in expect.items():
        assert rows[sid]["status"] == "error" and rows[sid]["error_kind"] == "source", sid
        assert f"{tmp_path / 'm.jsonl'}, {message}" in rows[sid]["error"], rows[sid]["error"]
    # a file that is not JSON lines at all (a JSON array; a CSV named .jsonl) stays one exit-2 error
    for name, text in (("array.jsonl", '[\n  {"image": "a.png", "question": "q?"}\n]\n'), ("csv.jsonl", "image,question\na.png,q?\n")):
        (tmp_path / "m.jsonl").write_text(text)
        proc = run("--output", str(tmp_path / name))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{tmp_path / 'm.jsonl'}" in proc.stderr and "one JSON object per line" in proc.stderr, proc.stderr


def test_broken_gqa_and_vqav2_entries_become_error_rows(tmp_path, write_graph):
    cv2.imwrite(str(tmp_path / "1.jpg"), np.zeros((8, 8, 3), np.uint8))
    gqa = {"10": {"imageId": "1", "question": "what?", "answer": "x"}, "11": {"question": "where?"},
           "12": ["not", "an", "object"], "13": {"imageId": "1"}, "14": None}
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    graph = write_graph(f"""
        dataset: {{source: gqa, params: {{questions: {tmp_path / 'gqa.json'}, images: {tmp_path}}}}}
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path}}}}
        outputs: [image.size]
        """)
    kw = dict(executor="local", cache_dir=tmp_path / "c", progress=False, device="cpu")
    summary = run_graph(graph, output=tmp_path / "o", **kw)
    rows = {r["sample_id"]: r for r in pq.read_table(tmp_path / "o" / "results.parquet").to_pylist()}
    assert rows["10"]["status"] == "ok" and summary.errors == 4
    where = f"{tmp_path / 'gqa.json'}, question"
    for sid, message in {"11": "no imageId", "12": "must be an object with imageId and question, got list",
                         "13": "no question", "14": "must be an object with imageId and question, got NoneType"}.items():
        assert rows[sid]["error_kind"] == "source" and f"{where} '{sid}': {message}" in rows[sid]["error"], rows[sid]
    questions = {"questions": [{"question_id": 1, "image_id": 1, "question": "what?"},
                               {"question_id": 2, "image_id": 1}, {"question_id": 3, "question": "what?"}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    graph = write_graph(f"""
        dataset: {{source: vqav2, params: {{questions: {tmp_path / 'q.json'}, images: {tmp_path},
                                            image_pattern: '{{image_id}}.jpg'}}}}
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path}}}}
        outputs: [image.size]
        """, name="vqa.yaml")
    summary = run_graph(graph, output=tmp_path / "o2", **kw)
    rows = {r["sample_id"]: r for r in pq.read_table(tmp_path / "o2" / "results.parquet").to_pylist()}
    assert rows["1"]["status"] == "ok" and summary.errors == 2
    assert "q.json, questions[1]: no question" in rows["2"]["error"] and "questions[2]: no image_id" in rows["3"]["error"]


def test_duplicates_and_ambiguous_image_ids_stop_the_run_before_work(tmp_path, write_graph, calls):
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((8, 8, 3), 9 if name == "a" else 99, np.uint8))
    same_id = [{"sample_id": "1", "image": "a.png", "image_id": "img", "question": "q?"},
               {"sample_id": "2", "image": "b.png", "image_id": "img", "question": "q?"}]
    with pytest.raises(UsageError, match=r"image ids name more than one image: 'img' .*a.png.*b.png"):
        run_manifest(tmp_path, write_graph, same_id)
    dup = [{"sample_id": "1", "image": "a.png", "question": "q?"}, {"sample_id": "1", "image": "b.png", "question": "r?"}]
    with pytest.raises(UsageError, match=r"1 duplicate sample ids: '1' \(.*line 1 and .*line 2\)"):
        run_manifest(tmp_path, write_graph, dup)
    assert sum(calls.values()) == 0 and not (tmp_path / "out" / "results.parquet").exists()


@pytest.fixture
def vqa_files(tmp_path):
    images = tmp_path / "coco"
    images.mkdir()
    for image_id in (1, 2):
        cv2.imwrite(str(images / f"COCO_val2014_{image_id:012d}.jpg"), np.zeros((8, 8, 3), np.uint8))
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 10, "image_id": 1, "question": "what?"},
        {"question_id": 11, "image_id": "banana", "question": "what?"},
        {"question_id": 12, "image_id": 2, "question": "what?"}]}
    annotations = {"annotations": [{"question_id": q, "answers": [{"answer": "x", "answer_id": 1}],
                                    "question_type": "what", "answer_type": "other"} for q in (10, 11, 12)]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return tmp_path


def vqa_graph(write_graph, folder, questions="q.json", annotations="a.json"):
    return write_graph(f"""
        dataset: {{source: vqav2, params: {{questions: {folder / questions}, annotations: {folder / annotations},
                                            images: {folder / 'coco'}}}}}
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path}}}}
        outputs: [image.size]
        """, name="vqa.yaml")


def test_vqav2_records_and_files_that_are_wrong(vqa_files, write_graph):
    kw = dict(executor="local", cache_dir=vqa_files / "cache", progress=False, device="cpu")
    summary = run_graph(vqa_graph(write_graph, vqa_files), output=vqa_files / "o", **kw)
    rows = {r["sample_id"]: r for r in pq.read_table(vqa_files / "o" / "results.parquet").to_pylist()}
    assert rows["10"]["status"] == rows["12"]["status"] == "ok" and summary.errors == 1
    assert "questions[1]: image_id must be a COCO image number, got str 'banana'" in rows["11"]["error"]
    # the annotations file given as questions file, and the other way round: exit 2 naming the file
    with pytest.raises(UsageError, match=r"a.json: no 'questions' list \(this looks like an annotations file\)"):
        run_graph(vqa_graph(write_graph, vqa_files, questions="a.json"), output=vqa_files / "o2", **kw)
    with pytest.raises(UsageError, match=r"q.json: no 'annotations' list \(this looks like a questions file\)"):
        run_graph(vqa_graph(write_graph, vqa_files, annotations="q.json"), output=vqa_files / "o3", **kw)
    data = json.loads((vqa_files / "q.json").read_text())
    del data["questions"][2]["question_id"]
    (vqa_files / "q2.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match=r"q2.json, questions\[2\]: no question_id"):
        run_graph(vqa_graph(write_graph, vqa_files, questions="q2.json"), output=vqa_files / "o4", **kw)
    data = json.loads((vqa_files / "q.json").read_text())
    data["questions"][2]["question_id"] = 10
    (vqa_files / "q3.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match=r"duplicate sample ids: '10'"):
        run_graph(vqa_graph(write_graph, vqa_files, questions="q3.json"), output=vqa_files / "o5", **kw)


# -- the command line ------------------------------------------------------------------------------

def test_argument_errors_exit_2_naming_the_argument(tmp_path, capsys):
    oracle = str(GRAPHS / "oracle_heatmap.yaml")
    base = ["run", oracle, "--executor", "local", "--quiet", "--device", "cpu"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ([*base, "--set", "points.num_points=[1,2", "--output", str(tmp_path / "o")], "points.num_points"),
        ([*base, "--cache", str(a_file), "--output", str(tmp_path / "o")], "--cache"),
        ([*base, "--output", str(a_file)], "--output"),
        ([*base, "--ids", "nosuch,other", "--output", str(tmp_path / "o")], "--ids: none of the 2 ids"),
        (["cache", "gc", "--cache", str(tmp_path / "c"), "--older-than", "-1"], "--older-than"),
        (["cache", "gc", "--cache", str(tmp_path / "c"), "--stage", "nosuch"], "--stage nosuch"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err


def test_source_params_out_of_range_fail_validation_naming_file_field_and_range(tmp_path, write_graph):
    import subprocess
    import sys

    from runtime.graph import load_graph

    oracle = GRAPHS / "oracle_heatmap.yaml"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runtime", "validate", str(oracle), "--set", "dataset.image_size=20000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (f"{oracle}, field 'dataset.params.image_size'" in proc.stderr
            and "at least 32 and at most 4096" in proc.stderr and "got 20000" in proc.stderr), proc.stderr
    assert time.monotonic() - started < 60  # refused from the params, not after drawing an image
    for override, allowed in (("num_images=1000000000", "at most 1000000"), ("questions_per_image=1000", "at most 100")):
        with pytest.raises(GraphError, match=rf"field 'dataset.params.{override.split('=')[0]}': .*{allowed}"):
            load_graph(oracle, [f"dataset.{override}"])
    for pattern, why in (("x.jpg", "has no {image_id}"), ("{imageid}.jpg", "KeyError: 'imageid'")):
        graph = write_graph(f"""
            dataset: {{source: gqa, params: {{questions: q.json, images: img, image_pattern: '{pattern}'}}}}
            nodes:
              image: {{stage: load_image, inputs: {{image_path: source.image_path}}}}
            outputs: [image.size]
            """)
        with pytest.raises(GraphError, match=rf"g.yaml, field 'dataset.params.image_pattern': .*{re.escape(why)}"):
            load_graph(graph)


def test_error_messages_carry_no_memory_addresses(tmp_path, write_graph):
    lines = [{"sample_id": str(i), "image_bytes": base64.b64encode(b"garbage").decode(), "image_id": str(i),
              "question": "q?"} for i in range(2)]
    _, rows = run_manifest(tmp_path, write_graph, lines)
    messages = {r["error"] for r in rows.values()}
    assert len(messages) == 1 and "0x" not in messages.pop()


def test_progress_without_a_terminal_is_plain_lines(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "RUNTIME_PROGRESS_SECONDS": "0"}
    proc = subprocess.run([sys.executable, "-m", "runtime", "run", str(GRAPHS / "oracle_heatmap.yaml"), "--executor",
                           "local", "--device", "cpu", "--set", "shard_size=8", "--set", "dataset.num_images=4",
                           "--output", str(tmp_path / "o"), "--cache", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[progress]")]
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    assert lines[-1].startswith("[progress] 16/16 samples") and len(lines) >= 7


def test_the_reliability_table_names_real_tests():
    import re

    root = GRAPHS.parent
    table = (root / "docs" / "reliability.md").read_text()
    cited = re.findall(r"`(test_\w+\.py)::(test_\w+)`", table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(rows) >= 30 and all(re.search(r"`test_\w+\.py::test_\w+`", row) for row in rows)
    for file, name in cited:
        source = (root / "tests" / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} is not a test"
