"""A Ray worker whose code or libraries differ from the driver's is refused before any work
(its results would be stored under the driver's cache keys). The same check on a real cluster
node with another numpy: tests/test_ray_cluster_s3.py."""

from __future__ import annotations

import pytest

from runtime.code_identity import code_identity
from runtime.errors import UsageError
from runtime.graph import load_graph
from runtime.worker_code import check_same_code, identities, stage_classes
from conftest import GRAPHS


def test_identities_of_the_graphs_stage_classes():
    classes = stage_classes([load_graph(GRAPHS / "oracle_heatmap.yaml")] * 2)
    assert len(classes) == len(set(classes)) > 1  # each class once, over both graphs
    ident = code_identity(classes[0])
    assert identities(classes)[0] == (ident.code, ident.libraries)

    shipped = type("Shipped", (), {"__module__": "a_module_this_process_never_imported"})
    assert identities((shipped,)) == [None]  # a class pickled by value brings its own code


def test_a_worker_with_other_libraries_or_code_is_refused():
    classes = stage_classes([load_graph(GRAPHS / "oracle_heatmap.yaml")])
    mine = identities(classes)
    code, libraries = mine[0]
    worker = {"host": "node-b", "node_id": "abcdef0123456789"}

    same = [{**worker, "code": list(mine)}]
    check_same_code(classes, same)
    assert "code" not in same[0]  # not carried into the manifest's list of workers

    other_numpy = tuple((k, "9.9" if k == "numpy" else v) for k, v in libraries) + (("timm", "1.0"),)
    with pytest.raises(UsageError) as info:
        check_same_code(classes, [{**worker, "code": [(code, other_numpy), *mine[1:]]}])
    message = str(info.value)
    assert "node-b (node abcdef012345)" in message and f"stage '{classes[0].name}'" in message
    assert f"numpy 9.9 there, {dict(libraries)['numpy']} here, timm 1.0 there, missing here" in message
    assert "install the same checkout and libraries on every node" in message

    with pytest.raises(UsageError, match="the code of the stage or of the project modules it imports differs"):
        check_same_code(classes, [{**worker, "code": [("0" * 64, libraries), *mine[1:]]}])
    check_same_code(classes, [{**worker, "code": [None] * len(classes)}])  # shipped by value: not compared
