"""Every graph-validation error kind, with the message checked (file, node, field, what is valid)."""

from __future__ import annotations

import pytest

from runtime.errors import GraphError
from runtime.graph import load_graph

HEAD = """
dataset:
  source: shapes
  params: {num_images: 2}
nodes:
"""


def problems(path, overrides=None) -> list[str]:
    with pytest.raises(GraphError) as info:
        load_graph(path, overrides)
    return [str(p) for p in info.value.problems]


def test_valid_graph_resolves_types(write_graph):
    g = load_graph(write_graph(HEAD + """
  oracle: {stage: mask_heatmap, params: {grid: 12}, inputs: {mask: source.gt_mask}}
  patches: {stage: sample_patches, params: {num_captions: 3, num_patches: 7}, inputs: {heatmap: oracle.heatmap}}
outputs: [patches.patches]
"""))
    assert list(g.nodes) == ["oracle", "patches"]
    assert g.nodes["oracle"].output_types["heatmap"].shape == [12, 12]
    assert g.nodes["patches"].output_types["patches"].shape == [3, 7]


def test_unknown_stage_suggests(write_graph):
    path = write_graph(HEAD + "  pts: {stage: heatmap_point, inputs: {}}\noutputs: []\n")
    [msg] = problems(path)
    assert str(path) in msg and "node 'pts'" in msg and "field 'stage'" in msg
    assert "unknown stage 'heatmap_point'" in msg and "did you mean 'heatmap_points'" in msg


def test_unknown_and_ill_typed_params(write_graph):
    path = write_graph(HEAD + """
  oracle: {stage: mask_heatmap, params: {grid: many, sigmaa: 1}, inputs: {mask: source.gt_mask}}
outputs: []
""")
    msgs = problems(path)
    assert any("field 'params.sigmaa'" in m and "unknown parameter" in m and "did you mean 'sigma'" in m
               and "valid parameters:" in m for m in msgs)
    assert any("field 'params.grid'" in m and "'many'" in m and "expected int" in m for m in msgs)


def test_missing_input(write_graph):
    path = write_graph(HEAD + """
  oracle: {stage: mask_heatmap, inputs: {mask: source.gt_mask}}
  points: {stage: heatmap_points, inputs: {heatmap: oracle.heatmap}}
outputs: []
""")
    [msg] = problems(path)
    assert "node 'points'" in msg and "field 'inputs.image_size'" in msg
    assert "missing required input 'image_size' (int32[2])" in msg


def test_unknown_node_column_and_input_names(write_graph):
    path = write_graph(HEAD + """
  oracle: {stage: mask_heatmap, inputs: {mask: source.gt_mask}}
  a: {stage: sample_patches, inputs: {heatmap: oracel.heatmap}}
  b: {stage: sample_patches, inputs: {heatmap: oracle.heatmpa}}
  c: {stage: sample_patches, inputs: {heatmap: source.gtmask}}
  d: {stage: sample_patches, inputs: {heatmap: oracle.heatmap, heat: oracle.heatmap}}
outputs: [oracle.nope]
""")
    msgs = problems(path)
    assert any("node 'a'" in m and "unknown node 'oracel'" in m and "did you mean 'oracle'" in m for m in msgs)
    assert any("node 'b'" in m and "no output 'heatmpa'" in m and "outputs: heatmap" in m for m in msgs)
    assert any("node 'c'" in m and "no column 'gtmask'" in m and "did you mean 'gt_mask'" in m for m in msgs)
    assert any("node 'd'" in m and "field 'inputs.heat'" in m and "has no input 'heat'" in m for m in msgs)
    assert any("field 'outputs[0]'" in m and "no output 'nope'" in m for m in msgs)


def test_type_mismatch_names_both_types(write_graph):
    path = write_graph(HEAD + """
  image: {stage: load_image, inputs: {image_bytes: source.image_bytes}}
  oracle: {stage: mask_heatmap, inputs: {mask: source.gt_mask}}
  points: {stage: heatmap_points, inputs: {heatmap: oracle.heatmap, image_size: image.size}}
  bad: {stage: sample_patches, inputs: {heatmap: points.points}}
  worse: {stage: sample_patches, inputs: {heatmap: source.question}}
outputs: []
""")
    msgs = problems(path)
    assert any("node 'bad'" in m and "type mismatch: points.points is float32[5, 2]" in m
               and "float32[g, g]" in m for m in msgs)
    assert any("node 'worse'" in m and "source.question is string" in m for m in msgs)


def test_per_image_stage_rejects_per_question_column(write_graph):
    path = write_graph(HEAD + "  image: {stage: load_image, inputs: {image_path: source.question}}\noutputs: []\n")
    [msg] = problems(path)
    assert "runs once per image" in msg and "source.question is a per-question column" in msg


def test_cycle(write_graph):
    path = write_graph(HEAD + """
  a: {stage: heatmap_enhance, inputs: {heatmap: b.heatmap, mask: source.gt_mask}}
  b: {stage: heatmap_enhance, inputs: {heatmap: a.heatmap, mask: source.gt_mask}}
outputs: []
""")
    msgs = problems(path)
    assert any("cycle:" in m and ("a -> b -> a" in m or "b -> a -> b" in m) for m in msgs)


def test_duplicate_node(write_graph):
    path = write_graph(HEAD + """
  oracle: {stage: mask_heatmap, inputs: {mask: source.gt_mask}}
  oracle: {stage: mask_heatmap, inputs: {mask: source.gt_mask}}
outputs: []
""")
    [msg] = problems(path)
    assert "node 'oracle'" in msg and "duplicate node name 'oracle'" in msg and "line" in msg


