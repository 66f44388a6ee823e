"""Running graphs on other data: dataset files (``--dataset``, ``dataset: FILE.yaml``), nodes that
are skipped where the source lacks their columns (``optional: true``), variants that remove a
node, ``runtime validate`` over several graphs, and README's "Your own data" flow on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from conftest import GRAPHS, ROOT, runtime_cli as cli
from runtime.errors import GraphError
from runtime.graph import load_graph
from runtime.run import RunContext
from runtime.shards import iter_shards

SHIPPED = [GRAPHS / "pnp_vqa.yaml", GRAPHS / "esam_enhanced.yaml", GRAPHS / "qavit.yaml"]
IMAGES_ONLY = """
nodes:
  image: {stage: load_image, inputs: {image_path: source.image_path, image_bytes: source.image_bytes}}
outputs: [source.answers, image.size]
"""
DATASET_FILE = "source: vqav2\nparams: {questions: questions.json, annotations: annotations.json, images: images}\n"


def write_vqav2(root: Path) -> Path:
    """A VQAv2-format dataset of real photos (flips and crops of matplotlib's Grace Hopper photo,
    under COCO val2014 names) with its dataset file; returns the dataset file."""
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    w, h = photo.size
    images = {1: photo, 2: ImageOps.mirror(photo), 3: photo.crop((w // 4, h // 8, w * 3 // 4, h // 2))}
    (root / "images").mkdir(parents=True)
    for image_id, image in images.items():
        image.save(root / "images" / f"COCO_val2014_{image_id:012d}.jpg")
    asked = [(1, "what is the woman wearing?", "uniform"), (1, "is she smiling?", "yes"),
             (2, "what color is the background?", "blue"), (3, "how many people are there?", "1")]
    questions = [{"question_id": i, "image_id": im, "question": q} for i, (im, q, _) in enumerate(asked, 1)]
    annotations = [{"question_id": i, "image_id": im, "question_type": "what", "answer_type": "other",
                    "answers": [{"answer": a, "answer_id": k} for k in range(1, 11)]}
                   for i, (im, _, a) in enumerate(asked, 1)]
    (root / "questions.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    (root / "my_data.yaml").write_text(DATASET_FILE)
    return root / "my_data.yaml"


@pytest.fixture
def vqav2(tmp_path) -> Path:
    return write_vqav2(tmp_path / "data")


def keys(graph) -> dict[str, str]:
    ctx = RunContext(graph, "/nonexistent", None, set(), device="cpu")
    return ctx.keys(next(iter(iter_shards(graph.source, graph.shard_size))))


# --- 1: dataset files ------------------------------------------------------------------------

def test_dataset_file_in_a_graph_resolves_like_the_inline_block_and_keeps_its_keys(vqav2, write_graph):
    folder = vqav2.parent
    inline = write_graph(f"""
