"""Dataset sources: the synthetic shapes set, VQAv2 / GQA readers and manifests."""

from __future__ import annotations

import base64
import collections
import csv
import hashlib
import io
import itertools
import json
import logging
import re

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from artifacts.columns import is_fixed_tensor, python_to_column
from shapes.dataset import render_scene
from shapes.scene import COLORS
from sources import SOURCES, GQASource, ManifestSource, ShapesSource, VQAv2Source
from sources.base import BASE_COLUMNS, ERROR

# --- helpers -----------------------------------------------------------------------------

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4"}


def vqa_normalize(answer: str) -> str:
    """The parts of the official VQA answer normalisation the shapes answers rely on."""
    words = re.sub(r"(?!<=\d)(\.)(?!\d)", "", answer.strip().lower()).split()
    words = [NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy: mean over the 10 leave-one-out subsets of min(1, matches / 3)."""
    norm = [vqa_normalize(a) for a in answers]
    pred = vqa_normalize(prediction)
    scores = [min(1.0, sum(a == pred for j, a in enumerate(norm) if j != i) / 3)
              for i in range(len(norm))]
    return sum(scores) / len(scores)


def shapes(**params) -> list[dict]:
    return list(ShapesSource(ShapesSource.Params(**params)).iter_samples())


def same_rows(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if isinstance(x[k], np.ndarray) or isinstance(y[k], np.ndarray):
                if x[k] is None or y[k] is None or not np.array_equal(x[k], y[k]):
                    return False
            elif x[k] != y[k]:
                return False
    return True


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def expected_answer(question: str, objects: list[dict]) -> tuple[str, list[int]]:
    """The answer and referred object indices, derived independently from the scene JSON."""
    def only(indices: list[int]) -> int:
        assert len(indices) == 1, question
        return indices[0]

    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        i = only([i for i, o in enumerate(objects) if o["shape"] == m[1]])
        return objects[i]["color"], [i]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        i = only([i for i, o in enumerate(objects) if o["color"] == m[1]])
        return objects[i]["shape"], [i]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        found = [i for i, o in enumerate(objects) if o["shape"] == m[1]]
        return str(len(found)), found
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        found = [i for i, o in enumerate(objects) if (o["color"], o["shape"]) == (m[1], m[2])]
        return ("yes" if found else "no"), found
    extremes = {
        "what color is the leftmost shape?": (lambda o: o["center"][0], "color"),
        "what color is the rightmost shape?": (lambda o: -o["center"][0], "color"),
        "what shape is at the top?": (lambda o: o["center"][1], "shape"),
        "what shape is at the bottom?": (lambda o: -o["center"][1], "shape"),
    }
    key, attribute = extremes[question]
    order = sorted(range(len(objects)), key=lambda i: key(objects[i]))
    if len(order) > 1:
        assert key(objects[order[1]]) - key(objects[order[0]]) > 0, question  # unambiguous
    return objects[order[0]][attribute], [order[0]]


# --- shapes ------------------------------------------------------------------------------

def test_shapes_is_deterministic_per_seed_and_image():
    a, b = shapes(seed=3, num_images=3), shapes(seed=3, num_images=3)
    assert same_rows(a, b)
    longer = shapes(seed=3, num_images=10)
    assert same_rows(a, longer[: len(a)])
    other = shapes(seed=4, num_images=3)
    assert [r["image_bytes"] for r in a] != [r["image_bytes"] for r in other]
    assert [r["question"] for r in a] != [r["question"] for r in other]


def test_shapes_rows_match_declared_columns():
    source = ShapesSource(ShapesSource.Params(num_images=4, image_size=64))
    columns = source.columns()
    rows = list(source.iter_samples())
    assert set(BASE_COLUMNS) <= set(columns)
    assert is_fixed_tensor(columns["gt_mask"].type) and list(columns["gt_mask"].type.shape) == [64, 64]
    assert columns["scene"].image_level
    for row in rows:
        assert {k for k in row if not k.startswith("_")} == columns.keys()
        assert row["image_path"] is None and isinstance(row["image_bytes"], bytes)
    for name, column in columns.items():  # every value converts to its declared Arrow type
        array = python_to_column([r[name] for r in rows], column.type, len(rows))
        assert array.type == column.type


def test_shapes_ids_grouping_and_distinct_questions():
    rows = shapes(seed=1, num_images=12, questions_per_image=5)
    image_ids = [r["image_id"] for r in rows]
    runs = [k for k, _ in itertools.groupby(image_ids)]
    assert len(runs) == len(set(runs)) == 12  # questions of an image are consecutive
    by_image = collections.defaultdict(list)
    for r in rows:
        by_image[r["image_id"]].append(r)
    for i in range(12):
        group = by_image[f"shapes-1-{i:06d}"]
        assert [r["sample_id"] for r in group] == [f"shapes-1-{i:06d}-q{k}" for k in range(len(group))]
        assert len({r["question"] for r in group}) == len(group) == 5


def test_shapes_answers_and_masks_follow_from_the_scene():
    params = ShapesSource.Params(seed=7, num_images=20, image_size=128)
    rows = list(ShapesSource(params).iter_samples())
    for row in rows:
        index = int(row["image_id"].rsplit("-", 1)[1])
        scene = render_scene(7, index, params)
        objects = json.loads(row["scene"])["objects"]
        assert [o["shape"] for o in objects] == [o.shape for o in scene.objects]
        answer, referred = expected_answer(row["question"], objects)

        answers = row["answers"]
        assert len(answers) == 10 and all(isinstance(a, str) for a in answers)
        assert answers.count(answer) >= 4
        assert collections.Counter(map(vqa_normalize, answers)).most_common(1)[0][0] == answer
        assert vqa_accuracy(answer, answers) == 1.0
        answer_types = {"count": "number", "exists": "yes/no"}
        assert row["answer_type"] == answer_types.get(row["question_type"], "other")

        if not referred:
            assert row["gt_mask"] is None
            continue
        mask = row["gt_mask"]
        assert mask.shape == (128, 128) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 1}
        assert np.array_equal(mask, np.maximum.reduce([scene.masks[i] for i in referred]))
        pixels = decode_png(row["image_bytes"])[mask.astype(bool)]
        wanted = {objects[i]["color"] for i in referred}
        assert {tuple(p) for p in np.unique(pixels, axis=0)} == {COLORS[c] for c in wanted}


def test_shapes_object_masks_are_exactly_their_coloured_pixels():
    params = ShapesSource.Params(seed=2, num_images=10, image_size=96, textured_fraction=0.5)
    for index in range(10):
        scene = render_scene(2, index, params)
        assert 2 <= len(scene.objects) <= 4
        assert len({(o.shape, o.color) for o in scene.objects}) == len(scene.objects)
        assert np.maximum.reduce(scene.masks).sum() == sum(m.sum() for m in scene.masks)  # no overlap
        for obj, mask in zip(scene.objects, scene.masks):
            ys, xs = np.nonzero(mask)
            assert obj.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0.12 * 96 - 2 <= obj.bbox[2] - obj.bbox[0] <= 0.25 * 96 + 2
        for color, rgb in COLORS.items():
            coloured = np.all(scene.image == rgb, axis=-1)
            masks = [m for o, m in zip(scene.objects, scene.masks) if o.color == color]
            expected = np.maximum.reduce(masks).astype(bool) if masks else np.zeros_like(coloured)
            assert np.array_equal(coloured, expected)


def test_shapes_question_type_coverage():
    rows = shapes(seed=0, num_images=50)
    assert len(rows) == 200
    types = collections.Counter(r["question_type"] for r in rows)
    assert set(types) == {"color", "shape", "count", "position", "exists"}
    assert min(types.values()) >= 15
    majority = [collections.Counter(r["answers"]).most_common(1)[0][0] for r in rows]
    exists = [a for a, r in zip(majority, rows) if r["question_type"] == "exists"]
    assert 0.25 < exists.count("yes") / len(exists) < 0.75
    counts = {a for a, r in zip(majority, rows) if r["question_type"] == "count"}
    assert {"0", "1", "2"} <= counts
    backgrounds = collections.Counter(json.loads(r["scene"])["background"] for r in rows[::4])
    assert backgrounds["plain"] > 0 and sum(backgrounds.values()) - backgrounds["plain"] > 0


def test_shapes_params_are_validated():
    with pytest.raises(ValidationError):
        ShapesSource.Params(min_shapes=4, max_shapes=2)
    with pytest.raises(ValidationError):
        ShapesSource.Params(num_image=3)


# --- VQAv2 / GQA -------------------------------------------------------------------------

def write_image(path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8, 3), value, np.uint8))


@pytest.fixture
def vqa_files(tmp_path):
    images = tmp_path / "val2014"
    write_image(images / "COCO_val2014_000000000042.jpg")
    write_image(images / "000000000007.jpg")  # the fallback name
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "what is it?", "question_id": 420},
            {"image_id": 7, "question": "is it red?", "question_id": 70},
            {"image_id": 42, "question": "how many?", "question_id": 421},
        ],
    }
    annotations = {"annotations": [
        {"question_id": q, "image_id": i,
         "answers": [{"answer": f"a{q}-{k}", "answer_id": k} for k in range(10)],
         "question_type": "what is", "answer_type": "other", "multiple_choice_answer": f"a{q}-0"}
        for q, i in ((420, 42), (70, 7), (421, 42))
    ]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return tmp_path


def test_vqav2_reads_groups_and_finds_images(vqa_files):
    source = VQAv2Source(VQAv2Source.Params(
        questions=str(vqa_files / "q.json"), annotations=str(vqa_files / "a.json"),
        images=str(vqa_files / "val2014")))
    assert source.problems() == []
    rows = list(source.iter_samples())
    assert [r["sample_id"] for r in rows] == ["420", "421", "70"]
    assert [r["image_id"] for r in rows] == ["42", "42", "7"]
    assert rows[0]["image_path"] == str(vqa_files / "val2014" / "COCO_val2014_000000000042.jpg")
    assert rows[2]["image_path"] == str(vqa_files / "val2014" / "000000000007.jpg")
    assert rows[0]["answers"] == [f"a420-{k}" for k in range(10)]
    assert (rows[0]["question_type"], rows[0]["answer_type"]) == ("what is", "other")
    assert all({k for k in r if not k.startswith("_")} == source.columns().keys() and r["image_bytes"] is None for r in rows)


def test_vqav2_malformed_answers_fail_only_their_question(vqa_files):
    annotations = json.loads((vqa_files / "a.json").read_text())
    annotations["annotations"][0]["answers"] = "yes"  # question 420 of image 42; 421 shares the image
    (vqa_files / "a.json").write_text(json.dumps(annotations))
    source = VQAv2Source(VQAv2Source.Params(
        questions=str(vqa_files / "q.json"), annotations=str(vqa_files / "a.json"),
        images=str(vqa_files / "val2014")))
    rows = {r["sample_id"]: r for r in source.iter_samples()}
    assert "answers are not a list" in rows["420"][ERROR]
    assert ERROR not in rows["421"] and rows["421"]["answers"] == [f"a421-{k}" for k in range(10)]
    assert ERROR not in rows["70"]


def test_vqav2_without_annotations_and_with_a_pattern(vqa_files, caplog):
    source = VQAv2Source(VQAv2Source.Params(
        questions=str(vqa_files / "q.json"), images=str(vqa_files / "val2014"),
        image_pattern="{data_subtype}/{image_id}.png"))
    with caplog.at_level(logging.WARNING):
        rows = list(source.iter_samples())
    assert all(r["answers"] is None and r["question_type"] is None for r in rows)
    assert rows[0]["image_path"] == str(vqa_files / "val2014" / "val2014" / "42.png")  # missing: not an error
    assert len([r for r in caplog.records if "image not found" in r.getMessage()]) == 1


def test_vqav2_problems_name_the_missing_paths(tmp_path):
    source = VQAv2Source(VQAv2Source.Params(
        questions=str(tmp_path / "nope.json"), annotations=str(tmp_path / "nope_a.json"),
        images=str(tmp_path / "no_images")))
    problems = dict(source.problems())
    assert set(problems) == {"questions", "annotations", "images"}
    assert "nope.json" in problems["questions"] and "no_images" in problems["images"]


def test_gqa_groups_by_image_in_order_of_first_appearance(tmp_path):
    write_image(tmp_path / "images" / "n1.jpg")
    questions = {
        "q1": {"imageId": "n1", "question": "a?", "answer": "yes",
               "types": {"structural": "verify", "semantic": "attr", "detailed": "existAttr"}},
        "q2": {"imageId": "n2", "question": "b?", "answer": "red", "types": {"structural": "query"}},
        "q3": {"imageId": "n1", "question": "c?"},
    }
    (tmp_path / "gqa.json").write_text(json.dumps(questions))
    source = GQASource(GQASource.Params(
        questions=str(tmp_path / "gqa.json"), images=str(tmp_path / "images")))
    assert source.problems() == []
    rows = list(source.iter_samples())
    assert [r["sample_id"] for r in rows] == ["q1", "q3", "q2"]
    assert [r["image_id"] for r in rows] == ["n1", "n1", "n2"]
    assert [r["answers"] for r in rows] == [["yes"], None, ["red"]]
    assert [r["question_type"] for r in rows] == ["existAttr", None, "query"]
    assert rows[0]["image_path"] == str(tmp_path / "images" / "n1.jpg")
    assert rows[2]["image_path"] == str(tmp_path / "images" / "n2.jpg")
    missing = GQASource(GQASource.Params(questions=str(tmp_path / "x.json"), images=str(tmp_path / "y")))
    assert {p for p, _ in missing.problems()} == {"questions", "images"}


# --- manifests ---------------------------------------------------------------------------

def manifest(path, **params) -> ManifestSource:
    return ManifestSource(ManifestSource.Params(path=str(path), **params))


def test_manifest_jsonl_with_relative_paths_and_base64_bytes(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    lines = [
        {"question": "q0", "image": "imgs/a.png", "answers": ["x", "y"]},
        {"question": "q1", "image": "imgs/a.png", "question_type": "what", "answer_type": "other"},
        {"question": "q2", "image_bytes": base64.b64encode(png).decode(), "sample_id": 17, "answers": "z"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    source = manifest(path)
    assert source.problems() == []
    rows = list(source.iter_samples())
    assert [r["sample_id"] for r in rows] == ["0", "1", "17"]
    assert rows[0]["image_path"] == str(tmp_path / "imgs" / "a.png") and rows[0]["image_bytes"] is None
    assert rows[0]["image_id"] == rows[1]["image_id"] == "imgs/a.png"
    assert rows[2]["image_bytes"] == png and rows[2]["image_path"] is None
    assert rows[2]["image_id"] == hashlib.sha1(png).hexdigest()
    assert [r["answers"] for r in rows] == [["x", "y"], None, ["z"]]
    assert (rows[1]["question_type"], rows[1]["answer_type"]) == ("what", "other")
    assert rows[0]["answer_type"] is None
    assert all({k for k in r if not k.startswith("_")} == source.columns().keys() for r in rows)


def test_manifest_csv_answers_and_file_order(tmp_path):
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answers", "image_id"])
        writer.writerow([str(tmp_path / "b.jpg"), "q0", '["two", "2"]', "B"])
        writer.writerow(["a.jpg", "q1", "cat", ""])
        writer.writerow([str(tmp_path / "b.jpg"), "q2", "", "B"])
    rows = list(manifest(path).iter_samples())
    assert [r["question"] for r in rows] == ["q0", "q1", "q2"]  # never reordered
    assert [r["answers"] for r in rows] == [["two", "2"], ["cat"], None]
    assert [r["image_id"] for r in rows] == ["B", "a.jpg", "B"]
    assert rows[0]["image_path"] == str(tmp_path / "b.jpg") and rows[1]["image_path"] == str(tmp_path / "a.jpg")
    assert rows[0]["question_type"] is None


def test_manifest_parquet_with_bytes_streams_batches(tmp_path):
    images = [cv2.imencode(".png", np.full((4, 4, 3), v, np.uint8))[1].tobytes() for v in range(3)]
    n = 600  # more than one Parquet batch
    table = pa.table({
        "question": [f"q{i}" for i in range(n)],
        "image_bytes": pa.array([images[i // 200] for i in range(n)], pa.binary()),
        "answers": [["yes"] if i % 2 else None for i in range(n)],
        "extra": list(range(n)),
    })
    path = tmp_path / "data.bin"
    pq.write_table(table, path, row_group_size=100)
    source = manifest(path, format="parquet")
    assert source.problems() == []
    rows = list(source.iter_samples())
    assert [r["sample_id"] for r in rows] == [str(i) for i in range(n)]
    assert rows[250]["image_bytes"] == images[1]
    assert rows[250]["image_id"] == hashlib.sha1(images[1]).hexdigest()
    assert rows[1]["answers"] == ["yes"] and rows[0]["answers"] is None
    assert len({r["image_id"] for r in rows}) == 3


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_manifest_without_question_column_is_an_error(tmp_path, suffix):
    path = tmp_path / f"bad.{suffix}"
    if suffix == "jsonl":
        path.write_text(json.dumps({"image": "a.jpg", "text": "q"}) + "\n")
    else:
        path.write_text("image,text\na.jpg,q\n")
    with pytest.raises(ValueError, match=r"bad\.%s.*'question'" % suffix):
        list(manifest(path).iter_samples())


def test_manifest_problems(tmp_path):
    assert {p for p, _ in manifest(tmp_path / "missing.jsonl").problems()} == {"path"}
    (tmp_path / "data.txt").write_text("")
    assert {p for p, _ in manifest(tmp_path / "data.txt").problems()} == {"format"}
    assert manifest(tmp_path / "data.txt", format="jsonl").problems() == []


# --- registry ----------------------------------------------------------------------------

def test_registry_names_and_strict_params():
    assert set(SOURCES) == {"shapes", "vqav2", "gqa", "manifest"}
    for name, cls in SOURCES.items():
        assert cls.name == name and cls.describe()
        with pytest.raises(ValidationError):
            cls.Params(not_a_param=1)