def test_unknown_source_and_keys(write_graph):
    path = write_graph("""
dataset: {source: shape}
nodes:
  oracle: {stage: mask_heatmap, inputs: {mask: source.gt_mask}, batchsize: 3}
outputs: []
colour: red
""")
    msgs = problems(path)
    assert any("field 'colour'" in m and "unknown top-level key" in m for m in msgs)


def test_unknown_source(write_graph):
    msgs = problems(write_graph("dataset: {source: shape}\nnodes:\n  a: {stage: load_image}\noutputs: []\n"))
    assert any("field 'dataset.source'" in m and "did you mean 'shapes'" in m for m in msgs)
    msgs = problems(write_graph("dataset: {source: shapes}\nnodes:\n  a: {stage: load_image, batchsize: 3}\noutputs: []\n"))
    assert any("node 'a'" in m and "field 'batchsize'" in m and "valid keys" in m for m in msgs)


def test_bad_yaml_and_missing_file(write_graph, tmp_path):
    msgs = problems(write_graph("nodes: [unclosed\n"))
    assert "not valid YAML" in msgs[0]
    msgs = problems(tmp_path / "nope.yaml")
    assert "graph file not found" in msgs[0]


def test_set_overrides_and_errors(write_graph):
    path = write_graph(HEAD + "  oracle: {stage: mask_heatmap, inputs: {mask: source.gt_mask}}\noutputs: []\n")
    g = load_graph(path, ["oracle.grid=8", "dataset.num_images=5", "oracle.batch_size=3"])
    assert g.nodes["oracle"].stage.params.grid == 8 and g.source.params.num_images == 5
    assert g.nodes["oracle"].batch_size == 3
    msgs = problems(path, ["orcle.grid=8"])
    assert "--set" in msgs[0] and "no node 'orcle'" in msgs[0]
    msgs = problems(path, ["oracle.grid=-3"])
    assert "node 'oracle'" in msgs[0] and "params.grid" in msgs[0]


def test_extends_overrides_adds_and_removes(write_graph):
    write_graph(HEAD + """
  oracle: {stage: mask_heatmap, params: {grid: 12, sigma: 2.0}, inputs: {mask: source.gt_mask}}
  patches: {stage: sample_patches, inputs: {heatmap: oracle.heatmap}}
  metrics: {stage: heatmap_metrics, inputs: {heatmap: oracle.heatmap, gt_mask: source.gt_mask}}
outputs: [patches.patches]
""", name="base.yaml")
    child = write_graph("""
extends: base.yaml
nodes:
  oracle: {params: {grid: 6}}
  metrics: null
  enhance: {stage: heatmap_enhance, inputs: {heatmap: oracle.heatmap, mask: source.gt_mask}}
  patches: {inputs: {heatmap: enhance.heatmap}}
add_outputs: [enhance.heatmap]
""", name="child.yaml")
    g = load_graph(child)
    assert g.nodes["oracle"].stage.params.grid == 6 and g.nodes["oracle"].stage.params.sigma == 2.0
    assert "metrics" not in g.nodes
    assert str(g.nodes["patches"].inputs["heatmap"]) == "enhance.heatmap"
    assert [str(r) for r in g.outputs] == ["patches.patches", "enhance.heatmap"]
    # errors in an inherited node name the file that defined it
    bad = write_graph("extends: base.yaml\nnodes:\n  oracle: {params: {grdi: 3}}\n", name="bad.yaml")
    msgs = problems(bad)
    assert any("bad.yaml" in m and "params.grdi" in m for m in msgs)


def test_bundled_graphs_validate():
    from conftest import GRAPHS

    for path in sorted(GRAPHS.glob("*.yaml")):
        load_graph(path)


def test_preset_sets_every_model_node_that_offers_it():
    from conftest import GRAPHS

    with pytest.raises(GraphError) as info:
        load_graph(GRAPHS / "pnp_vqa.yaml", presets=["huge"])
    [problem] = info.value.problems
    assert problem.file == "--preset" and "presets: 3b, base, large, shapes, tiny" in problem.message
    g = load_graph(GRAPHS / "pnp_vqa.yaml", ["answer.preset=tiny"], presets=["tiny"])
    assert {n.stage.params.preset for n in g.nodes.values() if hasattr(n.stage.params, "preset")} == {"tiny"}
    with pytest.raises(GraphError) as info:
        load_graph(GRAPHS / "oracle_heatmap.yaml", presets=["large"])
    assert "no model nodes" in info.value.problems[0].message


def test_alternative_image_inputs_exactly_one(write_graph):
    head = HEAD + """
  image: {stage: load_image, inputs: {image_bytes: source.image_bytes}}
  pixels: {stage: preprocess_image, inputs: {image: image.image}}
  feats: {stage: blip_features, inputs: {pixels: pixels.pixels}}
"""
    both = write_graph(head + "  g: {stage: itm_gradcam, inputs: {pixels: pixels.pixels, features: feats.features, "
                       "question: source.question}}\noutputs: []\n", name="both.yaml")
    [msg] = problems(both)
    assert "node 'g'" in msg and "wire exactly one of 'pixels'" in msg
    neither = write_graph(head + "  g: {stage: itm_gradcam, inputs: {question: source.question}}\noutputs: []\n",
                          name="neither.yaml")
    assert "wire exactly one" in problems(neither)[0]
    ok = write_graph(head + "  g: {stage: itm_gradcam, inputs: {features: feats.features, question: source.question}}"
                     "\noutputs: [g.heatmap]\n", name="ok.yaml")
    assert load_graph(ok).nodes["g"].inputs["features"].node == "feats"
    # with extends, `input: null` unwires an inherited input
    child = write_graph("extends: both.yaml\nnodes:\n  g: {inputs: {pixels: null}}\n", name="child.yaml")
    assert set(load_graph(child).nodes["g"].inputs) == {"features", "question"}
