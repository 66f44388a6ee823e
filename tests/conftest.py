"""Shared fixtures: graph files written into tmp folders, one Ray for the whole session."""

from __future__ import annotations

import re
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


def slow_module(path: Path) -> bool:
    """Whether the test module at ``path`` marks all its tests slow (read as text, not imported)."""
    return path.suffix == ".py" and path.name.startswith("test_") and bool(SLOW_MODULE_LINE.search(path.read_text()))


def pytest_ignore_collect(collection_path, config):
    if config.getoption("markexpr", "").replace(" ", "") == "notslow" and slow_module(collection_path):
        return True
    return None


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