dataset:
  source: vqav2
  params: {{questions: {folder}/questions.json, annotations: {folder}/annotations.json, images: {folder}/images}}
{IMAGES_ONLY}""", "inline.yaml")
    by_file = write_graph(f"dataset: data/my_data.yaml\n{IMAGES_ONLY}", "by_file.yaml")  # relative to the graph
    a, b = load_graph(inline), load_graph(by_file)
    assert b.raw["dataset"]["params"]["questions"] == str(folder / "questions.json")  # relative to the dataset file
    assert a.raw == {**b.raw, "name": "inline"}
    assert keys(a) == keys(b)


def test_dataset_flag_replaces_the_block_and_set_applies_on_top(vqav2, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # paths in a dataset file do not depend on the working directory
    g = load_graph(GRAPHS / "pnp_vqa.yaml", ["dataset.image_pattern='{image_id:012d}.jpg'"], dataset="data/my_data.yaml")
    assert g.source.name == "vqav2" and g.dataset_file == "data/my_data.yaml"
    assert g.raw["dataset"]["params"]["images"] == str(vqav2.parent / "images")
    assert g.raw["dataset"]["params"]["image_pattern"] == "{image_id:012d}.jpg"


def test_inline_relative_paths_stay_relative_to_the_working_directory(write_graph):
    g = load_graph(write_graph("dataset: {source: manifest, params: {path: data/m.jsonl}}\n" + IMAGES_ONLY
                               .replace("source.answers, ", "")))
    assert g.raw["dataset"]["params"]["path"] == "data/m.jsonl"


def test_uris_in_a_dataset_file_are_not_joined_to_its_folder(tmp_path):
    path = tmp_path / "bucket.yaml"
    path.write_text("source: manifest\nparams: {path: s3://bucket/data/m.jsonl}\n")
    g = load_graph(GRAPHS / "pnp_vqa.yaml", dataset=path)
    assert g.raw["dataset"]["params"]["path"] == "s3://bucket/data/m.jsonl"


@pytest.mark.parametrize("text, field, words", [
    ("source: vqav2\nparams: {questions: q.json, images: i, split: val}\n", "params.split", "unknown parameter"),
    ("source: vqa2\nparams: {}\n", "source", "did you mean 'vqav2'"),
    ("source: vqav2\nparams: {questions: q.json, images: i}\nextra: 1\n", "extra", "valid keys: params, source"),
    ("[vqav2]\n", None, "a dataset file is a YAML mapping {source: NAME"),
])
def test_dataset_file_errors_name_the_file_and_field(tmp_path, text, field, words):
    path = tmp_path / "ds.yaml"
    path.write_text(text)
    with pytest.raises(GraphError) as info:
        load_graph(GRAPHS / "pnp_vqa.yaml", dataset=path)
    [problem] = [p for p in info.value.problems if p.file == str(path)]
    assert problem.field == field and words in problem.message


def test_missing_dataset_file_named_by_the_graph(write_graph):
    with pytest.raises(GraphError) as info:
        load_graph(write_graph("dataset: nowhere.yaml\n" + IMAGES_ONLY))
    [problem] = info.value.problems
    assert problem.file.endswith("nowhere.yaml") and "dataset file not found" in problem.message


def test_set_dataset_source_points_to_the_dataset_flag():
    with pytest.raises(GraphError) as info:
        load_graph(GRAPHS / "pnp_vqa.yaml", ["dataset.source=vqav2"])
    [problem] = info.value.problems
    assert problem.field == "dataset.source" and "--dataset FILE.yaml" in problem.message


@pytest.mark.parametrize("name", ["vqav2_val", "okvqa_val", "gqa_testdev", "manifest"])
def test_shipped_dataset_examples_validate_but_for_their_placeholder_root(name):
    path = ROOT / "datasets" / f"{name}.yaml"
    g = load_graph(GRAPHS / "pnp_vqa.yaml", dataset=path)  # the block itself is valid
    assert g.dataset_file == str(path)
    assert all(str(p).startswith("/data/") for p in (g.raw["dataset"]["params"][k] for k in
                                                       g.source.Params.path_params) if p is not None)


# --- 2: a variant that removes a node --------------------------------------------------------

def test_removing_a_node_drops_its_inherited_outputs_with_a_note(write_graph):
    g = load_graph(write_graph(f"extends: {GRAPHS / 'pnp_vqa.yaml'}\nnodes:\n  heatmap_quality: null\n"))
    assert "heatmap_quality" not in g.nodes and not [r for r in g.outputs if r.node == "heatmap_quality"]
    [note] = g.notes
    assert "node 'heatmap_quality' removed by" in note and "heatmap_quality.pointing_game" in note
    kept = [str(r) for r in load_graph(GRAPHS / "pnp_vqa.yaml").outputs if r.node != "heatmap_quality"]
    assert [str(r) for r in g.outputs] == kept


def test_removed_node_in_own_outputs_is_still_an_error(write_graph):
    path = write_graph(f"extends: {GRAPHS / 'pnp_vqa.yaml'}\nnodes:\n  heatmap_quality: null\n"
                       "outputs: [heatmap_quality.pointing_game]\n")
    with pytest.raises(GraphError) as info:
        load_graph(path)
    assert "unknown node 'heatmap_quality'" in str(info.value.problems[0])


# --- 3: optional nodes -----------------------------------------------------------------------

def test_optional_node_and_its_readers_are_skipped_where_the_source_lacks_a_column(vqav2, write_graph):
    g = load_graph(write_graph(f"""
dataset: data/my_data.yaml
nodes:
  image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
  oracle: {{stage: mask_heatmap, optional: true, inputs: {{mask: source.gt_mask}}}}
  metrics: {{stage: heatmap_metrics, inputs: {{heatmap: oracle.heatmap, gt_mask: source.gt_mask}}}}
