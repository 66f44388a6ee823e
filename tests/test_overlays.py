"""Overlays: template nodes expanded once per output of their roles (graphs/overlays/), named,
wired and kept as plain nodes; `--set` on a template; errors naming file, node and field."""

from __future__ import annotations

import sys

import pytest

from artifacts.columns import TensorSpec
from conftest import GRAPHS, ROOT, runtime_cli
from runtime.errors import GraphError
from runtime.graph import load_graph
from stages import STAGES, Input, Output, Stage, StageParams

FAITHFULNESS = GRAPHS / "overlays" / "faithfulness.yaml"
KEPT = ["deletion_auc", "insertion_auc", "road_auc", "random_deletion_auc", "random_insertion_auc", "random_road_auc",
        "centre_deletion_auc", "centre_insertion_auc", "centre_road_auc", "deletion_curve", "insertion_curve",
        "road_curve"]


def faithfulness_nodes(graph) -> dict[str, str]:
    """``{node: the column its heatmap input reads}`` for the graph's heatmap_faithfulness nodes."""
    return {n: str(nd.inputs["heatmap"]) for n, nd in graph.nodes.items() if nd.stage.name == "heatmap_faithfulness"}


def test_esam_enhanced_gets_one_node_per_heatmap_wired_and_kept():
    base = load_graph(GRAPHS / "esam_enhanced.yaml")
    g = load_graph(GRAPHS / "esam_enhanced.yaml", overlays=[FAITHFULNESS])
    assert faithfulness_nodes(g) == {"faithfulness_gradcam": "gradcam.heatmap", "faithfulness_enhance": "enhance.heatmap"}
    node = g.nodes["faithfulness_enhance"]
    assert {k: str(v) for k, v in node.inputs.items()} == {
        "pixels": "pixels.pixels", "question": "source.question", "heatmap": "enhance.heatmap"}
    assert node.stage.params.steps == 8 and node.stage.params.preset == "shapes"
    assert node.origin == str(FAITHFULNESS)
    added = [str(r) for r in g.outputs[len(base.outputs):]]
    assert added == [f"faithfulness_{n}.{c}" for n in ("gradcam", "enhance") for c in KEPT]
    assert [str(r) for r in g.outputs[:len(base.outputs)]] == [str(r) for r in base.outputs]
    # a --overlay names the run folder after both; every base node is exactly as without it
    assert g.name == "esam_enhanced-faithfulness"
    assert {n: g.raw["nodes"][n] for n in base.raw["nodes"]} == base.raw["nodes"]


def test_shipped_faithfulness_graph_is_the_overlay_on_esam_enhanced():
    g = load_graph(GRAPHS / "faithfulness.yaml")
    assert g.name == "faithfulness"  # overlays the file names itself keep its name
    assert faithfulness_nodes(g) == {"faithfulness_gradcam": "gradcam.heatmap", "faithfulness_enhance": "enhance.heatmap"}


@pytest.mark.parametrize("graph, expected", [
    ("pnp_vqa.yaml", {"faithfulness_gradcam": "gradcam.heatmap"}),
    ("qavit.yaml", {"faithfulness_qavit": "qavit.heatmap"}),
    ("fusion_gradcam.yaml", {"faithfulness_gradcam": "gradcam.heatmap"}),
    ("fusion_caption.yaml", {"faithfulness_gradcam": "gradcam.heatmap"}),
])
def test_every_shipped_heatmap_graph_takes_the_overlay(graph, expected):
    assert faithfulness_nodes(load_graph(GRAPHS / graph, overlays=[FAITHFULNESS])) == expected


def test_presets_and_a_set_on_the_template_reach_every_expanded_node():
    g = load_graph(GRAPHS / "esam_enhanced.yaml", ["faithfulness.steps=4", "faithfulness_enhance.fill=mean"],
                   presets=["tiny"], overlays=[FAITHFULNESS])
    params = {n: g.nodes[n].stage.params for n in faithfulness_nodes(g)}
    assert {n: (p.steps, p.preset, p.fill) for n, p in params.items()} == {
        "faithfulness_gradcam": (4, "tiny", "blur"), "faithfulness_enhance": (4, "tiny", "mean")}


