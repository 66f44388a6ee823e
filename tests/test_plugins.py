"""Plugins: a package installed beside the project adds a stage (examples/heatmap_plugin) or a
dataset source (examples/folder_source_plugin) that graphs can name, without editing the project;
broken or clashing plugins are named."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from plugins import Registry

pytestmark = pytest.mark.slow

PLUGIN = ROOT / "examples" / "heatmap_plugin"
SOURCE_PLUGIN = ROOT / "examples" / "folder_source_plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example plugins installed (pip, no index, no network) into a folder of their own."""
    target = tmp_path_factory.mktemp("site")
    for plugin in (PLUGIN, SOURCE_PLUGIN):
        source = tmp_path_factory.mktemp("src") / plugin.name
        shutil.copytree(plugin, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # pip builds in place
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--no-build-isolation", "--target", str(target), str(source)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    return env


def runtime(env, *args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "runtime", *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_plugin_stage_is_listed_with_its_origin_and_runs_in_a_graph(installed, tmp_path):
    listed = runtime(installed, "stages", "center_prior")
    assert listed.returncode == 0, listed.stderr
    assert "defined in: center_prior_heatmap" in listed.stdout and "entry point 'center_prior" in listed.stdout
    graph = PLUGIN / "graphs" / "center_prior.yaml"
    done = runtime(installed, "run", str(graph), "--preset", "tiny", "--executor", "local", "--quiet", "--device", "cpu",
                   "--set", "dataset.num_images=2", "--set", "caption.num_captions=1", "--set", "caption.max_rounds=1",
                   "--output", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "run" / "results.parquet").to_pylist()
    assert len(table) == 8 and all(r["status"] == "ok" for r in table)
    for row in table:  # strength 0.5: the centre cells keep most of their weight, the corners about half
        grad = np.asarray(row["gradcam.heatmap"], dtype=np.float32)
        prior = np.asarray(row["prior.heatmap"], dtype=np.float32)
        ratio = prior[grad > 0] / grad[grad > 0]
        assert (ratio <= 1 + 1e-6).all() and (ratio >= 0.5).all()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["graph"]["nodes"]["prior"]["stage"] == "center_prior"
    assert manifest["roles"]["prior.heatmap"] == "heatmap"
    # the report shows the plugin's heatmap as the project's own, under its node's name
    reported = runtime(installed, "report", str(tmp_path / "run"), "--output", str(tmp_path / "report"))
    assert reported.returncode == 0, reported.stderr
    html = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', html, re.S)[1])
    assert data["views"]["prior"] == "prior heatmap" and data["runs"][0]["heatmaps"] == ["heatmap", "prior"]
    assert all({"heatmap", "prior"} <= set(s["r"][0]["v"]) for s in data["samples"])
    assert "pointing game (prior)" in dict(data["metrics"])
    # the faithfulness overlay finds the plugin's heatmap by its role
    shown = runtime(installed, "show", str(graph), "--overlay", str(ROOT / "graphs" / "overlays" / "faithfulness.yaml"))
    assert shown.returncode == 0, shown.stderr
    assert "faithfulness_prior:" in shown.stdout and "heatmap: prior.heatmap" in shown.stdout


def test_plugin_source_is_listed_with_its_origin_and_feeds_a_graph(installed, tmp_path):
    import cv2

    listed = runtime(installed, "sources", "image_folder")
    assert listed.returncode == 0, listed.stderr
    assert "defined in: image_folder_source" in listed.stdout and "entry point 'image_folder" in listed.stdout
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("blue.png", (255, 0, 0)), ("red.jpg", (0, 0, 255))):  # BGR
        picture = np.full((48, 64, 3), 230, np.uint8)
        cv2.circle(picture, (32, 24), 12, colour, -1)
        cv2.imwrite(str(photos / name), picture)
    (photos / "notes.txt").write_text("not an image")
    done = runtime(installed, "run", str(SOURCE_PLUGIN / "graphs" / "ask_folder.yaml"), "--preset", "tiny",
                   "--executor", "local", "--quiet", "--device", "cpu", "--set", f"dataset.folder={photos}",
                   "--set", "caption.num_captions=1", "--set", "caption.max_rounds=1",
                   "--output", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "run" / "results.parquet").to_pylist()
    assert [r["sample_id"] for r in table] == ["blue.png-q0", "blue.png-q1", "red.jpg-q0", "red.jpg-q1"]
    assert all(r["status"] == "ok" and r["answer.answer"] is not None for r in table)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["graph"]["dataset"]["source"] == "image_folder"


def test_without_the_plugin_the_graph_names_the_missing_stage(tmp_path):
    done = runtime(os.environ.copy(), "validate", str(PLUGIN / "graphs" / "center_prior.yaml"))
    assert done.returncode == 2 and "center_prior" in done.stderr + done.stdout


class FakeEntryPoint:
    def __init__(self, name, value, load):
        self.name, self.value, self.dist, self._load = name, value, None, load

    def load(self):
        return self._load()


class Thing:
    def __init__(self, name):
        self.name = name


def registry_with(monkeypatch, *points):
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: list(points))
    reg = Registry("thing", "test.things", lambda t: t.name)
    reg.add(Thing("builtin"), "here")
    return reg


def test_clashing_misnamed_and_broken_plugins_are_named_and_left_out(monkeypatch, capsys):
    reg = registry_with(monkeypatch, FakeEntryPoint("builtin", "pkg:other", lambda: Thing("builtin")))
    assert list(reg) == ["builtin"] and reg.origin("builtin") == "here"
    assert re.search("two things are named 'builtin': here and .*pkg:other", reg.failure("builtin"))
    reg = registry_with(monkeypatch, FakeEntryPoint("alias", "pkg:thing", lambda: Thing("real")))
    assert "alias" not in reg and "real" not in reg
    assert "called 'real'; the entry point must have the same name" in reg.failure("alias")
    reg = registry_with(monkeypatch, FakeEntryPoint("bad", "pkg:missing", lambda: 1 / 0),
                        FakeEntryPoint("exits", "pkg:exits", lambda: sys.exit(3)),
                        FakeEntryPoint("extra", "pkg:extra", lambda: Thing("extra")))
    assert sorted(reg) == ["builtin", "extra"] and "entry point 'extra = pkg:extra'" in reg.origin("extra")
    assert re.search("'bad = pkg:missing'.*cannot be loaded: ZeroDivisionError", reg.failure("bad"))
    assert "cannot be loaded: SystemExit: 3" in reg.failure("exits") and reg.failure("extra") is None
    warnings = capsys.readouterr().err
    assert "warning: two things are named 'builtin'" in warnings
    assert all(f"warning: entry point '{n}" in warnings for n in ("alias", "bad", "exits"))
    reg = registry_with(monkeypatch, FakeEntryPoint("stop", "pkg:stop", lambda: (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during a plugin's import still stops the command
        "stop" in reg
