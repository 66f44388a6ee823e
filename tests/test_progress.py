"""What a run shows while it works: the dataset being read, models loading, rows as batches
finish; one plain line per tick without a terminal, nothing with --quiet."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from conftest import GRAPHS
from runtime.api import run_graph
from runtime.progress import READ_STEP, Progress

ORACLE = str(GRAPHS / "oracle_heatmap.yaml")
SMALL = ["--set", "shard_size=8", "--set", "dataset.num_images=4"]  # 16 samples in 3 shards


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_cli(tmp_path, *args: str, seconds: str = "0") -> subprocess.CompletedProcess:
    """``runtime run`` with stdout and stderr piped (no terminal), progress lines every ``seconds``."""
    env = {**os.environ, "RUNTIME_PROGRESS_SECONDS": seconds}
    proc = subprocess.run([sys.executable, "-m", "runtime", "run", *args, "--executor", "local", "--device", "cpu",
                           *SMALL, "--cache", str(tmp_path / "c")], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[progress]")]


def sample_lines(stderr: str) -> list[str]:
    return [line for line in progress_lines(stderr) if " samples, " in line]


def test_without_a_terminal_one_line_per_tick_for_the_whole_run(tmp_path):
    proc = run_cli(tmp_path, ORACLE, "--output", str(tmp_path / "o"))
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    lines = sample_lines(proc.stderr)
    assert "[progress] dataset: 16 records read in" in proc.stderr
    assert all(line.startswith("[progress] ") and "/16 samples" in line for line in lines)
    assert lines[-1].startswith("[progress] 16/16 samples") and sum("16/16" in line for line in lines) == 1
    # rows move as batches finish, before their shard does: nodes are named in the lines of shard 0
    assert any(line.startswith("[progress] 0/16 samples") and "shard 0: patches at 4 samples" in line for line in lines)
    assert all(a != b for a, b in zip(lines, lines[1:]))


def test_a_sweep_prints_one_line_per_tick_and_one_last_line(tmp_path, write_graph):
    other = write_graph(f"extends: {ORACLE}\nname: oracle_b\n", "b.yaml")
    proc = run_cli(tmp_path, ORACLE, str(other), "--output", str(tmp_path / "sweep"), seconds="1000")
    lines = sample_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("[progress] 16/16 samples"), proc.stderr  # the last one only


def test_quiet_prints_no_progress(tmp_path):
    proc = run_cli(tmp_path, ORACLE, "--output", str(tmp_path / "o"), "--quiet")
    assert progress_lines(proc.stderr) == [] and proc.stderr == ""


def test_reading_the_dataset_shows_records_read():
    plain = io.StringIO()
    shown = Progress(True, 0.0, stream=plain)
    assert sum(1 for _ in shown.reading({"i": i} for i in range(2 * READ_STEP + 5))) == 2 * READ_STEP + 5
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith(f"[progress] reading dataset: {READ_STEP} records")
    assert lines[-1].startswith(f"[progress] dataset: {2 * READ_STEP + 5} records read in")
    terminal = Terminal()
    list(Progress(True, 0.0, stream=terminal).reading({"i": i} for i in range(READ_STEP + 1)))
    assert "reading dataset" in terminal.getvalue() and "records read in" in terminal.getvalue()
    quiet = io.StringIO()
    list(Progress(False, 0.0, stream=quiet).reading({"i": i} for i in range(READ_STEP + 1)))
    assert quiet.getvalue() == ""


class Ctx:
    """What Progress reads of a RunContext: the graph's name and its nodes' summaries."""

    def __init__(self, name: str, nodes: list[str]):
        from types import SimpleNamespace

        from runtime.run import NodeSummary

        self.graph = SimpleNamespace(name=name)
        self.summary = SimpleNamespace(nodes={n: NodeSummary(n) for n in nodes})


def test_node_bars_move_per_batch_and_end_exact():
    shown = Progress(True, 0.0, stream=Terminal())
    shown.start([Ctx("g", ["image", "qa"])], 20)
    shown.rows("g", "image", 0, 4)
    shown.rows("g", "qa", 0, 3)
    assert (shown.node_bars["image"].n, shown.node_bars["qa"].n, shown.sample_bar.n) == (4, 3, 0)
    shown.shard(0, 12)  # batches covered fewer (rows failed upstream are skipped): the shard's count wins
    shown.rows("g", "qa", 0, 5)  # late: its shard is counted
    shown.rows("g", "image", 1, 8)
    shown.shard(1, 8)
    assert (shown.node_bars["image"].n, shown.node_bars["qa"].n, shown.sample_bar.n) == (20, 20, 20)
    shown.close()


@pytest.mark.slow  # builds a model (torch and its import: about 15 s)
def test_model_loading_is_shown(tmp_path, capsys, write_graph):
    graph = write_graph(f"""
        extends: {GRAPHS / "pnp_vqa.yaml"}
        dataset: {{params: {{num_images: 1, questions_per_image: 1}}}}
        nodes: {{caption: null, answer: null, accuracy: null}}
        outputs: [gradcam.heatmap]
        """)
    run_graph(graph, executor="local", output=tmp_path / "o", cache_dir=tmp_path / "c", presets=["tiny"],
              device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "[progress] loading model gradcam (itm_gradcam, preset tiny) on cpu..." in err
    assert "[progress] model gradcam (itm_gradcam, preset tiny) ready in" in err