class _Params(StageParams):
    pass


class _PluginHeatmap(Stage):
    """Stands in for a plugin's heatmap stage (examples/heatmap_plugin: role heatmap)."""

    name = "test_plugin_heatmap"
    Params = _Params
    INPUTS = {"heatmap": Input(TensorSpec("float32", ("g", "g")), "a heatmap")}
    OUTPUTS = {"heatmap": Output(TensorSpec("float32", ("g", "g")), "the same", role="heatmap"),
               "layers": Output(TensorSpec("float32", (3, "g", "g")), "per-layer maps [L, g, g]", role="attention")}

    def process(self, batch):
        return {"heatmap": batch["heatmap"], "layers": batch["heatmap"][:, None].repeat(3, 1)}


@pytest.fixture
def plugin_stage():
    STAGES[_PluginHeatmap.name] = _PluginHeatmap
    yield _PluginHeatmap
    del STAGES[_PluginHeatmap.name]


def test_plugin_heatmap_is_picked_up_and_attention_maps_that_do_not_fit_are_left_out(plugin_stage, write_graph):
    graph = write_graph(f"""
        extends: {GRAPHS / 'pnp_vqa.yaml'}
        name: plugin
        nodes:
          prior: {{stage: test_plugin_heatmap, inputs: {{heatmap: gradcam.heatmap}}}}
        """)
    g = load_graph(graph, overlays=[FAITHFULNESS])
    # prior.layers has role attention but is [3, g, g]: the [g, g] heatmap input does not take it
    assert faithfulness_nodes(g) == {"faithfulness_gradcam": "gradcam.heatmap", "faithfulness_prior": "prior.heatmap"}
    assert f"overlay {FAITHFULNESS}: template 'faithfulness' passes over prior.layers, which does not fit input " \
           "'heatmap' (expected 2 dimensions (float32[g, g]))" in g.notes


def test_the_example_plugin_stage_is_picked_up_by_its_role():
    sys.path.insert(0, str(ROOT / "examples" / "heatmap_plugin"))
    try:
        from center_prior_heatmap import CenterPrior
    finally:
        sys.path.pop(0)
    STAGES[CenterPrior.name] = CenterPrior
    try:
        g = load_graph(ROOT / "examples" / "heatmap_plugin" / "graphs" / "center_prior.yaml", overlays=[FAITHFULNESS])
    finally:
        del STAGES[CenterPrior.name]
    assert faithfulness_nodes(g) == {"faithfulness_gradcam": "gradcam.heatmap", "faithfulness_prior": "prior.heatmap"}


def overlay(write_graph, template: str, name: str = "o.yaml"):
    return write_graph(f"""
        nodes:
          score:
            stage: heatmap_faithfulness
            inputs: {{pixels: pixels.pixels, question: source.question}}
        {template}
        """, name)


def problems_of(*args, **kw) -> list[str]:
    with pytest.raises(GraphError) as exc:
        load_graph(*args, **kw)
    return [str(p) for p in exc.value.problems]


def test_a_template_input_the_stage_lacks_is_named(write_graph):
    path = overlay(write_graph, "    for_each_output: {roles: [heatmap], input: heatmaps}")
    assert problems_of(GRAPHS / "pnp_vqa.yaml", overlays=[path]) == [
        f"{path}, node 'score', field 'for_each_output.input': stage 'heatmap_faithfulness' has no input "
        "'heatmaps'; inputs: pixels, question, heatmap"]


