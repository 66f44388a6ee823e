"""The slow tier is declared in each module (``pytestmark = pytest.mark.slow``) and found by
conftest from the module's text, without importing it: the two must agree, or ``-m "not slow"``
would leave out fast tests (or import slow modules)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import slow_module

TESTS = Path(__file__).resolve().parent


def marked_slow(path: Path) -> bool:
    """Whether the module's top level assigns ``pytest.mark.slow`` (or a list holding it) to ``pytestmark``."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            return any(ast.unparse(v) == "pytest.mark.slow" for v in values)
    return False


def test_conftest_finds_exactly_the_modules_marked_slow():
    modules = sorted(TESTS.glob("test_*.py"))
    assert {p.name for p in modules if slow_module(p)} == {p.name for p in modules if marked_slow(p)}
    assert {"test_sweep.py", "test_training_sam.py", "test_ray_executor.py"} <= {p.name for p in modules if slow_module(p)}
    assert not slow_module(TESTS / "test_graph_validation.py")
