"""A run killed with SIGKILL resumes with the same command and ends with exactly the rows of an
uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import GRAPHS, ROOT

pytestmark = pytest.mark.slow

# Registers a slow copy of sample_patches, then runs the CLI: slow enough to be killed mid-run.
SCRIPT = """
import sys, time
import stages
from stages.heatmaps import SamplePatches

class SlowPatches(SamplePatches):
    name = "slow_patches"
    def process(self, batch):
        time.sleep(0.25)
        return super().process(batch)

stages.STAGES["slow_patches"] = SlowPatches
from runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(tmp_path, graph, out, cache):
    script = tmp_path / "slow_cli.py"
    script.write_text(SCRIPT)
    return [sys.executable, str(script), "run", str(graph), "--executor", "local", "--quiet", "--device", "cpu",
            "--output", str(out), "--cache", str(cache)]


def _sorted(path):
    return pq.read_table(path).sort_by("sample_id")


def test_sigkill_then_resume_gives_the_uninterrupted_rows(tmp_path, write_graph):
    graph = write_graph(f"""
        extends: {GRAPHS / 'oracle_heatmap.yaml'}
        name: slow
        shard_size: 8
        dataset: {{params: {{num_images: 20}}}}
        nodes:
          patches: {{stage: slow_patches, params: {{num_captions: 3}}, inputs: {{heatmap: enhance.heatmap}}}}
        """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = subprocess.run(_cli(tmp_path, graph, tmp_path / "ref", tmp_path / "ref_cache"), env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.Popen(_cli(tmp_path, graph, out, cache), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if len(list((out / "parts").glob("part-*.parquet"))) >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.parquet").exists()
    done_before = len(list((out / "parts").glob("part-*.parquet")))

    resumed = subprocess.run(_cli(tmp_path, graph, out, cache), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({done_before} already done)" in resumed.stdout or f"({done_before + 1} already done)" in resumed.stdout

    got, want = _sorted(out / "results.parquet"), _sorted(tmp_path / "ref" / "results.parquet")
    assert got.num_rows == want.num_rows == 80
    assert len(set(got.column("sample_id").to_pylist())) == got.num_rows
    assert got.equals(want)