def test_a_template_matching_no_output_is_named_with_what_did_not_fit(plugin_stage, write_graph):
    path = overlay(write_graph, "    for_each_output: {roles: [attention], input: heatmap}")
    assert problems_of(GRAPHS / "pnp_vqa.yaml", overlays=[path]) == [
        f"{path}, node 'score', field 'for_each_output.roles': graph 'pnp_vqa' ({GRAPHS / 'pnp_vqa.yaml'}) has no "
        "output with role attention that fits input 'heatmap' (float32[g, g]): it has none"]
    graph = write_graph(f"""
        extends: {GRAPHS / 'pnp_vqa.yaml'}
        nodes:
          prior: {{stage: test_plugin_heatmap, inputs: {{heatmap: gradcam.heatmap}}}}
        """, "plugin.yaml")
    assert problems_of(graph, overlays=[path])[0].endswith(
        "that fits input 'heatmap' (float32[g, g]): prior.layers does not fit (expected 2 dimensions (float32[g, g]))")


def test_bad_roles_and_wiring_of_the_template_are_named(write_graph):
    path = overlay(write_graph, "    for_each_output: {roles: [heatmapp], input: heatmap}")
    assert "field 'for_each_output.roles': expected a list of roles (heatmap, enhanced_heatmap" \
        in problems_of(GRAPHS / "pnp_vqa.yaml", overlays=[path])[0]
    # an input the expanded node cannot find: the overlay file and the expanded node are named
    assert problems_of(GRAPHS / "oracle_heatmap.yaml", overlays=[FAITHFULNESS])[0].startswith(
        f"{FAITHFULNESS}, node 'faithfulness_oracle', field 'inputs.pixels': unknown node 'pixels'")


def test_an_expanded_name_taken_by_the_graph_is_an_error(write_graph):
    graph = write_graph(f"""
        extends: {GRAPHS / 'pnp_vqa.yaml'}
        nodes:
          faithfulness_gradcam: {{stage: heatmap_metrics, inputs: {{heatmap: gradcam.heatmap, gt_mask: source.gt_mask}}}}
        """)
    assert problems_of(graph, overlays=[FAITHFULNESS]) == [
        f"{FAITHFULNESS}, node 'faithfulness': expands to node 'faithfulness_gradcam' for gradcam.heatmap, but graph "
        "'pnp_vqa' already has a node of that name; rename the template"]


def test_cli_show_prints_the_expansion_and_validate_checks_it():
    shown = runtime_cli("show", str(GRAPHS / "qavit.yaml"), "--overlay", str(FAITHFULNESS))
    assert shown.returncode == 0, shown.stderr
    assert "name: qavit-faithfulness" in shown.stdout and "  faithfulness_qavit:\n    stage: heatmap_faithfulness" \
        in shown.stdout and "heatmap: qavit.heatmap" in shown.stdout
    bad = runtime_cli("validate", str(GRAPHS / "oracle_heatmap.yaml"), "--overlay", str(FAITHFULNESS))
    assert bad.returncode == 2 and "node 'faithfulness_oracle', field 'inputs.pixels'" in bad.stderr


def test_a_graph_names_its_overlays_relative_to_itself_and_they_carry_along_extends(write_graph, tmp_path):
    (tmp_path / "sub").mkdir()
    child = write_graph(f"""
        extends: {GRAPHS / 'faithfulness.yaml'}
        name: child
        nodes:
          enhance: {{params: {{alpha: 0.25}}}}
        """, "sub/child.yaml")
    g = load_graph(child)
    assert g.name == "child" and set(faithfulness_nodes(g)) == {"faithfulness_gradcam", "faithfulness_enhance"}
    bad = write_graph(f"extends: {GRAPHS / 'pnp_vqa.yaml'}\noverlays: overlays/faithfulness.yaml\n")
    assert problems_of(bad) == [f"{bad}, field 'overlays': must be a list of overlay files (paths relative to this "
                                "file, e.g. [overlays/faithfulness.yaml]); got 'overlays/faithfulness.yaml'"]
    missing = write_graph(f"extends: {GRAPHS / 'pnp_vqa.yaml'}\noverlays: [nope.yaml]\n", "m.yaml")
    assert problems_of(missing) == [f"{tmp_path / 'nope.yaml'}: overlay file not found"]
