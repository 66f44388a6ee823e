"""Run folders that must not mislead: results that are not their manifest's run, an empty
dataset, locks left half-written or by a pid since reused, output paths that cannot be written
(docs/reliability.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pyarrow.parquet as pq
import pytest

import stages
from artifacts.location import HOST, Location
from conftest import GRAPHS, runtime_cli as cli
from runtime import run_lock
from runtime.api import run_graph
from runtime.run_lock import RunLock, RunLocked

ORACLE = GRAPHS / "oracle_heatmap.yaml"
TINY = ["dataset.num_images=2", "shard_size=4"]


def assert_refused(proc: subprocess.CompletedProcess, *named: str) -> None:
    """Exit 2 with one error line naming ``named``, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for text in named:
        assert text in proc.stderr, proc.stderr


def run_oracle(tmp_path, out, overrides=()):
    return run_graph(ORACLE, overrides=[*TINY, *overrides], executor="local", output=out,
                     cache_dir=tmp_path / "cache", progress=False, device="cpu")


# -- results and manifest ----------------------------------------------------------------------

def test_a_new_run_fences_the_last_results_until_it_finishes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_oracle(tmp_path, out)
    shutil.copy(out / "results.parquet", tmp_path / "old_results.parquet")

    def interrupted(self, batch):
        raise KeyboardInterrupt  # as a kill mid-run would stop it

    monkeypatch.setattr(stages.STAGES["sample_patches"], "process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_oracle(tmp_path, out, ["points.num_points=3"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["graph"]["nodes"]["points"]["params"]["num_points"] == 3
    assert not (out / "results.parquet").exists()  # the last run's results went when this one started

    # a folder whose run did not finish is refused, even with results in it (a kill as the run began)
    shutil.copy(tmp_path / "old_results.parquet", out / "results.parquet")
    not_finished = f"{out}: its run is not finished"
    assert_refused(cli("compare", str(out)), not_finished)
    assert_refused(cli("export", str(out), "--format", "gqa", "--answer", "question_type"), not_finished)
    assert_refused(cli("report", str(out), "--output", str(tmp_path / "report")), not_finished)
    assert not (tmp_path / "report").exists() and not list(out.glob("predictions_*"))

    monkeypatch.undo()
    run_oracle(tmp_path, out, ["points.num_points=3"])  # finished: the results are the new run's
    assert pq.read_schema(out / "results.parquet").field("points.points").type.shape == [3, 2]
    assert cli("compare", str(out)).returncode == 0


# -- datasets ----------------------------------------------------------------------------------

def test_an_empty_dataset_stops_the_run_before_work(tmp_path, write_graph):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    graph = """
        name: {name}
        dataset: {{source: manifest, params: {{path: {path}}}}}
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
        outputs: [image.size]
        """
    one = write_graph(graph.format(name="one", path=empty), name="one.yaml")
    two = write_graph(graph.format(name="two", path=empty), name="two.yaml")
    base = ["--executor", "local", "--quiet", "--device", "cpu", "--cache", str(tmp_path / "cache")]
    single = cli("run", str(one), "--output", str(tmp_path / "out"), "--limit", "3", *base)
    assert_refused(single, f"the dataset of {one}", str(empty), "has no samples, so --limit 3 selects none")
    sweep = cli("run", str(one), str(two), "--output", str(tmp_path / "sweep"), *base)  # a sweep: the same
    assert_refused(sweep, f"the dataset of {one}", str(empty), "has no samples")
    assert "results:" not in single.stdout + sweep.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "sweep").exists()


# -- the run lock ------------------------------------------------------------------------------

def write_lock(folder, text: str, age: float = 0.0) -> None:
    path = folder / ".lock"
    path.write_text(text)
    os.utime(path, (time.time() - age, time.time() - age))


def test_unreadable_locks_and_stopped_heartbeats_go_stale(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    loc = Location(folder)
    for text in ("", '{"owner": "x-1-a", "hea'):  # killed between creating the lock and writing it
        write_lock(folder, text)
        with pytest.raises(RunLocked, match=r"unreadable lock .*stale 15 s after it was written"):
            RunLock(loc).acquire()  # maybe a run writing it right now
        write_lock(folder, text, age=run_lock.HEARTBEAT + 1)
        lock = RunLock(loc)
        lock.acquire()
        lock.release()

    monkeypatch.setattr(run_lock, "HEARTBEAT", 0.3)
    write_lock(folder, "")
    started = time.time()
    lock = RunLock(loc)
    lock.acquire(wait=True, poll=0.05)  # --wait: taken over once stale
    assert time.time() - started < 10
    lock.release()

    # this host, a live pid (ours: as if the dead holder's pid had been reused)
    live = {"owner": f"{HOST.replace('-', '_')}-{os.getpid()}-deadbeef", "host": HOST, "pid": os.getpid()}
    write_lock(folder, json.dumps({**live, "heartbeat": time.time()}))
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        RunLock(loc).acquire()
    write_lock(folder, json.dumps({**live, "heartbeat": time.time() - 86400}))
    lock = RunLock(loc)
    lock.acquire()
    assert json.loads((folder / ".lock").read_text())["owner"] == lock.owner
    lock.release()


# -- paths that cannot be written ----------------------------------------------------------------

def test_output_and_export_paths_that_cannot_be_written_exit_2_naming_them(tmp_path):
    run = cli("run", str(ORACLE), "--executor", "local", "--quiet", "--device", "cpu", "--set", TINY[0],
              "--output", "/proc/x", "--cache", str(tmp_path / "cache"))
    assert_refused(run, "--output /proc/x: cannot write there", "choose an output folder")

    out = tmp_path / "out"
    run_oracle(tmp_path, out)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    export = cli("export", str(out), "--format", "gqa", "--answer", "question_type",
                 "--out", str(a_file / "sub" / "p.json"))
    assert_refused(export, f"{a_file / 'sub' / 'p.json'}: cannot write", f"{a_file} is a file", "--out")
