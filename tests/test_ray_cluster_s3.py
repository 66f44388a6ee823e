"""The cluster case end to end: a head and two worker nodes (``ray.cluster_utils.Cluster``),
and the store, the run folder and the dataset (a manifest with its images beside it) all in a
bucket on a local S3 API (tests/s3_server.py). A worker node is removed mid-run; the run
finishes with the local executor's results, and little passes through the driver.

The nodes are started with the credentials but without ``AWS_ENDPOINT_URL``, as nodes
configured on their own would be: the workers read the images from the store the driver
names because the run passes its endpoint on (runtime/settings.py), never its credentials.
A node whose Python finds another numpy is refused before any work (runtime/worker_code.py)."""

from __future__ import annotations

import json
import os
import sys
import time

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

import stages
from artifacts.columns import TensorSpec, tensor_type
from conftest import GRAPHS
from runtime.api import run_graph
from runtime.errors import UsageError
from runtime.run import read_results
from s3_server import bucket, patched_env, s3  # noqa: F401  (fixtures)
from stages.base import Granularity, Input, Output, Stage
from test_ray_executor import run_in_thread

pytestmark = pytest.mark.slow

NODE = dict(num_cpus=1, object_store_memory=128 * 2**20)
IMAGES, QUESTIONS = 100, 3  # 300 questions


@pytest.fixture(scope="module")
def cluster(s3):  # noqa: F811
    """A head and two worker nodes whose processes know the credentials but not the endpoint."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    endpoint = os.environ.pop("AWS_ENDPOINT_URL")  # the node processes inherit this environment
    try:
        c = Cluster(initialize_head=True, head_node_args=NODE)
        nodes = [c.add_node(**NODE) for _ in range(2)]
        c.wait_for_nodes()
    finally:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield c, nodes
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


class SlowGrayMask(Stage):
    """Where an image is bright; slow enough (0.3 s a batch) that a node can be removed mid-run."""

    name = "test_slow_gray_mask"
    granularity = Granularity.IMAGE
    INPUTS = {"image": Input(TensorSpec("uint8", None, ndim=3), "pixels")}
    OUTPUTS = {"mask": Output(tensor_type("uint8", [64, 64]), "bright pixels of the top-left 64 x 64")}

    def process(self, batch):
        time.sleep(0.3)
        return {"mask": np.stack([(im[:64, :64].mean(axis=2) > 127).astype(np.uint8) for im in batch["image"]])}


@pytest.fixture
def bucket_graph(s3, bucket, write_graph, monkeypatch):  # noqa: F811
    """A manifest in the bucket whose images are objects beside it (relative paths)."""
    import ray.cloudpickle

    client = s3.client()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(IMAGES):
        png = cv2.imencode(".png", rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))[1].tobytes()
        client.put_object(Bucket=bucket, Key=f"data/images/{i}.png", Body=png)
        lines += [json.dumps({"sample_id": f"{i}-{q}", "image_id": str(i), "image": f"images/{i}.png",
                              "question": f"what is in picture {q}?"}) for q in range(QUESTIONS)]
    client.put_object(Bucket=bucket, Key="data/questions.jsonl", Body="\n".join(lines).encode())
    monkeypatch.setitem(stages.STAGES, SlowGrayMask.name, SlowGrayMask)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    yield write_graph(f"""
        dataset: {{source: manifest, params: {{path: "s3://{bucket}/data/questions.jsonl"}}}}
        shard_size: 12
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path, image_bytes: source.image_bytes}}}}
          pixels: {{stage: preprocess_image, params: {{family: blip}}, inputs: {{image: image.image}}}}
          gray: {{stage: {SlowGrayMask.name}, inputs: {{image: image.image}}}}
          heat: {{stage: mask_heatmap, params: {{grid: 8}}, inputs: {{mask: gray.mask}}}}
          points: {{stage: heatmap_points, params: {{num_points: 2}}, inputs: {{heatmap: heat.heatmap, image_size: image.size}}}}
        outputs: [image.size, points.points]
        """)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def parts(s3, bucket, run):  # noqa: F811
    return [k for k in s3.keys(bucket, f"{run}/parts/") if k.endswith(".parquet")]


def test_cluster_and_bucket_survive_a_lost_node_with_local_results(s3, bucket, cluster, bucket_graph, tmp_path,  # noqa: F811
                                                                    caplog):
    c, nodes = cluster
    local = run_graph(bucket_graph, executor="local", output=tmp_path / "local", cache_dir=tmp_path / "cache",
                      progress=False, device="cpu", threads=1)
    assert local.samples == IMAGES * QUESTIONS and local.errors == 0

    out, cache = f"s3://{bucket}/runs/ray", f"s3://{bucket}/cache"
    thread, result = run_in_thread(graph=bucket_graph, executor="ray", address=c.address, output=out,
                                   cache_dir=cache, progress=False, device="cpu", threads=1)
    deadline = time.time() + 180
    while not parts(s3, bucket, "runs/ray"):
        assert thread.is_alive(), result.get("error")
        assert time.time() < deadline, "the Ray run wrote no part in 180 s"
        time.sleep(0.2)
    c.remove_node(nodes[0], allow_graceful=False)  # the node and its worker are gone
    thread.join(timeout=600)
    assert not thread.is_alive(), "the Ray run did not finish within 600 s of the node's removal"
    assert "error" not in result, result.get("error")
    summary = result["summary"]

    assert summary.samples == IMAGES * QUESTIONS and summary.errors == 0
    assert "worker was lost" in caplog.text
    assert len({w["node_id"] for w in summary.workers}) == 3  # a worker on each node
    # one thread per worker and in the local run: equal, bit for bit (docs/store.md, the executor promise)
    assert read_results(out).equals(pq.read_table(tmp_path / "local" / "results.parquet"))
    assert len(parts(s3, bucket, "runs/ray")) == summary.shards and s3.keys(bucket, "cache/heatmap_points/")
    # decoded images and 384 x 384 pixels stay in the workers: paths and outcomes cross the driver
    assert summary.produced_bytes > 100 * 2**20
    assert summary.driver_bytes < 0.01 * summary.produced_bytes


def test_a_node_with_other_libraries_is_refused_before_any_work(cluster, tmp_path):
    """A node whose Python finds numpy 9.9 (a dist-info first on its path), as a node set up
    apart would: its worker's code identity is not the driver's, and the run stops naming it."""
    c, _ = cluster
    fake = tmp_path / "site" / "numpy-9.9.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 9.9\n")
    with patched_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}):
        odd = c.add_node(**NODE)  # its processes inherit this environment
    c.wait_for_nodes()
    try:
        with pytest.raises(UsageError) as info:
            run_graph(GRAPHS / "oracle_heatmap.yaml", overrides=["dataset.num_images=4"], executor="ray",
                      address=c.address, output=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                      device="cpu")
    finally:
        c.remove_node(odd)
    message = str(info.value)
    assert f"(node {odd.node_id[:12]}) runs other code than this driver" in message
    assert "numpy 9.9 there" in message and "install the same checkout and libraries on every node" in message
    assert not list((tmp_path / "cache").rglob("*.parquet"))  # nothing computed
