"""The store and run folders on a real S3 API (moto's server on localhost, tests/s3_server.py),
reached through pyarrow's own S3FileSystem: runs, resume after SIGKILL, cache verify and gc,
the run lock without atomic creation, objects cut short, throttling retried."""

from __future__ import annotations

import json
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

from artifacts.location import Location
from conftest import GRAPHS, ROOT
from runtime.api import run_graph
from runtime.cli import main
from runtime.run import read_results
from runtime.run_lock import RunLock, RunLocked
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

def _png(width: int, height: int, shade: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade, shade // 2, 80)).save(buffer, format="PNG")
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
    with pytest.raises(Exception, match=f"s3://{bucket}/data/nope.jsonl does not exist"):
        sizes(f"s3://{bucket}/data/nope.jsonl", "nope")
