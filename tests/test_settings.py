"""Run settings: read once at the edge, passed explicitly to the shard work, its node runners
and Ray workers; the model layer's two environment variables set in one place."""

from __future__ import annotations

import os
import pickle

from conftest import GRAPHS
from models.weights import RANDOM_WEIGHTS_ENV, WEIGHTS_ENV
from runtime import ray_executor
from runtime.graph import load_graph
from runtime.run import RunContext
from runtime.settings import DEBUG_ENV, PROGRESS_SECONDS_ENV, STORAGE_ENV, RunSettings


def test_flags_win_and_the_environment_fills_in(monkeypatch, tmp_path):
    for var in (WEIGHTS_ENV, RANDOM_WEIGHTS_ENV, DEBUG_ENV, PROGRESS_SECONDS_ENV, *STORAGE_ENV):
        monkeypatch.delenv(var, raising=False)
    assert RunSettings.from_environment() == RunSettings()
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    monkeypatch.setenv(DEBUG_ENV, "1")
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    assert RunSettings.from_environment() == RunSettings(debug=True, progress_seconds=0.0, weights=tmp_path)
    flags = RunSettings.from_environment(profile=True, weights=tmp_path / "w", random_weights=True)
    assert flags.weights == tmp_path / "w" and flags.profile and flags.random_weights


def test_a_ray_worker_applies_the_settings_it_is_started_with(monkeypatch, tmp_path):
    """The model layer reads the weights folder and random weights from the environment: each
    worker sets them from its actor's settings, before any model is built."""
    monkeypatch.setenv(WEIGHTS_ENV, "/elsewhere")
    monkeypatch.delenv(RANDOM_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(ray_executor, "apply_threads", lambda threads: None)  # this process keeps its threads
    ray_executor.ShardWorker(1, RunSettings(weights=tmp_path, random_weights=True))
    assert os.environ[WEIGHTS_ENV] == str(tmp_path) and os.environ[RANDOM_WEIGHTS_ENV] == "1"
    ray_executor.ShardWorker(1, RunSettings())
    assert WEIGHTS_ENV not in os.environ and RANDOM_WEIGHTS_ENV not in os.environ


def test_workers_get_the_drivers_s3_endpoint_and_region_but_no_credentials(monkeypatch):
    """A worker reads ``s3://`` images from the store the driver names; the credentials stay
    out of the actor's arguments (kept in Ray's GCS): each node has its own."""
    for var in STORAGE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://head:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    settings = RunSettings.from_environment()
    shipped = pickle.dumps(settings)  # what a Ray worker's actor is created with
    assert b"head:9000" in shipped and not any(s in shipped for s in (b"key-id", b"secret", b"token"))

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://elsewhere:9000")  # the node's own: the driver's wins
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setattr(ray_executor, "apply_threads", lambda threads: None)
    ray_executor.ShardWorker(1, pickle.loads(shipped))
    assert os.environ["AWS_ENDPOINT_URL"] == "http://head:9000" and os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_debug_and_profile_reach_every_node_runner_also_on_a_worker(tmp_path):
    settings = RunSettings(debug=True, profile=True)
    ctx = RunContext(load_graph(GRAPHS / "oracle_heatmap.yaml"), tmp_path, None, set(), settings=settings)
    shipped = pickle.loads(pickle.dumps(ctx.work))  # what a Ray worker receives
    for work in (ctx.work, shipped):
        assert all(r.debug and r.profile for r in work.runners.values())
    plain = RunContext(load_graph(GRAPHS / "oracle_heatmap.yaml"), tmp_path, None, set())
    assert not any(r.debug or r.profile for r in plain.work.runners.values())
