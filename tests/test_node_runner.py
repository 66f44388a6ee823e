"""Per-image inputs reach per-sample stages once per image; batches never split an image."""

from __future__ import annotations

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

import stages
from artifacts.columns import tensor_type
from runtime.api import run_graph
from runtime.errors import GraphError
from runtime.graph import load_graph
from stages.base import Batch, Input, Output, Stage

SEEN: list[dict] = []


class ImageAreaPerQuestion(Stage):
    """Test stage: per question, the area of its image (taken once per image) + question length."""

    name = "image_area_per_question"
    INPUTS = {"size": Input(tensor_type("int32", [2]), "image size", per_image=True),
              "question": Input(pa.string(), "question")}
    OUTPUTS = {"value": Output(pa.int64(), "area + len(question)")}

    def process(self, batch: Batch) -> dict:
        SEEN.append({"images": len(batch["size"]), "rows": len(batch), "ids": list(batch.row_ids)})
        area = batch["size"][:, 0].astype(np.int64) * batch["size"][:, 1]
        return {"value": area[batch.image_rows] + np.array([len(q) for q in batch["question"]])}


def test_per_image_input_is_deduplicated_and_batches_keep_images_whole(tmp_path, write_graph, monkeypatch):
    monkeypatch.setitem(stages.STAGES, ImageAreaPerQuestion.name, ImageAreaPerQuestion)
    SEEN.clear()
    graph = write_graph("""
        dataset: {source: shapes, params: {num_images: 5, questions_per_image: 3, image_size: 64}}
        nodes:
          image: {stage: load_image, inputs: {image_bytes: source.image_bytes}}
          area: {stage: image_area_per_question, batch_size: 4, inputs: {size: image.size, question: source.question}}
        outputs: [area.value]
        """)
    summary = run_graph(graph, executor="local", output=tmp_path / "o", cache_dir=tmp_path / "c", progress=False,
                        device="cpu")
    table = pq.read_table(tmp_path / "o" / "results.parquet").to_pylist()
    assert summary.samples == len(table) == 15
    for row in table:
        assert row["area.value"] == 64 * 64 + len(row["question"])
    # 3 questions per image, batch_size 4: a batch grows to the end of its image, never splits one
    assert [s["rows"] for s in SEEN] == [6, 6, 3] and [s["images"] for s in SEEN] == [2, 2, 1]
    for s in SEEN:
        images = [sid.rsplit("-", 1)[0] for sid in s["ids"]]
        assert len(set(images)) == s["images"]


class QuestionPerImage(Stage):
    """Test stage whose string input is (wrongly) declared per image."""

    name = "question_per_image"
    INPUTS = {"text": Input(pa.string(), "text", per_image=True)}
    OUTPUTS = {"n": Output(pa.int64(), "length")}


def test_per_image_input_rejects_per_question_column(write_graph, monkeypatch):
    monkeypatch.setitem(stages.STAGES, QuestionPerImage.name, QuestionPerImage)
    ok = write_graph("""
        dataset: {source: shapes}
        nodes:
          n: {stage: question_per_image, inputs: {text: source.image_id}}
        outputs: []
        """, name="ok.yaml")
    load_graph(ok)
    bad = write_graph("""
        dataset: {source: shapes}
        nodes:
          n: {stage: question_per_image, inputs: {text: source.question}}
        outputs: []
        """, name="bad.yaml")
    with pytest.raises(GraphError) as info:
        load_graph(bad)
    [problem] = info.value.problems
    assert problem.node == "n" and problem.field == "inputs.text" and "taken once per image" in problem.message
