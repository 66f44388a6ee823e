"""A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and two
worker nodes, as Ray's own tests do), joined with ``--address``: the local executor's results,
little through the driver, and a worker node removed mid-run survived."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from artifacts.columns import TensorSpec, tensor_type
from runtime.api import run_graph
from stages.base import Granularity, Input, Output, Stage
from test_ray_executor import run_in_thread, slow_graph, wait_for_workers  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

NODE = dict(num_cpus=1, object_store_memory=128 * 2**20)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args=NODE)
    nodes = [c.add_node(**NODE) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture
def image_manifest(tmp_path, write_graph):
    """Records that are only paths (as for VQAv2): what the workers produce dwarfs them."""
    import cv2

    rng = np.random.default_rng(0)
    lines = []
    for i in range(24):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        lines += [json.dumps({"sample_id": f"{i}-{q}", "image_id": str(i), "image": str(path),
                              "question": f"what is in picture {q}?"}) for q in range(2)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines))
    return write_graph(f"""
        dataset: {{source: manifest, params: {{path: {manifest}}}}}
        shard_size: 4
        nodes:
          image: {{stage: load_image, inputs: {{image_path: source.image_path}}}}
          pixels: {{stage: preprocess_image, params: {{family: blip}}, inputs: {{image: image.image}}}}
          points: {{stage: heatmap_points, params: {{num_points: 2}}, inputs: {{heatmap: heat.heatmap, image_size: image.size}}}}
          heat: {{stage: mask_heatmap, params: {{grid: 8}}, inputs: {{mask: gray.mask}}}}
          gray: {{stage: test_gray_mask, inputs: {{image: image.image}}}}
        outputs: [image.size, points.points]
        """)


class GrayMask(Stage):
    """Where an image is bright: a per-image mask for the heatmap stages."""

    name = "test_gray_mask"
    granularity = Granularity.IMAGE
    INPUTS = {"image": Input(TensorSpec("uint8", None, ndim=3), "pixels")}
    OUTPUTS = {"mask": Output(tensor_type("uint8", [64, 64]), "bright pixels of the top-left 64 x 64")}

    def process(self, batch):
        return {"mask": np.stack([(im[:64, :64].mean(axis=2) > 127).astype(np.uint8) for im in batch["image"]])}


def test_cluster_gives_local_results_and_the_driver_carries_little(tmp_path, cluster, image_manifest, monkeypatch):
    import ray.cloudpickle

    import stages

    monkeypatch.setitem(stages.STAGES, GrayMask.name, GrayMask)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    c, _ = cluster
    kw = dict(cache_dir=tmp_path / "cache", progress=False, device="cpu")
    run_graph(image_manifest, executor="local", output=tmp_path / "local", **{**kw, "cache_dir": tmp_path / "lc"})
    summary = run_graph(image_manifest, executor="ray", address=c.address, output=tmp_path / "ray", **kw)
    assert pq.read_table(tmp_path / "ray" / "results.parquet").equals(pq.read_table(tmp_path / "local" / "results.parquet"))
    assert len({w["node_id"] for w in summary.workers}) == 3  # one worker on each node
    # decoded images and 384x384 pixels stay in the workers; only paths and outcomes cross the driver
    assert summary.produced_bytes > 40 * 2**20
    assert summary.driver_bytes < 0.01 * summary.produced_bytes


def test_cluster_survives_a_lost_node(tmp_path, cluster, slow_graph, caplog):  # noqa: F811
    c, nodes = cluster
    run_graph(slow_graph, executor="local", output=tmp_path / "local", cache_dir=tmp_path / "lc",
              progress=False, device="cpu")
    out = tmp_path / "ray"
    thread, result = run_in_thread(graph=slow_graph, executor="ray", address=c.address, output=out,
                                   cache_dir=tmp_path / "cache", progress=False, device="cpu")
    wait_for_workers(out, thread)
    c.remove_node(nodes[0], allow_graceful=False)  # the node and its worker are gone
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["summary"].errors == 0 and "worker was lost" in caplog.text
    assert pq.read_table(out / "results.parquet").equals(pq.read_table(tmp_path / "local" / "results.parquet"))
