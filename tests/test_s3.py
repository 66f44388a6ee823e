"""The store and run folders on a real S3 API (moto's server on localhost, tests/s3_server.py),
reached through pyarrow's own S3FileSystem: runs, resume after SIGKILL, cache verify and gc,
the run lock without atomic creation, objects cut short, throttling retried, datasets (a
manifest, VQAv2, GQA) and their images in a bucket."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stages
from artifacts.columns import TensorSpec

from artifacts.location import Location, object_version
from conftest import GRAPHS, ROOT
from runtime.api import run_graph
from runtime.cli import main
from runtime.errors import GraphError
from runtime.run import read_results
from runtime.run_lock import RunLock, RunLocked
from sources import VQAv2Source, vqa
from sources.json_stream import array_entries
from stages.base import Batch, Granularity, Input, Output, Stage
from s3_server import FaultyProxy, bucket, patched_env, s3  # noqa: F401  (fixtures)
from test_resume import _cli as slow_cli  # the CLI with a slow sample_patches registered

pytestmark = pytest.mark.slow

ORACLE = GRAPHS / "oracle_heatmap.yaml"
SMALL = ["dataset.num_images=6", "shard_size=8"]


def run(output, cache, overrides=SMALL, **kw):
    return run_graph(ORACLE, overrides=list(overrides), executor="local", output=output, cache_dir=cache,
                     progress=False, device="cpu", **kw)


@pytest.fixture
def reference(tmp_path):
    """The results of the same run on a local disk."""
    run(tmp_path / "ref", tmp_path / "ref_cache")
    return pq.read_table(tmp_path / "ref" / "results.parquet")


def entries(s3, bucket, stage):
    return [k for k in s3.keys(bucket, f"cache/{stage}/") if k.endswith(".parquet") and "/_index/" not in k]


def cut_short(s3, bucket, key):
    """Replace an object by its first half, as a truncated upload would leave it."""
    client = s3.client()
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=data[: len(data) // 2])


def test_run_rerun_verify_and_gc_on_s3(s3, bucket, reference, capsys):
    out, cache = f"s3://{bucket}/runs/x", f"s3://{bucket}/cache"
    first = run(out, cache)
    assert first.samples == 24 and first.errors == 0
    assert read_results(out).equals(reference)
    keys = s3.keys(bucket)
    assert "runs/x/results.parquet" in keys and "runs/x/manifest.json" in keys
    assert not [k for k in keys if ".tmp-" in k or ".claim-" in k or k.endswith("/.lock")]

    again = run(f"s3://{bucket}/runs/y", cache)  # a new run folder: every result from the cache
    assert all(s.computed_shards == 0 for s in again.nodes.values())
    assert read_results(f"s3://{bucket}/runs/y").equals(reference)

    assert main(["cache", "verify", "--cache", cache]) == 0
    assert "match their checksums" in capsys.readouterr().out
    assert main(["cache", "gc", "--cache", cache]) == 0
    assert "removed 0 files" in capsys.readouterr().out
    assert len(entries(s3, bucket, "mask_heatmap")) == first.nodes["oracle"].computed_shards


def test_objects_cut_short_are_detected_and_recomputed(s3, bucket, reference, calls, capsys):
    out, cache = f"s3://{bucket}/runs/x", f"s3://{bucket}/cache"
    run(out, cache)
    entry = entries(s3, bucket, "heatmap_points")[0]
    cut_short(s3, bucket, entry)
    assert main(["cache", "ls", "--cache", cache]) == 0
    assert "1 bad" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", cache]) == 1
    assert "checksum mismatch" in capsys.readouterr().out

    calls.clear()
    other = run(f"s3://{bucket}/runs/y", cache)  # a new run folder: the cut entry is recomputed
    assert other.corrupt_discarded == 1 and other.errors == 0
    assert calls["heatmap_points"] == 1  # that shard of that node only (images are not cached)
    assert not set(calls) - {"heatmap_points", "load_image"}
    assert read_results(f"s3://{bucket}/runs/y").equals(reference)
    assert main(["cache", "verify", "--cache", cache]) == 0

    part = next(k for k in s3.keys(bucket, "runs/x/parts/") if k.endswith(".parquet"))
    cut_short(s3, bucket, part)
    calls.clear()
    again = run(out, cache)  # the cut part is rebuilt from the cache
    assert again.corrupt_discarded == 1 and again.shards_from_parts == again.shards - 1
    assert not set(calls) - {"load_image"} and read_results(out).equals(reference)

    cut_short(s3, bucket, entries(s3, bucket, "sample_patches")[0])
    capsys.readouterr()
    assert main(["cache", "gc", "--cache", cache]) == 0
    assert "removed 1 files" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", cache]) == 0


@pytest.fixture
def slow_graph(write_graph):
    return write_graph(f"""
        extends: {ORACLE}
        name: slow
        shard_size: 8
        dataset: {{params: {{num_images: 16}}}}
        nodes:
          patches: {{stage: slow_patches, params: {{num_captions: 3}}, inputs: {{heatmap: enhance.heatmap}}}}
        """)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_sigkill_then_resume_on_s3(s3, bucket, tmp_path, slow_graph):
    reference = subprocess.run(slow_cli(tmp_path, slow_graph, tmp_path / "ref", tmp_path / "ref_cache"),
                               env=_env(), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    out, cache = f"s3://{bucket}/runs/x", f"s3://{bucket}/cache"
    proc = subprocess.Popen(slow_cli(tmp_path, slow_graph, out, cache), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while len([k for k in s3.keys(bucket, "runs/x/parts/") if k.endswith(".parquet")]) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the run wrote no parts in 120 s"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    keys = s3.keys(bucket, "runs/x/")
    assert "runs/x/.lock" in keys and "runs/x/results.parquet" not in keys  # left by the killed run
    done = len([k for k in keys if k.startswith("runs/x/parts/part-")])

    resumed = subprocess.run(slow_cli(tmp_path, slow_graph, out, cache), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "locked by a run that is gone" in resumed.stderr
    assert f"({done} already done)" in resumed.stdout or f"({done + 1} already done)" in resumed.stdout
    got = read_results(out).sort_by("sample_id")
    want = pq.read_table(tmp_path / "ref" / "results.parquet").sort_by("sample_id")
    assert got.num_rows == want.num_rows == 64 and got.equals(want)
    assert "runs/x/.lock" not in s3.keys(bucket, "runs/x/")


def test_lock_admits_one_of_many_runs_started_together(s3, bucket):
    """Four contenders per round, released by a barrier: exactly one holds the folder, the
    others are refused. Without the claim (a check, then a write) two get in most rounds."""
    folder = Location(f"s3://{bucket}/runs/contended")
    for _ in range(8):
        barrier = threading.Barrier(4)
        won, refused, failed = [], [], []

        def contend(i):
            lock = RunLock(folder, f"contender {i}")
            barrier.wait()
            try:
                lock.acquire()
                won.append(lock)
            except RunLocked:
                refused.append(i)
            except Exception as exc:  # noqa: BLE001 - reported below
                failed.append(exc)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not failed, failed
        assert len(won) == 1 and len(refused) == 3
        won[0].release()
        assert not folder.exists(".lock")
    assert not [k for k in s3.keys(bucket) if ".claim-" in k]


def test_second_cli_run_into_an_s3_folder_is_refused(s3, bucket, tmp_path, slow_graph):
    out, cache = f"s3://{bucket}/runs/x", f"s3://{bucket}/cache"
    procs = [subprocess.Popen(slow_cli(tmp_path, slow_graph, out, cache), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    refused = results[[p.returncode for p in procs].index(2)][1]
    assert f"{out} is in use by another run" in refused and "--wait" in refused
    assert read_results(out).num_rows == 64


def test_throttling_and_server_errors_are_retried(s3, bucket, reference):
    """A proxy answers the first upload and the first download of each stored object (entries,
    parts, results, the lock) with 503 SlowDown: pyarrow's S3 client retries most, Location
    retries the small reads it does not, and the run ends with the results of a local disk."""
    seen = set()

    def first_time(method, path):
        key = (method, path.split("?")[0])
        if method not in ("PUT", "GET") or not key[1].endswith((".parquet", ".lock", ".json")):
            return False
        fresh = key not in seen
        seen.add(key)
        return fresh

    proxy = FaultyProxy(s3.endpoint, first_time)
    try:
        with patched_env(s3.env(proxy.endpoint)):
            summary = run(f"s3://{bucket}/runs/x", f"s3://{bucket}/cache")
            # a read smaller than the error's body (the footer check of `cache ls`), first refused
            entry = entries(s3, bucket, "mask_heatmap")[0]
            assert Location(f"s3://{bucket}").read_tail(entry, 4) == b"PAR1"
            assert ("GET", f"/{bucket}/{entry}") in proxy.failed
    finally:
        proxy.stop()
    assert summary.errors == 0
    assert len([m for m, _ in proxy.failed if m == "PUT"]) > 10 and any(m == "GET" for m, _ in proxy.failed)
    assert read_results(f"s3://{bucket}/runs/x").equals(reference)


# -- datasets in a bucket ----------------------------------------------------------------------

def _png(width: int, height: int, shade: int, format: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade, shade // 2, 80)).save(buffer, format=format)
    return buffer.getvalue()


class MeanPixel(Stage):
    """A cacheable stage that reads pixels: the mean of each image."""

    name = "mean_pixel"
    granularity = Granularity.IMAGE
    INPUTS = {"image": Input(TensorSpec("uint8", None, ndim=3), "RGB pixels")}
    OUTPUTS = {"mean": Output(pa.float64(), "mean pixel value")}

    def process(self, batch: Batch) -> dict:
        return {"mean": [float(image.mean()) for image in batch["image"]]}


def test_manifest_with_images_in_a_bucket(s3, bucket, tmp_path, write_graph, monkeypatch):
    """Images given as s3:// URIs in a manifest: fingerprinted by their metadata (no download),
    read once by the stage that decodes them; a rewritten object is a new input."""
    monkeypatch.setitem(stages.STAGES, "mean_pixel", MeanPixel)
    client = s3.client()
    sizes = {"a": (40, 30), "b": (24, 64), "c": (50, 50)}
    for name, (w, h) in sizes.items():
        client.put_object(Bucket=bucket, Key=f"images/{name}.png", Body=_png(w, h, 10 * w % 255))
    lines = [{"sample_id": f"{name}{q}", "image": f"s3://{bucket}/images/{name}.png", "question": f"what {q}?"}
             for name in sizes for q in range(2)]
    lines.append({"sample_id": "gone", "image": f"s3://{bucket}/images/gone.png", "question": "where?"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    graph = write_graph(f"""
        dataset: {{source: manifest, params: {{path: {manifest}}}}}
        shard_size: 2
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
          mean: {{stage: mean_pixel, inputs: {{image: image.image}}}}
        outputs: [image.size, mean.mean]
        """)
    requests = []
    proxy = FaultyProxy(s3.endpoint, lambda method, path: requests.append((method, path.split("?")[0])) and False)

    def image_requests(method):
        return sorted(p for m, p in requests if m == method and "/images/" in p)

    def go(out):
        requests.clear()
        with patched_env(s3.env(proxy.endpoint)):
            summary = run_graph(graph, executor="local", output=tmp_path / out, cache_dir=f"s3://{bucket}/cache",
                                progress=False, device="cpu")
        return summary, {r["sample_id"]: r for r in pq.read_table(tmp_path / out / "results.parquet").to_pylist()}

    try:
        first, rows = go("first")
        assert first.errors == 1 and "image not found" in rows["gone"]["error"] and "gone.png" in rows["gone"]["error"]
        for name, (w, h) in sizes.items():
            assert rows[f"{name}0"]["image.size"] == rows[f"{name}1"]["image.size"] == [h, w]
        # each image downloaded once, by the stage that decodes it
        assert image_requests("GET") == sorted(f"/{bucket}/images/{n}.png" for n in sizes)
        first_means = {sid: r["mean.mean"] for sid, r in rows.items()}

        again, _ = go("again")
        assert again.nodes["mean"].computed_shards == 0  # nothing changed: all from the cache
        client.put_object(Bucket=bucket, Key="images/b.png", Body=_png(70, 30, 200))  # rewritten
        second, rows = go("second")
        assert rows["b0"]["image.size"] == [30, 70] and rows["a0"]["image.size"] == [30, 40]
        assert rows["b0"]["mean.mean"] != first_means["b0"] and rows["a0"]["mean.mean"] == first_means["a0"]
        assert second.nodes["mean"].computed_shards == 1  # only the shard of the new b.png
    finally:
        proxy.stop()

    # a store that keeps failing to serve an image: its rows fail as transient, the next run retries them
    client.put_object(Bucket=bucket, Key="images/c.png", Body=_png(52, 50, 120))
    down = FaultyProxy(s3.endpoint, lambda method, path: method == "GET" and path.endswith("/images/c.png"))
    try:
        with patched_env(s3.env(down.endpoint)):
            failing = run_graph(graph, executor="local", output=tmp_path / "third", cache_dir=f"s3://{bucket}/cache",
                                progress=False, device="cpu")
    finally:
        down.stop()
    rows = {r["sample_id"]: r for r in pq.read_table(tmp_path / "third" / "results.parquet").to_pylist()}
    assert failing.transient_errors == 2 and rows["c0"]["error_kind"] == "transient"
    assert "cannot read image" in rows["c0"]["error"] and "c.png" in rows["c0"]["error"]
    retried = run_graph(graph, executor="local", output=tmp_path / "third", cache_dir=f"s3://{bucket}/cache",
                        progress=False, device="cpu")
    rows = {r["sample_id"]: r for r in pq.read_table(tmp_path / "third" / "results.parquet").to_pylist()}
    assert retried.transient_errors == 0 and rows["c0"]["image.size"] == [50, 52]


def test_manifest_in_a_bucket_with_images_beside_it(s3, bucket, tmp_path, write_graph):
    client = s3.client()
    client.put_object(Bucket=bucket, Key="data/images/a.png", Body=_png(20, 10, 30))
    client.put_object(Bucket=bucket, Key="data/images/b.png", Body=_png(12, 18, 90))
    rows = [{"sample_id": "a", "image": "images/a.png", "question": "what?"},
            {"sample_id": "b", "image": "images/b.png", "question": "which?", "answers": ["x"]}]
    client.put_object(Bucket=bucket, Key="data/m.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    csv_text = "sample_id,image,question\nc,images/b.png,why?\n"
    client.put_object(Bucket=bucket, Key="data/m.csv", Body=csv_text.encode())
    # Parquet is read through a random-access file (footer, then row groups), never downloaded whole
    parquet = io.BytesIO()
    pq.write_table(pa.table({"sample_id": ["d", "e", "f"], "image": ["images/a.png", "images/b.png", "images/a.png"],
                             "question": ["x?", "y?", "z?"]}), parquet, row_group_size=1)
    client.put_object(Bucket=bucket, Key="data/m.parquet", Body=parquet.getvalue())

    def sizes(manifest, out):
        graph = write_graph(f"""
            dataset: {{source: manifest, params: {{path: "{manifest}"}}}}
            nodes:
              image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
            outputs: [image.size]
            """, name=f"{out}.yaml")
        summary = run_graph(graph, executor="local", output=tmp_path / out, cache_dir=tmp_path / "cache",
                            progress=False, device="cpu")
        assert summary.errors == 0
        return {r["sample_id"]: r["image.size"] for r in pq.read_table(tmp_path / out / "results.parquet").to_pylist()}

    assert sizes(f"s3://{bucket}/data/m.jsonl", "jsonl") == {"a": [10, 20], "b": [18, 12]}
    assert sizes(f"s3://{bucket}/data/m.csv", "csv") == {"c": [18, 12]}
    assert sizes(f"s3://{bucket}/data/m.parquet", "parquet") == {"d": [10, 20], "e": [18, 12], "f": [10, 20]}
    with pytest.raises(Exception, match=f"s3://{bucket}/data/nope.jsonl does not exist"):
        sizes(f"s3://{bucket}/data/nope.jsonl", "nope")


# VQAv2 and GQA files and image folders in a bucket: the same rows as from a local disk

COCO = {42: (40, 30), 7: (24, 64), 9: (50, 50), 13: (16, 20)}  # image id: size of its image


def _vqa_dataset() -> dict[str, bytes]:
    """A VQAv2 dataset (questions, annotations, four COCO-named images) by relative path; image
    99 has a question but no file."""
    questions = [{"image_id": i, "question": f"q{i}-{k}?", "question_id": 10 * i + k}
                 for i in (*COCO, 99) for k in range(2 if i in (42, 9) else 1)]
    annotations = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
                    "answer_type": "other", "answers": [{"answer": f"a{q['question_id']}"}] * 10} for q in questions]
    files = {"q.json": json.dumps({"data_subtype": "val2014", "questions": questions}).encode(),
             "a.json": json.dumps({"annotations": annotations}).encode()}
    for image_id, (w, h) in COCO.items():
        files[f"val2014/COCO_val2014_{image_id:012d}.jpg"] = _png(w, h, 3 * image_id, format="JPEG")
    return files


def _gqa_dataset() -> dict[str, bytes]:
    questions = {f"g{i}{k}": {"imageId": f"n{i}", "question": f"is {i}-{k}?", "answer": "yes",
                              "types": {"structural": "verify"}} for i in (*COCO, 99) for k in range(2)}
    files = {"q.json": json.dumps(questions).encode()}
    for image_id, (w, h) in COCO.items():
        files[f"images/n{image_id}.jpg"] = _png(w, h, 5 * image_id, format="JPEG")
    return files


def _on_disk_and_in_bucket(files, tmp_path, s3, bucket, name) -> tuple[str, str]:
    """The same files under a local folder and under a prefix of the bucket."""
    for rel, data in files.items():
        (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name / rel).write_bytes(data)
        s3.client().put_object(Bucket=bucket, Key=f"{name}/{rel}", Body=data)
    return str(tmp_path / name), f"s3://{bucket}/{name}"


def _image_graph(write_graph, source, params, name):
    return write_graph(f"""
        dataset: {{source: {source}, params: {json.dumps(params)}}}
        shard_size: 2
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
          mean: {{stage: mean_pixel, inputs: {{image: image.image}}}}
        outputs: [source.answers, image.size, mean.mean]
        """, name=f"{name}.yaml")


def _rows(out) -> dict[str, dict]:
    return {r["sample_id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}


def _comparable(rows: dict[str, dict]) -> dict[str, dict]:
    """Rows without where their image is (a local path on disk, a URI in the bucket): no image
    path, an error by the file name it ends with."""
    return {sid: {k: (v.rsplit("/", 1)[-1] if k == "error" and v else v) for k, v in r.items() if k != "image_path"}
            for sid, r in rows.items()}


@pytest.fixture
def requests_to(s3):
    """A proxy in front of the store that records every request; the environment points at it."""
    seen: list[tuple[str, str]] = []
    proxy = FaultyProxy(s3.endpoint, lambda method, path: seen.append((method, path.split("?")[0])) and False)
    with patched_env(s3.env(proxy.endpoint)):
        yield seen
    proxy.stop()


def test_vqav2_files_and_images_in_a_bucket(s3, bucket, tmp_path, write_graph, monkeypatch, requests_to):
    """Questions and annotations read from the bucket into the question index, which a second
    run reuses without reading them again; images named as URIs under the
    prefix and read by the stage that decodes them; a missing one is an error row."""
    monkeypatch.setitem(stages.STAGES, "mean_pixel", MeanPixel)
    files = _vqa_dataset()
    local, uri = _on_disk_and_in_bucket(files, tmp_path, s3, bucket, "vqa")

    def go(root, out):
        params = {"questions": f"{root}/q.json", "annotations": f"{root}/a.json", "images": f"{root}/val2014"}
        summary = run_graph(_image_graph(write_graph, "vqav2", params, out), executor="local", output=tmp_path / out,
                            cache_dir=tmp_path / f"cache_{root == uri}", progress=False, device="cpu")
        return summary, _rows(tmp_path / out)

    _, want = go(local, "local")
    requests_to.clear()
    first, got = go(uri, "bucket")
    assert _comparable(got) == _comparable(want) and len(got) == 7 and first.errors == 1
    assert "image not found" in got["990"]["error"] and "COCO_val2014_000000000099.jpg" in got["990"]["error"]
    assert got["420"]["image.size"] == [30, 40] and got["420"]["answers"] == ["a420"] * 10
    gets = [p for m, p in requests_to if m == "GET"]
    assert gets.count(f"/{bucket}/vqa/q.json") == gets.count(f"/{bucket}/vqa/a.json") == 1
    assert sorted(p for p in gets if "/val2014/" in p) == sorted(  # each image downloaded once
        f"/{bucket}/vqa/{rel}" for rel in files if rel.startswith("val2014/"))

    requests_to.clear()
    again, rows = go(uri, "again")
    assert rows == got and again.errors == 1
    assert again.nodes["mean"].computed_shards == 0  # the images' versions unchanged: all from the cache
    assert not [p for m, p in requests_to if m == "GET" and p.endswith(".json")]  # the index, not the files


def test_a_question_file_in_a_bucket_is_streamed_a_range_at_a_time(s3, bucket, tmp_path, monkeypatch, requests_to):
    questions = [{"image_id": i // 3, "question": f"question {i}?", "question_id": i} for i in range(3000)]
    data = json.dumps({"data_subtype": "val2014", "questions": questions}).encode()
    s3.client().put_object(Bucket=bucket, Key="q.json", Body=data)
    monkeypatch.setattr("artifacts.location.OBJECT_READ", 1 << 14)
    monkeypatch.setattr("sources.json_stream.CHUNK", 1 << 12)  # reads within the buffer, as 1 MiB in 8 are
    head: dict = {}
    assert list(array_entries(f"s3://{bucket}/q.json", "questions", head)) == questions
    assert head == {"data_subtype": "val2014", "questions": []}
    gets = [p for m, p in requests_to if m == "GET"]
    assert len(data) > 6 * (1 << 14) and gets == [f"/{bucket}/q.json"] * -(-len(data) // (1 << 14))


def test_gqa_questions_and_images_in_a_bucket(s3, bucket, tmp_path, write_graph, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "mean_pixel", MeanPixel)
    local, uri = _on_disk_and_in_bucket(_gqa_dataset(), tmp_path, s3, bucket, "gqa")

    def go(root, out):
        params = {"questions": f"{root}/q.json", "images": f"{root}/images"}
        summary = run_graph(_image_graph(write_graph, "gqa", params, out), executor="local",
                            output=tmp_path / out, cache_dir=tmp_path / f"{out}_cache", progress=False, device="cpu")
        return summary, _rows(tmp_path / out)

    (_, want), (summary, got) = go(local, "local"), go(uri, "bucket")
    assert _comparable(got) == _comparable(want) and len(got) == 10 and summary.errors == 2
    assert got["g420"]["image.size"] == [30, 40] and "n99.jpg" in got["g990"]["error"]


def test_missing_files_in_a_bucket_stop_the_run_naming_the_param(s3, bucket, tmp_path, write_graph, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "mean_pixel", MeanPixel)
    _, uri = _on_disk_and_in_bucket(_vqa_dataset(), tmp_path, s3, bucket, "vqa")
    params = {"questions": f"{uri}/nope.json", "annotations": f"{uri}/a.json", "images": f"{uri}/val2017"}
    graph = _image_graph(write_graph, "vqav2", params, "g")
    with pytest.raises(GraphError) as info:
        run_graph(graph, executor="local", output=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                  device="cpu")
    problems = {p.field: p.message for p in info.value.problems}
    assert set(problems) == {"dataset.params.questions", "dataset.params.images"}
    assert f"{uri}/nope.json does not exist or is not a file" in problems["dataset.params.questions"]
    assert f"{uri}/val2017 does not exist or is not a folder" in problems["dataset.params.images"]
    assert not (tmp_path / "out" / "parts").exists()


def test_image_names_under_a_prefix_are_settled_by_the_first_images(s3, bucket, tmp_path, monkeypatch, caplog):
    """The driver looks up the candidate names of the first images only: the folder's naming
    (here bare COCO numbers) is found on the first image that exists; a wrong prefix costs at
    most PROBES images' lookups, not one per image, and one warning."""
    files = {rel.replace("COCO_val2014_", ""): data for rel, data in _vqa_dataset().items()}
    _, uri = _on_disk_and_in_bucket(files, tmp_path, s3, bucket, "bare")
    looked_up = []
    monkeypatch.setattr(vqa, "object_version", lambda u: looked_up.append(u) or object_version(u))

    def paths(images):
        looked_up.clear()
        source = VQAv2Source(VQAv2Source.Params(questions=f"{uri}/q.json", images=images))
        return {r["sample_id"]: r["image_path"] for r in source.iter_samples()}

    found = paths(f"{uri}/val2014/")
    assert found["420"] == f"{uri}/val2014/000000000042.jpg" and found["990"] == f"{uri}/val2014/000000000099.jpg"
    assert looked_up == [f"{uri}/val2014/COCO_val2014_000000000042.jpg", f"{uri}/val2014/000000000042.jpg"]
    monkeypatch.setattr(vqa._ObjectFolder, "PROBES", 2)  # of the dataset's five images
    with caplog.at_level(logging.WARNING):
        wrong = paths(f"{uri}/elsewhere")
    assert wrong["420"] == f"{uri}/elsewhere/COCO_val2014_000000000042.jpg"
    assert len(looked_up) == 2 * 2  # two images, two candidate names each
    assert len([r for r in caplog.records if "image not found" in r.getMessage()]) == 1


def test_a_manifest_in_a_bucket_is_streamed_a_range_at_a_time(s3, bucket, monkeypatch, requests_to):
    """A JSONL manifest object is read a range at a time as its rows are used, never whole."""
    from sources.manifest import ManifestParams, ManifestSource

    rows = [{"sample_id": f"s{i}", "image": f"images/{i % 7}.png", "question": f"question {i}?"} for i in range(2000)]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    s3.client().put_object(Bucket=bucket, Key="m.jsonl", Body=data)
    monkeypatch.setattr("artifacts.location.OBJECT_READ", 1 << 14)
    source = ManifestSource(ManifestParams(path=f"s3://{bucket}/m.jsonl"))
    first = next(iter(source.iter_samples()))
    assert first["sample_id"] == "s0" and first["image_path"] == f"s3://{bucket}/images/0.png"
    assert [m for m, p in requests_to if m == "GET"] == ["GET"]          # the first range only
    requests_to.clear()
    assert [s["question"] for s in source.iter_samples()] == [r["question"] for r in rows]
    gets = [p for m, p in requests_to if m == "GET"]
    assert len(data) > 6 * (1 << 14) and gets == [f"/{bucket}/m.jsonl"] * -(-len(data) // (1 << 14))
