"""The result store: checksums on every read, run locks, temp files, transient errors, any
filesystem, the index."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time

import pyarrow.parquet as pq
import pytest
from pyarrow._fs import _MockFileSystem

import stages
from artifacts.location import Location
from artifacts.store import Store
from conftest import GRAPHS, ROOT
from runtime.api import run_graph
from runtime.cli import main
from runtime.run import read_results
from runtime.run_lock import RunLock, RunLocked
from test_resume import _cli as slow_cli  # the CLI with a slow sample_patches registered
from stages.heatmaps import SamplePatches

pytestmark = pytest.mark.slow

ORACLE = GRAPHS / "oracle_heatmap.yaml"
SMALL = ["dataset.num_images=6", "shard_size=8"]
HOST = socket.gethostname().replace("-", "_")


def run(tmp_path, out="run", cache="cache", overrides=(), graph=ORACLE, **kw):
    cache_dir = cache if isinstance(cache, (str, Location)) and "://" in str(cache) or isinstance(cache, Location) \
        else tmp_path / cache
    output = out if isinstance(out, Location) or "://" in str(out) else tmp_path / out
    return run_graph(graph, overrides=[*SMALL, *overrides], executor="local", output=output,
                     cache_dir=cache_dir, progress=False, device="cpu", **kw)


def entry_files(cache, stage):
    return sorted(p for p in (cache / stage).glob("[0-9a-f][0-9a-f]/*.parquet"))


def flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x10
    path.write_bytes(bytes(data))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- integrity ---------------------------------------------------------------------------------

def test_flipped_bit_in_an_entry_is_caught_removed_and_recomputed(tmp_path, calls, caplog):
    run(tmp_path)
    want = pq.read_table(tmp_path / "run" / "results.parquet")
    bad = entry_files(tmp_path / "cache", "mask_heatmap")[0]
    flip_bit(bad)
    calls.clear()
    summary = run(tmp_path, out="other")  # a new run folder: its parts must come from the cache
    assert summary.corrupt_discarded == 1 and "corrupt" in caplog.text and bad.name[:12] in caplog.text
    assert calls["mask_heatmap"] == 1  # only that shard's result was recomputed
    assert pq.read_table(tmp_path / "other" / "results.parquet").equals(want)
    # the recomputed result has the very same bytes, so it is written back under the same name
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == bad.name.split(".")[1]
    assert len(entry_files(tmp_path / "cache", "mask_heatmap")) == summary.nodes["oracle"].cached_shards + 1


def test_truncated_entry_is_flagged_by_ls_removed_by_gc_and_never_aborts_a_run(tmp_path, capsys):
    run(tmp_path)
    bad = entry_files(tmp_path / "cache", "heatmap_points")[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    capsys.readouterr()
    assert main(["cache", "ls", "--cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "1 bad" in out and f"bad: {bad}" in out and "truncated" in out
    summary = run(tmp_path, out="other")  # reads it, finds it bad, recomputes
    assert summary.corrupt_discarded == 1 and summary.errors == 0
    bad2 = entry_files(tmp_path / "cache", "heatmap_points")[0]
    bad2.write_bytes(bad2.read_bytes()[:100])
    assert main(["cache", "gc", "--cache", str(tmp_path / "cache")]) == 0
    assert "1 bad" in capsys.readouterr().out and not bad2.exists()


def test_cache_verify_reads_everything(tmp_path, capsys):
    run(tmp_path)
    cache = str(tmp_path / "cache")
    assert main(["cache", "verify", "--cache", cache]) == 0
    assert "match their checksums" in capsys.readouterr().out
    bad = entry_files(tmp_path / "cache", "sample_patches")[1]
    flip_bit(bad)
    assert main(["cache", "ls", "--cache", cache]) == 0  # the cheap check cannot see a flipped bit
    assert "0 bad" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", cache]) == 1
    out = capsys.readouterr().out
    assert "checksum mismatch" in out and str(bad) in out and "1 of" in out
    assert main(["cache", "verify", "--cache", cache, "--remove"]) == 0 and not bad.exists()
    assert main(["cache", "verify", "--cache", cache]) == 0


def test_corrupt_part_is_rebuilt_from_the_cache_and_results_carry_a_checksum(tmp_path, calls):
    run(tmp_path)
    out = tmp_path / "run"
    want = pq.read_table(out / "results.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"]["sha256"] == hashlib.sha256((out / "results.parquet").read_bytes()).hexdigest()
    assert manifest["identity"]["patches"]["code"] and manifest["identity"]["patches"]["libraries"]["numpy"]
    part = sorted((out / "parts").glob("part-*.parquet"))[0]
    flip_bit(part)
    calls.clear()
    summary = run(tmp_path)
    assert summary.corrupt_discarded == 1 and summary.shards_from_parts == summary.shards - 1
    assert sum(calls.values()) == 0  # its rows came back from the cached node results
    assert pq.read_table(out / "results.parquet").equals(want)


# -- concurrency -------------------------------------------------------------------------------

def test_run_lock_refuses_waits_and_takes_over_dead_holders(tmp_path):
    folder = Location(tmp_path / "out")
    first = RunLock(folder, "first")
    first.acquire()
    with pytest.raises(RunLocked, match=f"pid {os.getpid()} on host .*--wait"):
        RunLock(folder, "second").acquire()
    threading.Timer(0.3, first.release).start()
    second = RunLock(folder, "second")
    second.acquire(wait=True, poll=0.05)  # returns once the first lets go
    second.release()
    assert not (tmp_path / "out" / ".lock").exists()

    def holder(owner, heartbeat):
        (tmp_path / "out" / ".lock").write_text(json.dumps({"owner": owner, "host": owner.split("-")[0],
                                                            "pid": 1, "heartbeat": heartbeat}))

    holder(f"{HOST}-{dead_pid()}-deadbeef", time.time())  # this host, process gone
    lock = RunLock(folder)
    lock.acquire()
    lock.release()
    holder("elsewhere-1-deadbeef", time.time() - 3600)  # another host, heartbeat long stopped
    lock.acquire()
    lock.release()
    holder("elsewhere-1-deadbeef", time.time())  # another host, alive
    with pytest.raises(RunLocked, match="elsewhere"):
        RunLock(folder).acquire()


def test_run_lock_heartbeat_outlives_a_store_that_does_not_answer(tmp_path, monkeypatch):
    import runtime.run_lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT", 0.05)
    folder = Location(tmp_path / "out")
    lock = RunLock(folder, "beating")
    lock.acquire()
    real_read, failures = Location.read_bytes, []

    def flaky_read(self, rel):
        if len(failures) < 2:
            failures.append(rel)
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation")
        return real_read(self, rel)

    monkeypatch.setattr(Location, "read_bytes", flaky_read)
    written = json.loads((tmp_path / "out" / ".lock").read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads((tmp_path / "out" / ".lock").read_text())["heartbeat"] == written:
        assert time.time() < deadline, "the heartbeat stopped after the store failed to answer"
        time.sleep(0.02)
    assert len(failures) == 2 and not lock.lost and lock._thread.is_alive()
    lock.release()
    assert not (tmp_path / "out" / ".lock").exists()


class SlowPatches(SamplePatches):
    name = "slow_patches"


@pytest.fixture
def slow_graph(tmp_path, write_graph, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "slow_patches", SlowPatches)  # for runs in this process
    return write_graph(f"""
        extends: {ORACLE}
        name: slow
        shard_size: 8
        dataset: {{params: {{num_images: 12}}}}
        nodes:
          patches: {{stage: slow_patches, params: {{num_captions: 3}}, inputs: {{heatmap: enhance.heatmap}}}}
        """)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_second_run_into_a_folder_stops_and_gc_during_a_run_harms_nothing(tmp_path, slow_graph, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.Popen(slow_cli(tmp_path, slow_graph, out, cache), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (out / ".lock").exists() and any((cache / "heatmap_points").glob("*/*.parquet")), proc)
        assert main(["run", str(slow_graph), "--executor", "local", "--quiet", "--device", "cpu",
                     "--output", str(out), "--cache", str(cache)]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another run (pid {proc.pid}" in err and "--wait" in err
        # gc while the run writes: everything it uses is recent, its temp files belong to a live writer
        live_temp = next((cache / "heatmap_points").glob("[0-9a-f][0-9a-f]")) / \
            f".x.parquet.tmp-{HOST}-{proc.pid}-deadbeef-abcdef"
        live_temp.write_bytes(b"in flight")
        assert main(["cache", "gc", "--cache", str(cache), "--older-than", "0"]) == 0
        assert "removed 0 files" in capsys.readouterr().out
        assert main(["cache", "gc", "--cache", str(cache), "--grace", "0", "--stage", "heatmap_points",
                     "--dry-run"]) == 0
        assert live_temp.exists()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert not (out / ".lock").exists()
    live_temp.unlink()
    ref = run_graph(slow_graph, executor="local", output=tmp_path / "ref", cache_dir=tmp_path / "ref_cache",
                    progress=False, device="cpu")
    assert ref.samples == 48
    assert pq.read_table(out / "results.parquet").equals(pq.read_table(tmp_path / "ref" / "results.parquet"))


def test_two_runs_on_one_cache_started_together(tmp_path, slow_graph, capsys):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(slow_cli(tmp_path, slow_graph, tmp_path / name, cache), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for name in ("a", "b")]
    try:
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    a = pq.read_table(tmp_path / "a" / "results.parquet")
    assert a.num_rows == 48 and a.equals(pq.read_table(tmp_path / "b" / "results.parquet"))
    assert main(["cache", "verify", "--cache", str(cache)]) == 0
    assert not list(cache.rglob(".*.tmp-*"))
    # both wrote the same bytes for the same results: one file per key
    files = [p.name.split(".")[0] for p in cache.glob("*/[0-9a-f][0-9a-f]/*.parquet")]
    assert len(files) == len(set(files))
    # a third run (in this process, where slow_patches is another class, so other code) finds the rest
    summary = run_graph(slow_graph, executor="local", output=tmp_path / "c", cache_dir=cache, progress=False,
                        device="cpu")
    assert {n for n, s in summary.nodes.items() if s.computed_shards} == {"patches"}


def test_temp_files_of_dead_runs_are_cleaned_and_temp_names_are_unique(tmp_path):
    run(tmp_path)
    out = tmp_path / "run"
    leftovers = [out / "parts" / f".part-x.parquet.tmp-{HOST}-{dead_pid()}-deadbeef-abcdef",
                 out / f".results.parquet.tmp-{HOST}-{dead_pid()}-deadbeef-abcdef"]
    for p in leftovers:
        p.write_bytes(b"partial")
    run(tmp_path)
    assert not any(p.exists() for p in leftovers)
    # writers of one file never trip over each other's temp files
    loc = Location(tmp_path / "same")
    errors = []

    def write(i):
        try:
            for _ in range(20):
                loc.write_bytes_atomic("f.bin", bytes([i]) * 1000, f"w{i}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(loc.read_bytes("f.bin"))) == 1 and len(loc.read_bytes("f.bin")) == 1000


# -- errors that may not happen again -----------------------------------------------------------

FAIL: dict[str, type] = {}


class FlakyPatches(SamplePatches):
    name = "flaky_patches"

    def process(self, batch):
        for rid in batch.row_ids:
            if rid in FAIL:
                raise FAIL[rid]("CUDA out of memory (simulated)" if FAIL[rid] is MemoryError else "bad row")
        return super().process(batch)


@pytest.fixture
def flaky(monkeypatch, write_graph):
    monkeypatch.setitem(stages.STAGES, "flaky_patches", FlakyPatches)
    FAIL.clear()
    yield write_graph(f"""
        extends: {ORACLE}
        nodes:
          patches: {{stage: flaky_patches, inputs: {{heatmap: enhance.heatmap}}}}
        """)
    FAIL.clear()


def _row(tmp_path, sample_id, out="run"):
    rows = pq.read_table(tmp_path / out / "results.parquet").to_pylist()
    return next(r for r in rows if r["sample_id"] == sample_id)


def test_transient_errors_are_retried_by_the_next_run(tmp_path, flaky, calls):
    sid = "shapes-8000-000001-q2"
    FAIL[sid] = MemoryError
    first = run(tmp_path, graph=flaky)
    row = _row(tmp_path, sid)
    assert row["status"] == "error" and row["error_kind"] == "transient" and "out of memory" in row["error"]
    assert first.transient_errors == 1 and first.errors == 1
    FAIL.clear()
    calls.clear()
    second = run(tmp_path, graph=flaky)
    assert _row(tmp_path, sid)["status"] == "ok" and second.errors == 0
    assert second.nodes["patches"].computed_shards == 1 and second.shards_from_parts == second.shards - 1
    assert calls["flaky_patches"] >= 1 and "heatmap_points" not in calls


def test_data_errors_stay_cached_until_retry_errors(tmp_path, flaky, calls):
    sid = "shapes-8000-000002-q0"
    FAIL[sid] = ValueError
    run(tmp_path, graph=flaky)
    row = _row(tmp_path, sid)
    assert row["status"] == "error" and row["error_kind"] == "data" and "bad row" in row["error"]
    FAIL.clear()
    calls.clear()
    run(tmp_path, graph=flaky, out="other")  # the cached result, error included
    assert _row(tmp_path, sid, "other")["status"] == "error" and "flaky_patches" not in calls
    summary = run(tmp_path, graph=flaky, out="other", retry_errors=True)
    assert _row(tmp_path, sid, "other")["status"] == "ok" and summary.nodes["patches"].computed_shards == 1


# -- filesystems ---------------------------------------------------------------------------------

def test_file_uris_for_cache_and_output(tmp_path, capsys, calls):
    cache, out = f"file://{tmp_path}/cache", f"file://{tmp_path}/out"
    first = run(tmp_path, out=out, cache=cache)
    assert (tmp_path / "out" / "results.parquet").exists() and first.samples == 24
    assert str(first.results) == str(tmp_path / "out" / "results.parquet")
    calls.clear()
    second = run(tmp_path, out=f"file://{tmp_path}/out2", cache=cache)
    assert sum(calls.values()) == 0 and second.samples == 24
    assert main(["cache", "ls", "--cache", cache]) == 0 and "sample_patches" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", cache]) == 0


def test_a_filesystem_that_is_not_local(tmp_path, calls):
    """The same run on pyarrow's in-memory filesystem: every write and read goes through
    pyarrow.fs (as for s3:// or gs://), not the operating system."""
    fs = _MockFileSystem()
    out, cache = Location("runs/out", filesystem=fs), Location("store", filesystem=fs)
    first = run(tmp_path, out=out, cache=cache)
    table = read_results(out)
    assert table.num_rows == first.samples == 24 and not (tmp_path / "runs").exists()
    calls.clear()
    second = run(tmp_path, out=out, cache=cache)
    assert second.shards_from_parts == second.shards and sum(calls.values()) == 0
    store = Store(cache)
    entry = next(e for e in store.entries(["sample_patches"]))
    data = bytearray(store.loc.read_bytes(entry.rel))
    data[len(data) // 2] ^= 1
    with fs.open_output_stream(store.loc.path(entry.rel)) as fh:
        fh.write(bytes(data))
    assert "checksum mismatch" in store.verify(entry)
    third = run(tmp_path, out=Location("runs/other", filesystem=fs), cache=cache)
    assert third.corrupt_discarded == 1 and third.nodes["patches"].computed_shards == 1
    assert read_results(Location("runs/other", filesystem=fs)).equals(table)


# -- the index ------------------------------------------------------------------------------------

def test_index_lists_entries_without_opening_them(tmp_path, capsys, monkeypatch):
    run(tmp_path)
    cache = tmp_path / "cache"
    store = Store(cache)
    index = store.index("mask_heatmap")
    files = entry_files(cache, "mask_heatmap")
    assert len(index) == len(files) == 3
    assert {row["meta"]["node"] for row in index.values()} == {"oracle"}
    assert sum(row["rows"] for row in index.values()) == 24
    opened = []
    real = Location.read_bytes

    def watched(self, rel):
        if "/_index/" not in rel:
            opened.append(rel)
        return real(self, rel)

    monkeypatch.setattr(Location, "read_bytes", watched)
    monkeypatch.setattr(Location, "read_tail", lambda self, rel, n: opened.append(rel) or b"")
    capsys.readouterr()
    assert main(["cache", "ls", "--all", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert opened == [] and "node=oracle graph=oracle_heatmap" in out and "rows=8" in out
    monkeypatch.undo()
    # without its index an entry is still listed (its footer is read) and gc indexes it again
    for seg in (cache / "mask_heatmap" / "_index").iterdir():
        seg.unlink()
    assert main(["cache", "ls", "--cache", str(cache)]) == 0
    assert "not in the index" in capsys.readouterr().out
    assert main(["cache", "gc", "--cache", str(cache)]) == 0
    segments = list((cache / "mask_heatmap" / "_index").iterdir())
    assert len(segments) == 1 and len(Store(cache).index("mask_heatmap")) == 3
