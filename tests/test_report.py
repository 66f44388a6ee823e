"""reports: the HTML report of two real runs (esam_enhanced, pnp_vqa), compare(), the
render cache, and the page opened in headless chromium (no script errors, not blank); six
hand-made runs (a plugin's heatmap, one without ground truth) side by side with the colour bars,
the shared heatmap range and the plots; the size and open time of 1,000 questions.

Browser checks: chromium is run twice on the report, once with ``--screenshot`` and once with
``--dump-dom``. The page marks itself: ``data-ready="1"`` on <html> once its script ran to the
end, ``data-js-errors`` from a window 'error' / 'unhandledrejection' hook installed before
the main script, ``data-broken-images`` for pictures that failed to load. The dumped DOM is
therefore a reliable verdict (a script that throws never sets data-ready); chromium's own
console log (``--enable-logging=stderr``: lines with ``:CONSOLE``) is checked as well, for
anything the page logs or any uncaught error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import GRAPHS, ROOT

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
OVERRIDES = ["dataset.num_images=2", "dataset.questions_per_image=2", "caption.num_captions=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small real runs sharing a cache; the caption stage's patch draws of the esam run
    are recorded to check the report's rebuilt patches against them."""
    import stages.blip as blip
    from runtime.api import run_graph

    tmp = tmp_path_factory.mktemp("runs")
    draws: dict[str, np.ndarray] = {}
    original_sample, original_process = blip.sample_patch_sets, blip.Caption.process
    current: list[list[str]] = []

    def process(self, batch):
        current.append(list(batch.row_ids))
        return original_process(self, batch)

    def sample(weights, rngs, num_sets, k):
        out = original_sample(weights, rngs, num_sets, k)
        for sid, sets in zip(current[-1], out):
            draws.setdefault(sid, sets)      # the first round only
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blip, "sample_patch_sets", sample)
        mp.setattr(blip.Caption, "process", process)
        for name in ("esam_enhanced", "pnp_vqa"):
            run_graph(GRAPHS / f"{name}.yaml", executor="local", progress=False, device="cpu", overrides=OVERRIDES,
                      output=tmp / name, cache_dir=tmp / "cache")
            if name == "esam_enhanced":
                esam_draws = dict(draws)
    return {"esam": tmp / "esam_enhanced", "pnp": tmp / "pnp_vqa", "draws": esam_draws, "tmp": tmp}


@pytest.fixture(scope="module")
def report(runs):
    from reports import build_report

    html = build_report([runs["esam"], runs["pnp"]], runs["tmp"] / "report")
    return html


def report_data(html: Path) -> dict:
    text = html.read_text(encoding="utf-8")
    m = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def picture_paths(data: dict) -> list[str]:
    paths = [p["src"] for p in data["plots"]]
    for s in data["samples"]:
        if s["img"]:
            paths.append(s["img"])
        for e in s["r"]:
            if e and e.get("v"):
                paths.extend(e["v"].values())
    return paths


def test_report_lists_every_sample_and_its_pictures_exist(runs, report):
    text = report.read_text(encoding="utf-8")
    ids = set()
    for run in (runs["esam"], runs["pnp"]):
        ids |= set(pq.read_table(run / "results.parquet", columns=["sample_id"]).column(0).to_pylist())
    assert len(ids) == 4
    for sid in ids:
        assert sid in text
    data = report_data(report)
    assert {s["id"] for s in data["samples"]} == ids
    paths = picture_paths(data)
    assert len(paths) > 20
    for p in paths:
        assert p.startswith("data:") or (report.parent / p).is_file(), p
        assert not p.startswith("/") and ".." not in p
    # nothing from the network
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "http://" not in text and "https://" not in text
    # the esam run has every view, pnp_vqa only the heatmap and the (rebuilt) caption patches
    views = [set(s["r"][0]["v"]) for s in data["samples"]], [set(s["r"][1]["v"]) for s in data["samples"]]
    assert all(v == {"heatmap", "enhanced", "points", "mask", "patches"} for v in views[0])
    assert all(v == {"heatmap", "patches"} for v in views[1])
    assert [r["label"] for r in data["runs"]] == ["esam_enhanced", "pnp_vqa"]
    assert len(data["plots"]) == 5
    summary = data["runs"][0]
    assert summary["samples"] == 4 and summary["errors"] == 0
    assert {n[0] for n in summary["nodes"]} >= {"gradcam", "sam", "enhance", "caption", "answer"}
    metrics = dict(data["metrics"])
    assert set(metrics) >= {"VQA accuracy", "pointing game (heatmap)", "pointing game (enhanced)",
                            "energy in mask (heatmap)", "heatmap entropy (heatmap)"}
    assert metrics["pointing game (enhanced)"][1] is None      # pnp_vqa has no enhanced heatmap