outputs: [image.size, oracle.heatmap, metrics.pointing_game]
"""))
    assert list(g.nodes) == ["image"] and [str(r) for r in g.outputs] == ["image.size"]
    assert g.notes == ["node 'oracle' skipped: source 'vqav2' has no column 'gt_mask'; its outputs oracle.heatmap "
                       "are dropped",
                       "node 'metrics' skipped: it reads skipped node 'oracle'; its outputs metrics.pointing_game "
                       "are dropped"]


def test_without_optional_a_missing_source_column_fails_and_suggests_it(vqav2):
    with pytest.raises(GraphError) as info:
        load_graph(GRAPHS / "oracle_heatmap.yaml", dataset=vqav2)
    messages = [p.message for p in info.value.problems if p.field == "inputs.mask"]
    assert messages and all("has no column 'gt_mask'" in m and "`optional: true`" in m for m in messages)


def test_optional_must_be_a_boolean(write_graph):
    path = write_graph("dataset: {source: shapes, params: {num_images: 2}}\nnodes:\n"
                       "  oracle: {stage: mask_heatmap, optional: yes please, inputs: {mask: source.gt_mask}}\n"
                       "outputs: [oracle.heatmap]\n")
    with pytest.raises(GraphError) as info:
        load_graph(path)
    [problem] = info.value.problems
    assert problem.node == "oracle" and problem.field == "optional" and "true or false" in problem.message


def test_shipped_graphs_keep_their_gt_metrics_on_shapes_and_skip_them_on_vqav2(vqav2):
    for path in SHIPPED:
        on_shapes, on_vqav2 = load_graph(path), load_graph(path, dataset=vqav2)
        assert not on_shapes.notes and any(n.stage.name == "heatmap_metrics" for n in on_shapes.nodes.values())
        assert not any(n.stage.name == "heatmap_metrics" for n in on_vqav2.nodes.values())
        assert on_vqav2.notes and all("has no column 'gt_mask'" in n for n in on_vqav2.notes)


def test_kept_source_columns_of_other_datasets_are_dropped_with_a_note(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "question": "what?"}\n')
    (tmp_path / "m.yaml").write_text("source: manifest\nparams: {path: m.jsonl}\n")
    (tmp_path / "g.yaml").write_text(f"extends: {GRAPHS / 'pnp_vqa.yaml'}\nadd_outputs: [source.gt_mask]\n")
    g = load_graph(tmp_path / "g.yaml", dataset=tmp_path / "m.yaml")  # gt_mask: a shapes column
    assert "source.gt_mask" not in [str(r) for r in g.outputs] and "source.answer_type" in [str(r) for r in g.outputs]
    assert any(n.startswith("output source.gt_mask dropped: source 'manifest' has no column") for n in g.notes)


# --- 4 and the CLI ---------------------------------------------------------------------------

def test_cli_validate_several_graphs_with_a_dataset_file(vqav2):
    done = cli("validate", *map(str, SHIPPED[:2]), "--dataset", str(vqav2))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{SHIPPED[0]}: ok — 6 nodes, source 'vqav2'")
    assert any(line.startswith(f"{SHIPPED[1]}: ok") for line in lines)
    assert sum("skipped: source 'vqav2' has no column 'gt_mask'" in line for line in lines) == 3


def test_cli_validate_reports_every_graphs_problems_once(tmp_path):
    bad = tmp_path / "ds.yaml"
    bad.write_text("source: vqav2\nparams: {questions: q.json, images: imgs}\n")
    done = cli("validate", *map(str, SHIPPED[:2]), "--dataset", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count(f"{bad}, field 'params.questions'") == 1


def test_cli_dataset_errors_exit_2_naming_the_file(tmp_path):
    bad = tmp_path / "ds.yaml"
    bad.write_text("source: vqav2\nparams: {questions: q.json, images: imgs, split: val}\n")
    done = cli("run", str(SHIPPED[0]), "--dataset", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{bad}, field 'params.split': unknown parameter" in done.stderr
    done = cli("validate", str(SHIPPED[0]), "--set", "dataset.source=vqav2")
    assert done.returncode == 2 and "--dataset FILE.yaml" in done.stderr


@pytest.mark.slow
def test_readme_own_data_flow_on_real_photos(tmp_path):
    """README, "Your own data": VQAv2-format files of one's own photos, then the shipped graphs
    as a sweep with --dataset (shapes presets, about 30 s on 2 cores)."""
    dataset = write_vqav2(tmp_path / "data")
    done = cli("run", "graphs/pnp_vqa.yaml", "graphs/esam_enhanced.yaml", "graphs/qavit.yaml",
               "--dataset", str(dataset), "--output", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
               "--executor", "local", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("skipped: source 'vqav2' has no column 'gt_mask'") == 4
    for name in ("pnp_vqa", "esam_enhanced", "qavit"):
        results = pq.read_table(tmp_path / "runs" / name / "results.parquet").to_pylist()
        assert [r["sample_id"] for r in results] == ["1", "2", "3", "4"]
        assert all(r["status"] == "ok" and r["answer.answer"] for r in results)
        assert all(0.0 <= r["accuracy.accuracy"] <= 1.0 for r in results)
    runs = [str(tmp_path / "runs" / name) for name in ("pnp_vqa", "esam_enhanced", "qavit")]
    report = cli("report", *runs, "--output", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "index.html").stat().st_size > 0
    compare = cli("compare", *runs)
    assert compare.returncode == 0, compare.stderr
    assert "compared on the 4 samples present in every run" in compare.stdout
    export = cli("export", runs[1], "--format", "vqav2", "--out", str(tmp_path / "answers.json"))
    assert export.returncode == 0, export.stderr
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert sorted(a["question_id"] for a in answers) == [1, 2, 3, 4] and all(a["answer"] for a in answers)
