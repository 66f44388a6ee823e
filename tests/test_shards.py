"""Stable shards: content-defined boundaries, so edits to the dataset recompute only the shards
around them; order-free node fingerprints; image files count by content."""

from __future__ import annotations

import json
import random
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from artifacts.columns import TensorSpec

from runtime.api import run_graph
from runtime.shards import MAX_FACTOR, iter_shards
from sources.base import Source
from stages.base import Granularity, Input, Output, Stage

SIZE = 16


class ListSource(Source):
    """Records given in memory (image bytes unique per image)."""

    name = "list"

    def __init__(self, records: list[dict[str, Any]]):
        super().__init__(Source.Params())
        self.records = records

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        return iter([dict(r) for r in self.records])


def dataset(images=200, questions=4) -> list[dict[str, Any]]:
    return [{"sample_id": f"img{i:04d}-q{q}", "image_id": f"img{i:04d}", "question": f"question {q} of {i}?",
             "image_bytes": f"pixels of image {i}".encode(), "image_path": None, "answers": None,
             "question_type": None}
            for i in range(images) for q in range(questions)]


def identities(records, **kw) -> list[str]:
    """What a node reading the question and the image sees of each shard."""
    return [s.source_fingerprint(["question", "image_bytes"], per_image=False)
            for s in iter_shards(ListSource(records), SIZE, **kw)]


def new_shards(before: list[str], after: list[str]) -> int:
    return len(set(after) - set(before))


def test_boundaries_keep_images_whole_and_sizes_bounded():
    shards = list(iter_shards(ListSource(dataset(images=500, questions=3)), SIZE))
    sizes = [s.num_samples for s in shards]
    assert sum(sizes) == 1500 and max(sizes) <= MAX_FACTOR * SIZE + 3
    assert 0.6 * SIZE < np.mean(sizes) < 1.6 * SIZE
    seen = set()
    for s in shards:
        images = set(s.table.column("image_id").to_pylist())
        assert not images & seen  # no image in two shards
        seen |= images


def test_edits_recompute_only_the_shards_around_them():
    records = dataset()
    base = identities(records)
    assert len(base) > 25
    rng = random.Random(0)
    # eight questions dropped: each touches its own shard (and a neighbour if it was a cut)
    dropped = [r for i, r in enumerate(records) if i not in set(rng.sample(range(len(records)), 8))]
    assert new_shards(base, identities(dropped)) <= 16
    # a question appended to the last image, or removed from the first
    appended = records + [{**records[-1], "sample_id": "img0199-q9", "question": "one more?"}]
    assert new_shards(base, identities(appended)) == 1
    assert new_shards(base, identities(records[1:])) == 1
    # another --limit: every shard before the cut is shared
    limited = identities(records, limit=400)
    assert new_shards(base, limited) <= 1 and len(limited) > 10
    # a subset of the images (20 of 200 removed)
    gone = {f"img{i:04d}" for i in rng.sample(range(200), 20)}
    assert new_shards(base, identities([r for r in records if r["image_id"] not in gone])) <= 40
    # reordering: the two halves swapped changes only the shards at the seams; questions
    # reordered inside their images change nothing
    half = len(records) // 2
    assert new_shards(base, identities(records[half:] + records[:half])) <= 3
    shuffled = []
    for i in range(0, len(records), 4):
        group = records[i:i + 4]
        shuffled += group[::-1]
    assert new_shards(base, identities(shuffled)) == 0


def test_node_fingerprints_read_only_their_columns():
    records = dataset(images=20)
    edited = [dict(r, answers=["new"]) if r["sample_id"] == "img0003-q1" else r for r in records]
    a = list(iter_shards(ListSource(records), SIZE))
    b = list(iter_shards(ListSource(edited), SIZE))
    assert [s.source_fingerprint(["question"], False) for s in a] == \
        [s.source_fingerprint(["question"], False) for s in b]
    assert [s.source_fingerprint(["answers"], False) for s in a] != \
        [s.source_fingerprint(["answers"], False) for s in b]
    # a new question on an image does not change what per-image nodes see
    more = records + [{**records[-1], "sample_id": "img0019-q9"}]
    c = list(iter_shards(ListSource(more), SIZE))
    assert c[-1].source_fingerprint(["image_bytes"], True) == a[-1].source_fingerprint(["image_bytes"], True)
    assert c[-1].source_fingerprint(["image_bytes"], False) != a[-1].source_fingerprint(["image_bytes"], False)