def test_report_folder_can_be_moved(report, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(report.parent, moved)
    for p in picture_paths(report_data(moved / report.name)):
        assert (moved / p).is_file()


def test_pictures_are_cached_in_the_run_folder(runs, report):
    from reports import build_report

    index = runs["esam"] / "render" / "index.json"
    assert index.is_file()
    before = {p.name: p.stat().st_mtime_ns for p in (runs["esam"] / "render").glob("*.jpg")}
    assert before
    out = build_report([runs["esam"]], runs["tmp"] / "again.html")
    after = {p.name: p.stat().st_mtime_ns for p in (runs["esam"] / "render").glob("*.jpg")}
    assert after == before                        # nothing redrawn
    assert (runs["tmp"] / "again_files").is_dir() and out.name == "again.html"


def test_rebuilt_caption_patches_are_the_caption_stage_draws(runs):
    from reports.data import Run

    run = Run(runs["esam"])
    assert run.roles.caption_sampling["heatmap"] == "enhance.heatmap"
    rows = run.details(run.sample_ids, ["enhance.heatmap"])
    assert set(runs["draws"]) == set(run.sample_ids)
    for sid, draws in runs["draws"].items():
        assert np.array_equal(run.caption_patches(sid, rows[sid]["enhance.heatmap"]), draws)


def test_limit_rounds_up_to_whole_images(runs, tmp_path):
    from reports import build_report

    html = build_report([runs["esam"], runs["pnp"]], tmp_path / "r.html", limit=1)
    data = report_data(html)
    detailed = [s for s in data["samples"] if s["d"]]
    assert len(detailed) == 2 and len({s["im"] for s in detailed}) == 1   # both questions of image 0
    for s in data["samples"]:
        if not s["d"]:
            assert s["img"] is None and all("v" not in e for e in s["r"])


def test_compare_lists_both_runs(runs):
    from reports import compare

    text = compare([runs["esam"], runs["pnp"]])
    assert "esam_enhanced" in text and "pnp_vqa" in text
    for metric in ("samples", "errors", "VQA accuracy", "pointing game (heatmap)", "energy in mask (heatmap)"):
        assert metric in text
    assert re.search(r"answers differ on \d+ of 4 samples", text)


def test_compare_tables_of_accuracy_by_type_and_difference_are_in_the_summary(tmp_path):
    from reports import build_report
    from test_compare import make_run

    a = make_run(tmp_path / "a", "alpha", {"q0": "dog", "q1": "2", "q2": "blue", "q3": "yes"},
                 accuracy={"q0": 1.0, "q1": 0.3, "q2": 0.0, "q3": 1.0})
    b = make_run(tmp_path / "b", "beta", {"q0": "cat", "q1": "Two", "q2": "Red.", "q3": "yes"}, node="qa")
    html = build_report([a, b], tmp_path / "report", limit=0)
    by_type, difference = report_data(html)["accuracy_tables"]
    assert by_type["rows"][0] == ["overall", "4", "57.50", "75.00", "3", "1", "2", "0"]
    # the same cells as runtime compare prints (tests/test_compare.py), default resamples and seed
    assert difference["title"].startswith("[1] beta - [0] alpha: accuracy difference in points")
    assert difference["rows"][0] == ["overall", "4", "2", "57.50", "75.00", "+17.50", "[-15.00, +50.00]", "1.0000",
                                     "exact, all 4 sign flips"]
    dom = check_page(html, tmp_path)
    assert "accuracy difference in points" in dom and "[-15.00, +50.00]" in dom and "question type: what is" in dom


def test_cli_functions(runs, tmp_path, capsys):
    from reports.cli import compare_main, report_main

    assert compare_main([str(runs["esam"]), str(runs["pnp"])]) == 0
    assert "pnp_vqa" in capsys.readouterr().out
    out = tmp_path / "rep"
    assert report_main([str(runs["pnp"]), "--output", str(out), "--limit", "2"]) == 0
    assert (out / "index.html").is_file() and "report:" in capsys.readouterr().out


def test_missing_run_folder_is_a_usage_error(tmp_path):
    from runtime.errors import UsageError
    from reports import build_report

    with pytest.raises(UsageError, match="no such run folder"):
        build_report([tmp_path / "nope"], tmp_path / "r")


def test_patch_indices_column_and_model_free_run(runs, tmp_path):
    """oracle_heatmap keeps sample_patches' indices: the patches view comes from that column."""
    from runtime.api import run_graph
    from reports import build_report

    run_graph(GRAPHS / "oracle_heatmap.yaml", executor="local", progress=False, device="cpu",
              overrides=OVERRIDES[:2], output=tmp_path / "oracle", cache_dir=runs["tmp"] / "cache")
    data = report_data(build_report([tmp_path / "oracle", runs["esam"]], tmp_path / "rep"))
    oracle = data["runs"][0]
    assert oracle["render_note"] is None              # not rebuilt: the column is there
    assert all(set(s["r"][0]["v"]) == {"heatmap", "enhanced", "points", "patches"} for s in data["samples"])


def test_images_of_a_path_source_are_found_from_the_manifest(tmp_path, monkeypatch):
    """A manifest source with relative image paths, run from its own folder, reported from
    elsewhere: the images are looked up through the run's manifest, non-square sizes kept."""
    import cv2

    from runtime.api import run_graph
    from reports import build_report

    data_dir = tmp_path / "data"
    (data_dir / "img").mkdir(parents=True)
    for name, (h, w) in {"a": (60, 100), "b": (90, 40)}.items():
        cv2.imwrite(str(data_dir / "img" / f"{name}.png"), np.full((h, w, 3), (30, 120, 200), np.uint8))
    rows = [{"image": "img/a.png", "image_id": "a", "question": "what is it?", "answers": ["x"]},
            {"image": "img/a.png", "image_id": "a", "question": "where is it?", "answers": ["y"]},
            {"image": "img/b.png", "image_id": "b", "question": "why?", "answers": ["z"]}]
    (data_dir / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data_dir / "g.yaml").write_text("""
name: paths
dataset: {source: manifest, params: {path: m.jsonl}}
nodes:
  image: {stage: load_image, inputs: {image_path: source.image_path, image_bytes: source.image_bytes}}
outputs: [source.answers, image.size]
""")
    monkeypatch.chdir(data_dir)
    run_graph("g.yaml", executor="local", progress=False, device="cpu", output=data_dir / "run", no_cache=True)
    monkeypatch.chdir(tmp_path)
    html = build_report([data_dir / "run"], tmp_path / "rep")
    data = report_data(html)
    assert data["runs"][0]["render_note"] is None
    sizes = {}
    for s in data["samples"]:
        assert s["img"] and s["r"][0]["st"] == "ok"
        sizes[s["im"]] = cv2.imread(str(html.parent / s["img"])).shape[:2]
    assert sizes == {"a": (60, 100), "b": (90, 40)}


# --- a large synthetic run: the page stays quick --------------------------------------------

def fake_run(folder: Path, n: int, attention: bool = False, name: str = "big", scale: float = 1.0,
             plugin: bool = False, ground_truth: bool = True) -> Path:
    """A results.parquet of ``n`` samples (4 questions per shapes image) and a manifest;
    ``attention`` adds QA-ViT-style attention maps per layer ``[3, 8, 8]``; ``scale`` multiplies
    the heatmaps; ``plugin`` adds a second heatmap as a plugin's stage keeps it (``prior.heatmap``,
    role heatmap: the report knows it by its role only); ``ground_truth=False`` leaves out the
    answers and the accuracy, as a folder of photos with questions has none."""
    from artifacts.columns import python_to_column, tensor_type

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = [f"shapes-0-{i // 4:06d}" for i in range(n)]
    heat = rng.random((n, 24, 24)).astype(np.float32) * np.float32(scale)
    columns = {
        "sample_id": [f"{im}-q{i % 4}" for i, im in enumerate(images)],
        "image_id": images,
        "question": [f"question {i} <b>&amp;</b>?" for i in range(n)],
        "answers": [["yes"] * 10] * n,
        "question_type": rng.choice(["color", "count", "shape"], n).tolist(),
        "gradcam.heatmap": python_to_column(heat, tensor_type("float32", [24, 24]), n),
        "answer.answer": rng.choice(["yes", "no"], n).tolist(),
        "accuracy.accuracy": pa.array(rng.choice([0.0, 1.0], n), pa.float32()),
        "status": ["ok"] * n,
        "error": pa.nulls(n, pa.string()),
    }
    roles = {"gradcam.heatmap": "heatmap", "answer.answer": "answer", "accuracy.accuracy": "accuracy"}
    nodes = {"gradcam": {"stage": "itm_gradcam"}, "answer": {"stage": "qa_fid"}, "accuracy": {"stage": "vqa_eval"}}
    if not ground_truth:
        del columns["answers"], columns["accuracy.accuracy"], roles["accuracy.accuracy"], nodes["accuracy"]
    if plugin:
        prior = heat * np.hanning(24)[:, None].astype(np.float32) * np.hanning(24)[None, :].astype(np.float32)
        columns["prior.heatmap"] = python_to_column(prior, tensor_type("float32", [24, 24]), n)
        roles["prior.heatmap"] = "heatmap"
        nodes["prior"] = {"stage": "center_prior", "inputs": {"heatmap": "gradcam.heatmap"}}
    if attention:
        maps = rng.random((n, 3, 8, 8)).astype(np.float32)
        columns["qavit.layer_attention"] = python_to_column(maps, tensor_type("float32", [3, 8, 8]), n)
        roles["qavit.layer_attention"] = "attention"
    pq.write_table(pa.table(columns), folder / "results.parquet")
    manifest = {"graph": {"name": name, "dataset": {"source": "shapes", "params": {"seed": 0, "num_images": n // 4}},
                          "nodes": nodes},
                "roles": roles, "nodes": {}, "totals": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_attention_maps_per_layer_are_drawn(tmp_path):
    from reports import build_report

    run = fake_run(tmp_path / "attn", 8, attention=True)
    data = report_data(build_report([run], tmp_path / "rep", limit=4))
    views = [set(s["r"][0].get("v", {})) for s in data["samples"]]
    assert views[:4] == [{"heatmap", "attention"}] * 4 and views[4:] == [set()] * 4


def test_each_heatmap_carries_its_range_and_the_colour_bar_is_written(tmp_path):
    run = fake_run(tmp_path / "ranges", 8)
    heat = np.array(pq.read_table(run / "results.parquet", columns=["gradcam.heatmap"]).column(0).to_pylist(),
                    dtype=np.float64).reshape(8, 24, 24)
    heat[1] *= 1e-4                                       # a faint map keeps its own, small range
    html = build_report_of(run, tmp_path / "rep", heat)
    data = report_data(html)
    pictured = [s for s in data["samples"] if s["r"][0].get("v")]
    assert len(pictured) == 4
    for k, s in enumerate(data["samples"][:4]):
        assert s["r"][0]["hr"]["heatmap"] == pytest.approx([heat[k].min(), heat[k].max()])
    assert all("hr" not in s["r"][0] for s in data["samples"][4:])   # no pictures, no legend
    assert (html.parent / data["colorbar"]["src"]).is_file() and data["colorbar"]["colormap"] == "turbo"
    assert data["colorbar"]["opacity"] == [0.3, 0.6] and all("hs" not in s for s in data["samples"])   # one run
    # the same run twice: the shared range is each map's own, so nothing is drawn again
    from reports import build_report

    twice = report_data(build_report([run, run], tmp_path / "twice", limit=4))
    assert [s["hs"]["heatmap"] for s in twice["samples"][:4]] == [s["r"][0]["hr"]["heatmap"] for s in data["samples"][:4]]
    assert all("vs" not in e for s in twice["samples"] for e in s["r"])


def test_answer_counts_of_a_hand_made_run(tmp_path):
    from reports import build_report
    from reports.data import Run
    from reports.plots import answer_counts

    run = fake_run(tmp_path / "answers", 8)
    table = pq.read_table(run / "results.parquet")
    answers = pa.array(["yes", "no", "yes", "red", "yes", "no", None, "red"], pa.string())
    table = table.set_column(table.schema.get_field_index("answer.answer"), "answer.answer", answers)
    pq.write_table(table, run / "results.parquet")
    assert answer_counts(Run(run)) == [("yes", 3), ("no", 2), ("red", 2)]     # ties by answer, no answer left out
    data = report_data(build_report([run], tmp_path / "rep", limit=0))
    assert data["runs"][0]["answers"] == [["yes", 3], ["no", 2], ["red", 2]]
    assert data["runs"][0]["distinct_answers"] == 3
    assert "Answers per run" in [p["title"] for p in data["plots"]]


def test_accuracy_by_answer_type_of_a_hand_made_run(tmp_path):
    from reports.data import Run
    from reports.plots import accuracy_by_type, plot_accuracy_by_type

    run = fake_run(tmp_path / "types", 8)
    table = pq.read_table(run / "results.parquet")
    assert not plot_accuracy_by_type([Run(run)], tmp_path / "none.png", column="answer_type")   # no such column
    acc = pa.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.3, 1.0], pa.float32())
    table = table.set_column(table.schema.get_field_index("accuracy.accuracy"), "accuracy.accuracy", acc)
    table = table.append_column("answer_type", pa.array(["yes/no"] * 5 + ["number"] * 3))
    pq.write_table(table, run / "results.parquet")
    types, means, ns = accuracy_by_type([Run(run)], "answer_type")
    assert types == ["yes/no", "number"] and ns == [[5, 3]]
    assert means[0] == pytest.approx([3 / 5, 1.3 / 3])
    assert plot_accuracy_by_type([Run(run)], tmp_path / "types.png", column="answer_type")


def build_report_of(run: Path, out: Path, heat: np.ndarray) -> Path:
    """The report of ``run`` after its heatmaps were replaced by ``heat``."""
    from artifacts.columns import python_to_column, tensor_type
    from reports import build_report

    table = pq.read_table(run / "results.parquet")
    i = table.schema.get_field_index("gradcam.heatmap")
    column = python_to_column(heat.astype(np.float32), tensor_type("float32", list(heat.shape[1:])), len(heat))
    pq.write_table(table.set_column(i, "gradcam.heatmap", column), run / "results.parquet")
    return build_report([run], out, limit=4)


# --- headless chromium ------------------------------------------------------------------------

def chromium() -> Path:
    if not CHROMIUM.exists():
        script = ROOT / "bin" / "ensure-chromium"
        if script.exists():
            subprocess.run([str(script)], check=False, timeout=600)
    if not CHROMIUM.exists():
        reason = ("not root" if os.geteuid() != 0
                  else "no apt-get" if not shutil.which("apt-get") else "the install failed")
        pytest.skip(f"{CHROMIUM} is missing and could not be installed ({reason}); run bin/ensure-chromium as root")
    return CHROMIUM


def open_page(url: str, profile: Path, *extra: str) -> tuple[str, str]:
    cmd = [str(chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,900",
           "--virtual-time-budget=4000", *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    return proc.stdout, proc.stderr


def console_problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line or "Uncaught" in line or "SyntaxError" in line]


def check_page(html: Path, tmp: Path, fragment: str = "") -> str:
    url = html.resolve().as_uri() + fragment
    dom, err = open_page(url, tmp / "profile-dom", "--dump-dom")
    assert console_problems(err) == []
    head = dom[:dom.find(">", dom.find("<html")) + 1]
    assert 'data-ready="1"' in head, head
    assert "data-js-errors" not in head, head
    assert "data-broken-images" not in head, head
    return dom


def check_screenshot(html: Path, tmp: Path, fragment: str = "") -> Path:
    import cv2

    shot = tmp / f"shot{len(list(tmp.glob('shot*.png')))}.png"
    _, err = open_page(html.resolve().as_uri() + fragment, tmp / "profile-shot", f"--screenshot={shot}")
    assert console_problems(err) == []
    img = cv2.imread(str(shot))
    assert img is not None, f"no screenshot: {err[-2000:]}"
    assert img.shape[:2] == (900, 1280)
    assert img.std() > 20 and (img < 250).mean() > 0.05    # not blank, not all white
    return shot


def test_report_opens_in_chromium_without_errors(report, tmp_path):
    dom = check_page(report, tmp_path)
    assert dom.count("<tr data-sample=") == 8          # 4 samples x 2 runs, one page
    assert dom.count('class="thumb"') == 8                                # a heatmap thumbnail per row
    assert dom.count('class="answers"') == 2 and "answers.png" in dom   # most frequent answers of each run
    check_screenshot(report, tmp_path)
    sid = report_data(report)["samples"][1]["id"]
    dom = check_page(report, tmp_path, f"#sample={sid}")
    assert 'id="tab-sample" class="active"' in dom and "_mask.jpg" in dom and "_heatmap.jpg" in dom
    assert dom.count('class="colorbar small"') >= 3 and "colorbar.png" in dom   # heatmap, enhanced, pnp heatmap
    check_screenshot(report, tmp_path, f"#sample={sid}")
    image = report_data(report)["samples"][0]["im"]
    dom = check_page(report, tmp_path, f"#image={image}")
    assert 'id="tab-image" class="active"' in dom


UI_SCRIPT = """
<script>
(function () {
  var out = {};
  function rows() { return +document.getElementById('samples-table').getAttribute('data-rows'); }
  function shown() { return document.querySelectorAll('#samples-body tr').length; }
  function set(i, value) {
    var sel = document.querySelectorAll('#controls select')[i];
    sel.value = value; sel.dispatchEvent(new Event('change'));
  }
  out.all = rows();
  set(2, '1'); out.run1 = rows(); set(2, '');
  set(0, document.querySelectorAll('#controls select')[0].options[1].value); out.qt = rows(); set(0, '');
  set(1, '0'); out.incorrect = rows(); set(1, '');
  var th = document.querySelectorAll('#samples-head th');
  th[7].click(); th[7].click(); th[2].click();           // ITM twice (desc, asc), then question
  out.firstQuestion = document.querySelector('#samples-body tr td:nth-child(3)').textContent;
  set(4, '25'); out.perPage = shown();
  var box = document.getElementById('filter-text');
  box.value = SID; box.dispatchEvent(new Event('input'));
  setTimeout(function () {
    out.text = rows();
    document.querySelector('#samples-body tr').click();
    setTimeout(function () {
      out.sampleTab = document.getElementById('tab-sample').classList.contains('active');
      out.sampleImages = document.querySelectorAll('#tab-sample img').length;
      document.querySelector('#tab-sample a[href^="#image="]').click();
      setTimeout(function () {
        out.imageTab = document.getElementById('tab-image').classList.contains('active');
        out.imageImages = document.querySelectorAll('#tab-image img').length;
        document.getElementById('btn-plots').click();
        setTimeout(function () {
          out.plots = document.querySelectorAll('#tab-plots img').length;
          document.documentElement.setAttribute('data-ui', JSON.stringify(out));
        }, 50);
      }, 50);
    }, 50);
  }, 400);
})();
</script>
"""


def test_report_controls_work_in_chromium(report, tmp_path):
    """Filters, sorting, paging, row click -> sample view -> image view -> plots, driven by a
    script added to a copy of the page; any script error would show in data-js-errors."""
    import html as html_lib

    data = report_data(report)
    sid = data["samples"][2]["id"]
    page = report.parent / "ui_test.html"
    page.write_text(report.read_text(encoding="utf-8").replace(
        "</body>", UI_SCRIPT.replace("SID", json.dumps(sid)) + "</body>"), encoding="utf-8")
    dom = check_page(page, tmp_path)
    m = re.search(r'data-ui="([^"]*)"', dom[:dom.find(">", dom.find("<html")) + 1])
    assert m, "the UI script did not finish"
    ui = json.loads(html_lib.unescape(m.group(1)))
    incorrect = sum(1 for s in data["samples"] for e in s["r"] if e and e["ok"] == 0)
    questions = sorted(s["q"] for s in data["samples"])
    qtype = sorted({s["qt"] for s in data["samples"]})[0]
    assert ui["all"] == 8 and ui["run1"] == 4 and ui["incorrect"] == incorrect
    assert ui["qt"] == 2 * sum(1 for s in data["samples"] if s["qt"] == qtype)
    assert ui["firstQuestion"] == questions[0]
    assert ui["perPage"] == 8 and ui["text"] == 2
    assert ui["sampleTab"] and ui["sampleImages"] >= 8     # plain image + esam 5 views + pnp 2 views
    assert ui["imageTab"] and ui["imageImages"] >= 6       # plain + 2 questions x (esam heatmap, enhanced; pnp)
    assert ui["plots"] == 5                  # accuracy by question and answer type, entropy, pointing, answers


def test_large_report_paginates(tmp_path):
    from reports import build_report

    run = fake_run(tmp_path / "big", 12000)
    html = build_report([run], tmp_path / "big_report", limit=8, page_size=50)
    data = report_data(html)
    assert len(data["samples"]) == 12000 and sum(s["d"] for s in data["samples"]) == 8
    assert "<b>" not in html.read_text().split('id="report-data"')[1]   # markup in data is escaped
    dom = check_page(html, tmp_path)
    assert dom.count("<tr data-sample=") == 50
    assert 'data-rows="12000"' in dom
    check_screenshot(html, tmp_path, "#samples")


def test_report_of_a_run_without_ground_truth_opens_every_view(tmp_path, write_graph):
    """A manifest dataset (as VQAv2 or GQA) has no masks: the per-sample view has no heatmap
    metrics to show and must still render."""
    import cv2

    from runtime.api import run_graph
    from reports import build_report

    lines = []
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((48, 64, 3), 60 + 80 * i, np.uint8))
        lines += [json.dumps({"sample_id": f"s{i}{q}", "image": f"{i}.png", "question": "what color is it?",
                              "answers": ["red"] * 10}) for q in range(2)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    graph = write_graph(f"""
        extends: {GRAPHS / 'pnp_vqa.yaml'}
        dataset: {{source: manifest, params: {{path: {tmp_path / 'm.jsonl'}}}}}
        nodes:
          heatmap_quality: null
        outputs: [gradcam.heatmap, caption.captions, answer.answer, accuracy.accuracy]
        """)
    run_graph(graph, executor="local", progress=False, device="cpu", presets=["tiny"], output=tmp_path / "run",
              cache_dir=tmp_path / "cache", overrides=["caption.num_captions=2", "caption.min_length=5"])
    html = build_report([tmp_path / "run"], tmp_path / "report")
    check_page(html, tmp_path)
    dom = check_page(html, tmp_path, "#sample=s01")
    assert 'id="tab-sample" class="active"' in dom


def test_a_malformed_link_fragment_opens_the_summary(report, tmp_path):
    dom = check_page(report, tmp_path, "#sample=pct%zz")  # not percent-encoding: decodeURIComponent throws
    assert 'id="tab-summary" class="active"' in dom


SIX_RUNS_SCRIPT = """
<script>
(function () {
  var out = {};
  function fits() { return document.documentElement.scrollWidth <= window.innerWidth; }
  function scales() {
    return Array.prototype.map.call(document.querySelectorAll('#tab-sample .colorbar'), function (c) { return c.getAttribute('data-scale'); });
  }
  function shared() {
    return Array.prototype.filter.call(document.querySelectorAll('#tab-sample img'), function (i) { return i.getAttribute('src').indexOf('_shared-') >= 0; }).length;
  }
  function ranges() {
    return Array.prototype.map.call(document.querySelectorAll('#tab-sample .colorbar'), function (c) { return c.textContent; });
  }
  out.summaryFits = fits();
  location.hash = 'sample=' + encodeURIComponent(SID);
  setTimeout(function () {
    out.columns = document.querySelectorAll('#tab-sample .runcol').length;
    out.sampleFits = fits();
    out.rows = new Set(Array.prototype.map.call(document.querySelectorAll('#tab-sample .runcol'), function (c) { return c.getBoundingClientRect().top; })).size;
    out.ownScales = scales(); out.ownShared = shared(); out.ownRanges = ranges();
    document.querySelector('#tab-sample input[data-scaling="shared"]').click();
    out.sharedScales = scales(); out.sharedPictures = shared();
    out.sharedRanges = ranges();
    document.querySelector('#tab-sample input[data-run="5"]').click();
    out.afterHiding = document.querySelectorAll('#tab-sample .runcol').length;
    document.querySelector('#tab-sample a[href^="#image="]').click();
    setTimeout(function () {
      out.imageFits = fits();
      out.imageRows = document.querySelectorAll('#tab-image tbody tr').length;
      out.imageShared = Array.prototype.filter.call(document.querySelectorAll('#tab-image .colorbar'), function (c) { return c.getAttribute('data-scale') === 'shared'; }).length;
      document.getElementById('btn-plots').click();
      setTimeout(function () {
        var plots = document.querySelectorAll('#tab-plots img');
        out.plots = plots.length;
        out.plotsLoaded = Array.prototype.filter.call(plots, function (i) { return i.complete && i.naturalWidth > 0; }).length;
        out.plotsFit = fits();
        document.documentElement.setAttribute('data-ui', JSON.stringify(out));
      }, 500);
    }, 100);
  }, 100);
})();
</script>
"""


def ui_result(html: Path, tmp: Path, script: str) -> dict:
    """Open a copy of the report with ``script`` added and return what it put in ``data-ui``."""
    import html as html_lib

    page = html.parent / "ui_test.html"
    page.write_text(html.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = check_page(page, tmp)
    m = re.search(r'data-ui="([^"]*)"', dom[:dom.find(">", dom.find("<html")) + 1])
    assert m, "the UI script did not finish"
    return json.loads(html_lib.unescape(m.group(1)))


def test_six_runs_fit_the_page_with_shared_scaling_a_plugin_heatmap_and_a_run_without_ground_truth(tmp_path):
    """Six runs: heatmaps of different strength (run i scaled by 10^-i), run 1 with a plugin's
    heatmap, run 2 without ground truth. Side by side they wrap instead of scrolling sideways,
    each heatmap has a colour bar with its range, and the shared scaling draws one sample's
    heatmaps on one range across the runs."""
    from reports import build_report

    runs = [fake_run(tmp_path / f"run{i}", 8, name=f"variant{i}", scale=10.0 ** -i, plugin=i == 1,
                     ground_truth=i != 2) for i in range(6)]
    html = build_report(runs, tmp_path / "report", limit=4)
    data = report_data(html)
    assert [r["label"] for r in data["runs"]] == [f"variant{i}" for i in range(6)]
    assert data["runs"][1]["heatmaps"] == ["heatmap", "prior"] and data["views"]["prior"] == "prior heatmap"
    s = data["samples"][0]
    own = [e["hr"]["heatmap"] for e in s["r"]]
    assert own[0][1] == pytest.approx(1e5 * own[5][1], rel=1e-3)             # 10^-5 apart
    assert s["hs"] == {"heatmap": [min(r[0] for r in own), max(r[1] for r in own)]}   # prior: one run only
    for i, e in enumerate(s["r"]):
        assert set(e["vs"]) == {"heatmap"} and (html.parent / e["vs"]["heatmap"]).is_file()
        assert e["vs"]["heatmap"] != e["v"]["heatmap"]
    assert {"heatmap", "prior"} <= set(s["r"][1]["v"]) and "prior" in s["r"][1]["hr"]
    assert all(e["acc"] is None and e["ok"] is None for e in (x["r"][2] for x in data["samples"]))
    ui = ui_result(html, tmp_path, SIX_RUNS_SCRIPT.replace("SID", json.dumps(s["id"])))
    assert ui["summaryFits"] and ui["sampleFits"] and ui["imageFits"] and ui["plotsFit"]
    assert ui["columns"] == 6 and ui["rows"] >= 2                             # wrapped, not cut off
    assert ui["ownScales"] == ["own"] * 7 and ui["ownShared"] == 0           # six heatmaps + the plugin's
    # the colour bars in page order: run 0's heatmap, run 1's heatmap and prior, runs 2-5's heatmaps
    assert ui["sharedScales"] == ["shared", "shared", "own"] + ["shared"] * 4 and ui["sharedPictures"] == 6
    shared_text = {t for t, scale in zip(ui["sharedRanges"], ui["sharedScales"]) if scale == "shared"}
    assert len(shared_text) == 1 and len(set(ui["ownRanges"]) - {ui["ownRanges"][2]}) == 6   # one range, not six
    assert ui["sharedRanges"][2] == ui["ownRanges"][2]                        # the plugin's keeps its own
    assert ui["afterHiding"] == 5
    assert ui["imageRows"] == 6 and ui["imageShared"] == 5 * 4               # 5 runs' heatmaps x 4 questions
    assert ui["plots"] == len(data["plots"]) >= 3 and ui["plotsLoaded"] == ui["plots"]
    check_screenshot(html, tmp_path, f"#sample={s['id']}")


def test_a_thousand_question_report_is_small_and_opens_quickly(tmp_path):
    """1,000 questions in two runs, every one pictured (the figures in the README): the page is
    the embedded JSON, its pictures JPEG and loaded as they come into view, and it is ready well
    within two seconds (``data-ready-ms``, measured by the page itself, without virtual time)."""
    from reports import build_report

    runs = [fake_run(tmp_path / "a", 1000, name="a"), fake_run(tmp_path / "b", 1000, name="b", scale=0.5)]
    html = build_report(runs, tmp_path / "report", limit=1000)
    pictures = list((html.parent / "assets").glob("r*/*"))
    assert pictures and all(p.suffix == ".jpg" for p in pictures)
    assert html.stat().st_size < 2e6
    assert sum(p.stat().st_size for p in pictures) / 1000 < 100e3              # per question, both runs
    sid = report_data(html)["samples"][500]["id"]
    for fragment in ("", "#samples", f"#sample={sid}"):
        dom = subprocess.run([str(chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--dump-dom",
                              html.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=90).stdout
        head = dom[:dom.find(">", dom.find("<html")) + 1]
        assert 'data-ready="1"' in head and "data-js-errors" not in head, head
        assert int(re.search(r'data-ready-ms="(\d+)"', head)[1]) < 2000, head
        imgs = re.findall(r"<img [^>]*>", dom)
        assert imgs and all('loading="lazy"' in i for i in imgs)
