"""Shared fixtures: graph files written into tmp folders, one Ray for the whole session."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ROOT / "graphs"


@pytest.fixture
def write_graph(tmp_path):
    """Write a YAML graph (dedented) into tmp_path and return its path."""

    def write(text: str, name: str = "g.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray started once for every test that needs it, stopped by handle at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=256 * 2**20)
    yield ray
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
