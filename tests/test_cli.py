"""The command line: exit codes, one-paragraph errors without tracebacks, listings, cache commands."""

from __future__ import annotations

import json

import os
import socket
import subprocess
import time

import pyarrow.parquet as pq
import pytest

import stages
from conftest import GRAPHS
from runtime.cli import main

ORACLE = str(GRAPHS / "oracle_heatmap.yaml")


def test_validate_ok_and_bad(capsys, write_graph):
    assert main(["validate", ORACLE]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write_graph("dataset: {source: shapes}\nnodes:\n  a: {stage: nope}\noutputs: []\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'nope'" in err and "Traceback" not in err


def test_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert main(["run", ORACLE, "--executor", "local", "--limit", "0", "--output", str(tmp_path / "o")]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["run", ORACLE, "--executor", "local", "--force", "nope", "--output", str(tmp_path / "o")]) == 2
    assert "--force nope" in capsys.readouterr().err
    assert main(["run", ORACLE, "--set", "oops"]) == 2
    assert "NODE.PARAM=VALUE" in capsys.readouterr().err
    assert main(["run", ORACLE, "--ids", "@/nonexistent/ids.txt", "--executor", "local"]) == 2
    assert "not found" in capsys.readouterr().err


def test_stages_lists_params_and_columns(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for name in stages.STAGES:
        assert name in out
    assert main(["stages", "heatmap_points"]) == 0
    out = capsys.readouterr().out
    assert "num_points: int (default 5" in out and "inputs:" in out and "heatmap: float32[g, g]" in out
    assert "points: float32[5, 2] [role: points]" in out  # each output says what it is
    assert main(["stages", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["heatmap_points"]["params"]["properties"]
    assert described["heatmap_enhance"]["roles"] == {"heatmap": "enhanced_heatmap", "status": "status"}


def test_show_yaml_and_dot(capsys):
    assert main(["show", ORACLE, "--set", "points.num_points=3"]) == 0
    out = capsys.readouterr().out
    assert "num_points: 3" in out and "graph_hash" in out and "points.points: float32[3, 2]" in out
    assert main(["show", ORACLE, "--dot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('digraph "oracle_heatmap"') and "oracle -> points" in out


def test_run_limit_ids_and_cache_commands(capsys, tmp_path):
    cache = str(tmp_path / "cache")
    assert main(["run", ORACLE, "--executor", "local", "--limit", "5", "--quiet", "--device", "cpu",
                 "--output", str(tmp_path / "a"), "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "5 samples" in out and "results:" in out
    assert pq.read_table(tmp_path / "a" / "results.parquet").num_rows == 5
    ids = "shapes-8000-000003-q1,shapes-8000-000000-q0"
    assert main(["run", ORACLE, "--executor", "local", "--ids", ids, "--quiet", "--device", "cpu",
                 "--output", str(tmp_path / "b"), "--cache", cache]) == 0
    got = pq.read_table(tmp_path / "b" / "results.parquet").column("sample_id").to_pylist()
    assert sorted(got) == sorted(ids.split(","))
    capsys.readouterr()

    assert main(["cache", "ls", "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "heatmap_points" in out and "load_image" not in out  # decoded images are never cached
    # a temp file of a writer on this host whose process is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = next((tmp_path / "cache" / "heatmap_points").glob("[0-9a-f][0-9a-f]"))
    stray = folder / f".x.parquet.tmp-{socket.gethostname().replace('-', '_')}-{dead.pid}-deadbeef-abcdef"
    stray.write_bytes(b"partial")
    old = next((tmp_path / "cache" / "sample_patches").glob("[0-9a-f][0-9a-f]/*.parquet"))
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    assert main(["cache", "gc", "--cache", cache, "--older-than", "30", "--dry-run"]) == 0
    assert "would remove 2 files" in capsys.readouterr().out and stray.exists()
    assert main(["cache", "gc", "--cache", cache, "--older-than", "30"]) == 0
    assert not stray.exists() and not old.exists()
    assert main(["cache", "gc", "--cache", cache, "--max-size", "1K"]) == 0  # all used just now: kept
    assert main(["cache", "ls", "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "removed 0 files" in out and "total: " in out and "0 bad" in out
    assert main(["cache", "gc", "--cache", cache, "--max-size", "1K", "--grace", "0"]) == 0
    assert main(["cache", "ls", "--cache", cache]) == 0
    assert "total: 0 entries" in capsys.readouterr().out


def test_train_help_lists_every_training_command(capsys):
    from runtime.cli import main
    from runtime.commands import TRAINERS as TRAIN_MODELS

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in TRAIN_MODELS) and "docs/training.md" in out
    assert main(["train"]) == 2  # no model: the same list, as an error


def test_report_commands_parse_their_own_options_and_fail_in_one_line(capsys, tmp_path):
    assert main(["report", str(tmp_path / "nope"), "--limit", "2"]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0
    assert "usage: runtime report" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["stages"], ["stages", "--json"], ["sources"], ["show", ORACLE]])
def test_a_pipe_closed_early_ends_the_command_quietly(command):
    """`runtime stages | head -1`: the reader goes away after one line; no traceback, status 141."""
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "runtime", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) in (0, 141)  # 0: it had written everything before the pipe closed
    assert err == "", err
