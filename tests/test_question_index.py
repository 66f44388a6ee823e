"""Big question files (issue 27): streamed JSON, the memory-mapped question index, and a
driver whose memory does not grow with the number of samples."""

from __future__ import annotations

import itertools
import json
import os
import tracemalloc

import pyarrow.parquet as pq
import pytest

import sources.json_stream as json_stream
from artifacts import filehash
from runtime import run_folder
from runtime.api import run_graph
from runtime.graph import load_graph
from runtime.records import check_dataset
from runtime.shards import iter_shards, select_samples
from sources import question_index
from sources.json_stream import array_entries, object_items
from sources.vqa import GQASource, VQAv2Source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = {"info": {"year": 2017, "nested": [1, [2.5e-3, {"k": "v"}]]}, "data_subtype": "val2014",
       "questions": [{"image_id": 12345, "question": "Ça va? \u2603 \"quoted\"", "question_id": 123450},
                     {"image_id": 7, "question": "x" * 50, "question_id": 70000000001}, 17, None, [], {}],
       "license": {"name": "after the array"}}


@pytest.fixture(autouse=True)
def index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(question_index.INDEX_ENV, str(tmp_path / "index"))
    return tmp_path / "index"


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_streamed_entries_equal_json_load_whatever_the_buffer_size(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(json_stream, "CHUNK", chunk)
    path = tmp_path / "q.json"
    path.write_text(json.dumps(DOC, indent=1))
    head: dict = {}
    assert list(array_entries(path, "questions", head)) == DOC["questions"]
    assert head == {**{k: v for k, v in DOC.items() if k != "questions"}, "questions": []}
    assert list(object_items(path, "an object")) == list(DOC.items())


def test_streamed_json_says_where_it_is_broken(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('{"questions": [{"question_id": 1}, {"question_id": 2,}]}')
    with pytest.raises(ValueError, match=r"q\.json: not valid JSON .*char 3\d"):
        list(array_entries(path, "questions", {}))
    path.write_text('[1, 2]')
    with pytest.raises(ValueError, match="keyed by question id"):
        list(object_items(path, "a GQA questions file is an object keyed by question id"))


def write_vqa(folder, questions: int, per_image: int = 5):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    qs = [{"image_id": i // per_image, "question": f"q {i}?", "question_id": i} for i in range(questions)]
    anns = [{"question_id": i, "question_type": "what", "answer_type": "other",
             "answers": [{"answer": str(i % 7)}] * 10} for i in range(questions)]
    (folder / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": qs}))
    (folder / "a.json").write_text(json.dumps({"annotations": anns}))
    return VQAv2Source.Params(questions=str(folder / "q.json"), annotations=str(folder / "a.json"),
                              images=str(folder / "images"))


def test_vqav2_index_is_built_once_per_file_version_and_keeps_the_order(tmp_path, index_dir, monkeypatch):
    params = write_vqa(tmp_path / "d", 12, per_image=3)
    qs = json.loads((tmp_path / "d" / "q.json").read_text())
    qs["questions"].append({"image_id": 0, "question": "late question of the first image", "question_id": 99})
    (tmp_path / "d" / "q.json").write_text(json.dumps(qs))
    first = list(VQAv2Source(params).iter_samples())
    assert [r["sample_id"] for r in first[:4]] == ["0", "1", "2", "99"]  # grouped by image, first-appearance order
    assert first[0]["answers"] == ["0"] * 10 and first[0]["image_path"].endswith("COCO_val2014_000000000000.jpg")
    assert len(list(index_dir.glob("vqav2-*.arrow"))) == 1

    def no_build(*_):
        raise AssertionError("rebuilt")
    build = VQAv2Source._build_index
    monkeypatch.setattr(VQAv2Source, "_build_index", no_build)
    assert list(VQAv2Source(params).iter_samples()) == first  # mapped, not parsed again
    os.utime(tmp_path / "d" / "q.json", ns=(1, 1))  # another version of the file: a new index
    with pytest.raises(AssertionError, match="rebuilt"):
        VQAv2Source(params).count()
    monkeypatch.setattr(VQAv2Source, "_build_index", build)
    before = set(index_dir.glob("vqav2-*.arrow"))
    VQAv2Source(params).count()
    after = set(index_dir.glob("vqav2-*.arrow"))
    assert len(after) == 1 and after != before  # the earlier version's index is gone


def test_gqa_index_keeps_odd_entries_as_they_were(tmp_path):
    (tmp_path / "images").mkdir()
    data = {"q1": {"imageId": "img1", "question": "a?", "answer": "yes", "types": {"structural": "verify"}},
            "q2": [1, 2], "q3": {"imageId": "img1", "question": 5},
            "q4": {"imageId": "img0", "question": "b?", "answer": None}}
    (tmp_path / "g.json").write_text(json.dumps(data))
    rows = list(GQASource(GQASource.Params(questions=str(tmp_path / "g.json"),
                                           images=str(tmp_path / "images"))).iter_samples())
    assert [r["sample_id"] for r in rows] == ["q1", "q3", "q2", "q4"]
    assert rows[0]["question_type"] == "verify" and rows[0]["answers"] == ["yes"]
    assert rows[1]["question"] == 5  # clean_record makes it an error row, as before
    assert "_error" in rows[2] and rows[3]["answers"] is None


def driver_peak(params, shard_size: int = 256) -> int:
    """Peak traced bytes of what the driver does before and around the work: the dataset check
    and cutting every shard (the source's index already built), records kept up to 1 MiB (both sizes
    pass it)."""
    source = VQAv2Source(params)
    source.count()
    tracemalloc.start()
    try:
        check_dataset(lambda: select_samples(source.iter_samples(), None, None), keep_bytes=2**20)
        for shard in iter_shards(source, shard_size):
            del shard
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_driver_memory_does_not_grow_with_the_samples(tmp_path, monkeypatch):
    """Over 2k and 20k samples the driver's peak differs by the check's hashes (24 bytes a
    sample) and little else: no records, question dicts or file names kept (bounded caches made
    small here, so that both sizes fill them)."""
    monkeypatch.setattr(filehash, "LOCAL_ENTRIES", 64)
    small = driver_peak(write_vqa(tmp_path / "2k", 2000))
    big = driver_peak(write_vqa(tmp_path / "20k", 20000))
    per_sample = (big - small) / 18000
    assert per_sample < 40, f"{per_sample:.0f} bytes a sample ({small} -> {big} bytes)"


def test_results_are_written_as_a_stream_of_the_parts(tmp_path, monkeypatch):
    """Each part is written as its shard finishes; results.parquet is the parts appended in
    order, gathered into row groups of whole parts (bounded: not one table of the run, not one
    row group's metadata per part)."""
    monkeypatch.setattr(run_folder, "RESULTS_GROUP_ROWS", 50)
    written = []
    real = run_folder.RunFolder.write_part

    def write_part(self, key, table):
        written.append(len(list((tmp_path / "out" / "parts").glob("part-*"))))  # parts already there
        return real(self, key, table)
    monkeypatch.setattr(run_folder.RunFolder, "write_part", write_part)
    write_vqa(tmp_path / "d", 300, per_image=3)
    (tmp_path / "d" / "dataset.yaml").write_text(
        "source: vqav2\nparams: {questions: q.json, annotations: a.json, images: images}\n")
    graph = load_graph(os.path.join(ROOT, "bench", "graphs", "decode_only.yaml"), ["shard_size=16"],
                       dataset=tmp_path / "d" / "dataset.yaml")
    summary = run_graph(graph, output=tmp_path / "out", cache_dir=tmp_path / "cache", executor="local",
                        progress=False, device="cpu")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary.samples == 300 and summary.shards == len(manifest["parts"]) == len(written) > 4
    assert written == list(range(len(written)))  # one part per shard, as the run went
    parts = [pq.read_table(tmp_path / "out" / "parts" / p) for p in manifest["parts"]]
    results = pq.ParquetFile(tmp_path / "out" / "results.parquet")
    assert results.read().column("sample_id").to_pylist() == [s for p in parts for s in p.column("sample_id").to_pylist()]
    groups = [results.metadata.row_group(i).num_rows for i in range(results.num_row_groups)]
    bounds = set(itertools.accumulate(p.num_rows for p in parts))
    assert 1 < len(groups) < len(parts) and set(itertools.accumulate(groups)) <= bounds  # whole parts each
    assert all(g < 50 + max(p.num_rows for p in parts) for g in groups)


def test_an_index_of_plain_unique_entries_vouches_for_the_selection(tmp_path):
    """A run over such an index needs no read of every record before its first shard; an odd
    entry or a repeated id sends it back to the full dataset check (which names them)."""
    params = write_vqa(tmp_path / "plain", 50)
    assert VQAv2Source(params).vouched(None) == 50 and VQAv2Source(params).vouched(7) == 7
    for name, entry in (("odd", {"image_id": 1, "question": 3, "question_id": 1000}),
                        ("repeated", {"image_id": 1, "question": "again?", "question_id": 3})):
        params = write_vqa(tmp_path / name, 50)
        qs = json.loads((tmp_path / name / "q.json").read_text())
        qs["questions"].append(entry)
        (tmp_path / name / "q.json").write_text(json.dumps(qs))
        assert VQAv2Source(params).vouched(7) is None


def test_a_limited_run_reads_only_the_records_of_its_shards(tmp_path, monkeypatch):
    write_vqa(tmp_path / "d", 3000, per_image=3)
    (tmp_path / "d" / "dataset.yaml").write_text(
        "source: vqav2\nparams: {questions: q.json, annotations: a.json, images: images}\n")
    graph = load_graph(os.path.join(ROOT, "bench", "graphs", "decode_only.yaml"), ["shard_size=16"],
                       dataset=tmp_path / "d" / "dataset.yaml")
    read = []
    real = VQAv2Source.iter_samples

    def counted(self):
        for record in real(self):
            read.append(record["sample_id"])
            yield record
    monkeypatch.setattr(VQAv2Source, "iter_samples", counted)
    summary = run_graph(graph, output=tmp_path / "out", cache_dir=tmp_path / "cache", executor="local",
                        progress=False, device="cpu", limit=20)
    assert summary.samples == 20 and len(read) <= 21  # islice asks for one past the limit at most