def _manifest(tmp_path, records, name="m.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def _image_files(folder, n):
    import cv2

    folder.mkdir(exist_ok=True)
    for i in range(n):
        img = np.zeros((24, 24, 3), np.uint8)
        img[i % 24, :, 0] = 255
        img[:, (i * 7) % 24, 1] = 200
        cv2.imwrite(str(folder / f"{i}.png"), img)


class ImageMean(Stage):
    """Mean pixel of each image (a cacheable per-image stage for these tests)."""

    name = "test_image_mean"
    granularity = Granularity.IMAGE
    INPUTS = {"image": Input(TensorSpec("uint8", None, ndim=3), "pixels")}
    OUTPUTS = {"mean": Output(pa.float32(), "mean pixel")}

    def process(self, batch):
        return {"mean": np.array([im.mean() for im in batch["image"]], np.float32)}


class QuestionLength(Stage):
    """Characters of the question, plus the image's mean (a cacheable per-sample stage)."""

    name = "test_question_length"
    INPUTS = {"question": Input(pa.string(), "question"), "mean": Input(pa.float32(), "image mean")}
    OUTPUTS = {"score": Output(pa.float32(), "length + mean")}

    def process(self, batch):
        return {"score": np.array([len(q) for q in batch["question"]], np.float32) + batch["mean"]}


GRAPH = """
dataset: {{source: manifest, params: {{path: {path}}}}}
shard_size: 8
nodes:
  image: {{stage: load_image, inputs: {{image_path: source.image_path}}}}
  mean: {{stage: test_image_mean, inputs: {{image: image.image}}}}
  points: {{stage: test_question_length, inputs: {{question: source.question, mean: mean.mean}}}}
outputs: [points.score]
"""


def test_runs_reuse_unchanged_shards_and_moved_images(tmp_path, write_graph, monkeypatch):
    import stages

    monkeypatch.setitem(stages.STAGES, ImageMean.name, ImageMean)
    monkeypatch.setitem(stages.STAGES, QuestionLength.name, QuestionLength)
    images = tmp_path / "images"
    _image_files(images, 40)
    records = [{"sample_id": f"{i}-{q}", "image_id": str(i), "image": str(images / f"{i}.png"),
                "question": f"where is thing {q}?"} for i in range(40) for q in range(3)]
    graph = write_graph(GRAPH.format(path=_manifest(tmp_path, records)))
    run = dict(executor="local", cache_dir=tmp_path / "cache", progress=False, device="cpu")
    first = run_graph(graph, output=tmp_path / "a", **run)
    total = first.shards
    # drop two questions: only their shards run again
    graph2 = write_graph(GRAPH.format(path=_manifest(tmp_path, records[:7] + records[8:50] + records[51:], "m2.jsonl")),
                         name="g2.yaml")
    second = run_graph(graph2, output=tmp_path / "b", **run)
    assert 1 <= second.nodes["points"].computed_shards <= 4 < total
    # the same images in another folder (copied): counted by content, nothing recomputed
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in images.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    graph3 = write_graph(GRAPH.format(path=_manifest(
        tmp_path, [dict(r, image=r["image"].replace(str(images), str(moved))) for r in records], "m3.jsonl")),
        name="g3.yaml")
    third = run_graph(graph3, output=tmp_path / "c", **run)
    assert third.nodes["points"].computed_shards == 0 and third.nodes["mean"].computed_shards == 0
    a = pq.read_table(tmp_path / "a" / "results.parquet")
    c = pq.read_table(tmp_path / "c" / "results.parquet")
    assert a.column("points.score").equals(c.column("points.score"))
    # an image's content changes: its shard runs again, the others do not
    import cv2

    cv2.imwrite(str(moved / "5.png"), np.full((24, 24, 3), 9, np.uint8))
    fourth = run_graph(graph3, output=tmp_path / "d", **run)
    assert fourth.nodes["points"].computed_shards == fourth.nodes["mean"].computed_shards == 1
