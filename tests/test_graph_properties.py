"""Property-based tests (hypothesis): mutations of the shipped graphs. Every invalid one is a
validation error naming file, node and field, never a traceback; every valid model-free one
runs on a few samples."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stages
from conftest import GRAPHS
from runtime.api import run_graph
from runtime.errors import GraphError, UsageError
from runtime.graph import load_graph
from runtime.yaml_io import load_yaml

pytestmark = pytest.mark.slow

SHIPPED = ["oracle_heatmap", "pnp_vqa", "esam_enhanced", "fusion_caption", "fusion_gradcam", "qavit"]
JUNK = [-1, 0, 3, 2.5, "x", "", None, True, [1, 2], {"a": 1}, 10**9, "tiny", "shapes", "source.question"]
STAGE_NAMES = list(stages.STAGES) + ["no_such_stage", ""]
TOP_KEYS = ["dataset", "nodes", "outputs", "shard_size", "name", "unknown_key"]


def resolved(name: str) -> dict:
    """A shipped graph as one self-contained document (its extends chain merged)."""
    g = load_graph(GRAPHS / f"{name}.yaml")
    doc = copy.deepcopy(g.raw)
    for node in doc["nodes"].values():
        node.pop("version", None)
    return doc


DOCS = {name: resolved(name) for name in SHIPPED}


@st.composite
def mutations(draw):
    name = draw(st.sampled_from(SHIPPED))
    doc = copy.deepcopy(DOCS[name])
    nodes = doc["nodes"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "param", "new_param", "rewire", "stage", "top", "output", "batch",
                                     "cycle"]))
        names = list(nodes)
        if not names:
            break
        target = draw(st.sampled_from(names))
        node = nodes[target]
        if kind == "drop":
            del nodes[target]
        elif kind == "param" and node.get("params"):
            node["params"][draw(st.sampled_from(sorted(node["params"])))] = draw(st.sampled_from(JUNK))
        elif kind == "new_param":
            node.setdefault("params", {})["not_a_param"] = draw(st.sampled_from(JUNK))
        elif kind == "rewire" and node.get("inputs"):
            column = draw(st.sampled_from(["heatmap", "image", "size", "nope", "question", "gt_mask", "pixels"]))
            source = draw(st.sampled_from([*names, "source", "ghost"]))
            node["inputs"][draw(st.sampled_from(sorted(node["inputs"])))] = f"{source}.{column}"
        elif kind == "stage":
            node["stage"] = draw(st.sampled_from(STAGE_NAMES))
        elif kind == "top":
            key = draw(st.sampled_from(TOP_KEYS))
            value = draw(st.sampled_from(JUNK))
            if key == "dataset" and draw(st.booleans()):
                doc.pop("dataset", None)
            else:
                doc[key] = value
        elif kind == "output":
            current = doc.get("outputs") if isinstance(doc.get("outputs"), list) else []
            doc["outputs"] = current + [draw(st.sampled_from(
                [f"{target}.nope", "ghost.heatmap", "source.nope", "nonsense", *current[:1]]))]
        elif kind == "batch":
            node["batch_size"] = draw(st.sampled_from(JUNK))
        elif kind == "cycle" and node.get("inputs") and len(names) > 1:
            last = names[-1]
            node["inputs"][sorted(node["inputs"])[0]] = f"{last}.{next(iter(DOCS[name]['nodes'].get(last, {}).get('inputs', {'x': 0})))}"
    return name, doc


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(mutations())
def test_mutated_graphs_fail_validation_cleanly_or_run(tmp_path_factory, mutated):
    name, doc = mutated
    folder = tmp_path_factory.mktemp("g")
    path = folder / "mutant.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert load_yaml(path.read_text()) == doc  # the file says what the mutation made
    try:
        graph = load_graph(path)
    except GraphError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.file == str(path) or problem.file == "--set", problem
            assert problem.node or problem.field, problem
            assert problem.message and "Traceback" not in problem.message
        return
    if name != "oracle_heatmap":  # model graphs: validation only (running them is the slow tests' job)
        return
    try:
        summary = run_graph(graph, overrides=None, executor="local", output=folder / "out", cache_dir=folder / "cache",
                            progress=False, device="cpu", limit=8)
    except UsageError:  # e.g. a dataset parameter the source accepts but that selects nothing
        return
    assert summary.samples <= 8


def test_the_shipped_graphs_themselves_validate():
    for name in SHIPPED:
        assert load_graph(GRAPHS / f"{name}.yaml").nodes


@pytest.mark.parametrize("name", SHIPPED)
def test_resolved_documents_load_back(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(DOCS[name], sort_keys=False))
    assert Path(load_graph(path).path) == path
