"""Shared fixtures: graph files written into tmp folders, one Ray for the whole session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ROOT / "graphs"

# The slow tier: a module whose tests train models, start Ray, open a browser, install a package
# or run whole multi-model graphs says so by a line `pytestmark = pytest.mark.slow` (single tests
# elsewhere carry `@pytest.mark.slow`). `bin/test -m "not slow"` leaves such modules out without
# importing them (collecting them imports torch, transformers, Ray and the trainers): their text
# is searched for that line instead; CI runs everything.
SLOW_MODULE_LINE = re.compile(r"^pytestmark = pytest\.mark\.slow$", re.MULTILINE)


@pytest.fixture(scope="session", autouse=True)
def question_index_folder(tmp_path_factory):
    """Question indexes of the tests' datasets in the session's tmp folder, not ~/.cache (in
    os.environ: the commands the tests start inherit it)."""
    before = os.environ.get("PNPVQA_QUESTION_INDEX")
    os.environ["PNPVQA_QUESTION_INDEX"] = str(tmp_path_factory.mktemp("question-index"))
    yield
    if before is None:
        os.environ.pop("PNPVQA_QUESTION_INDEX")
    else:
        os.environ["PNPVQA_QUESTION_INDEX"] = before


def slow_module(path: Path) -> bool:
    """Whether the test module at ``path`` marks all its tests slow (read as text, not imported)."""
    return path.suffix == ".py" and path.name.startswith("test_") and bool(SLOW_MODULE_LINE.search(path.read_text()))


def pytest_ignore_collect(collection_path, config):
    if config.getoption("markexpr", "").replace(" ", "") == "notslow" and slow_module(collection_path):
        return True
    return None


def runtime_cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> "subprocess.CompletedProcess":
    """``runtime ARGS...`` in a subprocess of this checkout, output captured as text (UTF-8)."""
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"})


@pytest.fixture
def write_graph(tmp_path):
    """Write a YAML graph (dedented) into tmp_path and return its path."""

    def write(text: str, name: str = "g.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


RAY_OPTIONS = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)


@pytest.fixture
def ray_session():
    """An embedded Ray shared by the tests that need one: started by the first, stopped by handle
    at the end of the session (or by a test that needs a Ray of its own, see ``own_ray``)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 2**20, **RAY_OPTIONS)
    yield ray


@pytest.fixture
def own_ray():
    """For tests that start a Ray of their own (logical GPUs, a multi-node cluster): the shared
    one is stopped first, and whatever the test connected to is stopped after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def calls(monkeypatch):
    """Count process() calls per stage name (wraps every registered stage)."""
    import stages

    counter: Counter = Counter()

    for name, cls in stages.STAGES.items():
        original = cls.process

        def counted(self, batch, _orig=original, _name=name):
            counter[_name] += 1
            return _orig(self, batch)

        monkeypatch.setattr(cls, "process", counted)
    return counter


def hub_snapshot(cache: Path, repo: str, source: Path, commit: str = "0123abcd") -> Path:
    """``source`` laid out as the Hugging Face hub cache holds ``repo`` (refs/main -> snapshot)."""
    import shutil

    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    return folder / "snapshots" / commit



# Results of two runs that differ in executor or thread count (docs/store.md, "Floats across
# executors and thread counts"): float values equal within atol + rtol * |value|, all else exactly.
FLOAT_RTOL, FLOAT_ATOL = 1e-5, 1e-6


def _float_pairs(a, b):
    """Check two Arrow tables equal in all but float values: schema (metadata included), row
    count, nulls, list lengths and every non-float value (AssertionError naming the column).
    Yields ``(column, x, y)`` for the float values at any depth (tensors, lists, structs)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    assert a.schema.equals(b.schema, check_metadata=True), f"schemas differ:\n{a.schema}\n---\n{b.schema}"
    assert a.num_rows == b.num_rows, f"{a.num_rows} rows against {b.num_rows}"

    def walk(name, x, y):
        if isinstance(x.type, pa.BaseExtensionType):
            x, y = x.storage, y.storage
        assert x.is_null().equals(y.is_null()), f"{name}: nulls differ"
        t = x.type
        if pa.types.is_floating(t):
            yield name, x.to_numpy(zero_copy_only=False).astype(np.float64), y.to_numpy(zero_copy_only=False).astype(np.float64)
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            assert pc.list_value_length(x).equals(pc.list_value_length(y)), f"{name}: list lengths differ"
            yield from walk(name, x.flatten(), y.flatten())
        elif pa.types.is_struct(t):
            for i in range(t.num_fields):
                yield from walk(name, pc.struct_field(x, [i]), pc.struct_field(y, [i]))
        else:
            assert x.equals(y), f"{name}: values differ"

    for name in a.column_names:
        yield from walk(name, a.column(name).combine_chunks(), b.column(name).combine_chunks())


def assert_tables_close(a, b, rtol: float = FLOAT_RTOL, atol: float = FLOAT_ATOL) -> None:
    """``a`` and ``b`` are the same table but for float rounding: all but float values exactly
    equal, floats within ``atol + rtol * |b|`` (NaN where the other has NaN)."""
    import numpy as np

    for name, x, y in _float_pairs(a, b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


def float_differences(a, b) -> dict[str, tuple[float, float]]:
    """Per column holding floats: the largest absolute and the largest relative difference
    between ``a`` and ``b`` (which must be equal in all else, as for ``assert_tables_close``)."""
    import numpy as np

    found: dict[str, tuple[float, float]] = {}
    for name, x, y in _float_pairs(a, b):
        both = ~(np.isnan(x) | np.isnan(y))
        diff = np.abs(x - y)[both]
        rel = diff / np.maximum(np.abs(y[both]), 1e-30)
        old = found.get(name, (0.0, 0.0))
        found[name] = (max(old[0], float(diff.max(initial=0.0))), max(old[1], float(rel.max(initial=0.0))))
    return found
