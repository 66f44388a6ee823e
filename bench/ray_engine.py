"""Benchmark: the Ray engine. Four measurements, printed as markdown tables (and written to
bench/results/ray_engine.md and .json with --write):

1. driver bytes: what the driver ships to and receives from workers, against the bytes the
   stages produce, for a run on image files (records are paths) and for the bundled
   esam_enhanced graph (records embed PNG bytes and masks);
2. start-up: a 16-question esam_enhanced run, wall time against the time inside the stages,
   local executor and Ray;
3. scaling: the same pnp_vqa run with 1 and with 2 Ray workers (alternated, medians);
4. Ray Data: the same shards run through ``ray.data`` ``map_batches`` with an actor pool
   against this project's actor pool (only when ``ray[data]`` is installed).

    .venv/bin/python bench/ray_engine.py --write
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.api import run_graph  # noqa: E402
from runtime.graph import load_graph  # noqa: E402

GRAPHS = ROOT / "graphs"


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def image_graph(tmp: Path, images: int) -> Path:
    """A manifest of image files (two questions each), decoded and preprocessed at 384 px."""
    import cv2

    rng = np.random.default_rng(0)
    (tmp / "img").mkdir()
    lines = []
    for i in range(images):
        path = tmp / "img" / f"{i}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        lines += [json.dumps({"sample_id": f"{i}-{q}", "image_id": str(i), "image": str(path),
                              "question": "what is it?"}) for q in range(2)]
    (tmp / "m.jsonl").write_text("\n".join(lines))
    graph = tmp / "images.yaml"
    graph.write_text(f"""
dataset: {{source: manifest, params: {{path: {tmp / 'm.jsonl'}}}}}
shard_size: 32
nodes:
  image: {{stage: load_image, inputs: {{image_path: source.image_path}}}}
  pixels: {{stage: preprocess_image, params: {{family: blip}}, inputs: {{image: image.image}}}}
  sam_pixels: {{stage: preprocess_image, params: {{family: sam}}, inputs: {{image: image.image}}}}
outputs: [image.size]
""")
    return graph


def driver_bytes(tmp: Path, images: int) -> list[dict]:
    rows = []
    for label, graph, overrides in (
            (f"image files ({images} images, 384 and 1024 px pixels)", image_graph(tmp, images), []),
            ("esam_enhanced (shapes: PNG bytes and masks in the records)", GRAPHS / "esam_enhanced.yaml",
             ["shard_size=16"])):
        s = run_graph(graph, overrides=overrides, executor="ray", output=tmp / f"d{len(rows)}", no_cache=True,
                      progress=False, device="cpu")
        rows.append({"run": label, "samples": s.samples, "produced_bytes": s.produced_bytes,
                     "driver_bytes": s.driver_bytes, "share": s.driver_bytes / max(1, s.produced_bytes)})
    return rows


def startup(tmp: Path, repeats: int) -> list[dict]:
    rows = []
    for executor in ("local", "ray"):
        walls, work = [], []
        for r in range(repeats):
            start = time.perf_counter()
            s = run_graph(GRAPHS / "esam_enhanced.yaml", executor=executor, limit=16, output=tmp / f"s{executor}{r}",
                          no_cache=True, progress=False, device="cpu")
            walls.append(time.perf_counter() - start)
            work.append(sum(n.seconds for n in s.nodes.values()))
        wall, inside = statistics.median(walls), statistics.median(work)
        rows.append({"executor": executor, "wall_s": wall, "in_stages_s": inside, "overhead_s": wall - inside})
    return rows


def scaling(tmp: Path, repeats: int) -> dict:
    walls: dict[int, list[float]] = {1: [], 2: []}
    after: dict[int, list[float]] = {1: [], 2: []}  # once the workers are up
    for r in range(repeats):
        for workers in (1, 2):  # alternated, so load on the machine hits both alike
            start = time.perf_counter()
            s = run_graph(GRAPHS / "pnp_vqa.yaml", overrides=["shard_size=16", "dataset.num_images=64"],
                          executor="ray", workers=workers, output=tmp / f"w{workers}-{r}", no_cache=True,
                          progress=False, device="cpu")
            walls[workers].append(time.perf_counter() - start)
            after[workers].append(walls[workers][-1] - s.startup_seconds)
    med = {k: statistics.median(v) for k, v in walls.items()}
    work = {k: statistics.median(v) for k, v in after.items()}
    return {"one_worker_s": med[1], "two_workers_s": med[2], "speedup": med[1] / med[2],
            "one_worker_after_startup_s": work[1], "two_workers_after_startup_s": work[2],
            "speedup_after_startup": work[1] / work[2], "runs": walls}


def ray_data_comparison(tmp: Path, repeats: int) -> dict | None:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        return None
    from runtime.ray_executor import init_ray, stop_ray
    from runtime.run import RunContext
    from runtime.shards import iter_shards

    graph = load_graph(GRAPHS / "pnp_vqa.yaml", ["shard_size=8"])
    out = {"actor_pool_s": [], "ray_data_s": []}

    class ShardUDF:
        def __init__(self, work):
            self.work = work

        def __call__(self, batch):
            outcomes = [self.work.run(pickle.loads(b)) for b in batch["shard"]]
            return {"part": [o.part for o in outcomes]}

    for r in range(repeats):
        start = time.perf_counter()
        run_graph(graph, executor="ray", workers=2, output=tmp / f"pool{r}", no_cache=True, progress=False,
                  device="cpu")
        out["actor_pool_s"].append(time.perf_counter() - start)

        start = time.perf_counter()
        init_ray(None)
        ctx = RunContext(graph, tmp / f"data{r}", None, set(), device="cpu")
        items = [{"shard": pickle.dumps(s)} for s in iter_shards(graph.source, graph.shard_size)]
        parts = ray.data.from_items(items).map_batches(
            ShardUDF, fn_constructor_args=(ctx.work,), batch_size=1, concurrency=2, num_cpus=0.9).take_all()
        stop_ray()
        assert len(parts) == len(items)
        out["ray_data_s"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in out.items()} | {"runs": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="images of the driver-bytes run (default 400)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["driver", "startup", "scaling", "raydata"], action="append")
    ap.add_argument("--write", action="store_true", help="write bench/results/ray_engine.md and .json")
    a = ap.parse_args()
    import os

    report: dict = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    md = [f"# Ray engine ({os.cpu_count()} CPUs, no GPU; `bench/ray_engine.py`, {report['date']})", ""]
    only = set(a.only or ["driver", "startup", "scaling", "raydata"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "driver" in only:
            rows = report["driver_bytes"] = driver_bytes(tmp, a.images)
            md += ["## Bytes through the driver", "", "| run | samples | produced by the stages | through the driver | share |",
                   "|---|---|---|---|---|"]
            md += [f"| {r['run']} | {r['samples']} | {_mb(r['produced_bytes'])} | {_mb(r['driver_bytes'])} | "
                   f"{r['share']:.2%} |" for r in rows]
            md.append("")
        if "startup" in only:
            rows = report["startup"] = startup(tmp, a.repeats)
            md += ["## Start-up: esam_enhanced, 16 questions (medians)", "",
                   "| executor | wall | inside the stages | the rest (start-up, models loading, I/O) |", "|---|---|---|---|"]
            md += [f"| {r['executor']} | {r['wall_s']:.1f} s | {r['in_stages_s']:.1f} s | {r['overhead_s']:.1f} s |"
                   for r in rows]
            md.append("")
        if "scaling" in only:
            s = report["scaling"] = scaling(tmp, a.repeats)
            md += ["## Scaling: pnp_vqa, 256 questions in 16-question shards (alternated runs, medians)", "",
                   "| | 1 worker | 2 workers | speed-up |", "|---|---|---|---|",
                   f"| whole command | {s['one_worker_s']:.1f} s | {s['two_workers_s']:.1f} s | {s['speedup']:.2f}x |",
                   f"| once the workers are up | {s['one_worker_after_startup_s']:.1f} s | "
                   f"{s['two_workers_after_startup_s']:.1f} s | {s['speedup_after_startup']:.2f}x |", ""]
        if "raydata" in only:
            r = report["ray_data"] = ray_data_comparison(tmp, a.repeats)
            if r is None:
                md += ["## Ray Data", "", "not measured: `pip install 'ray[data]'` to include it", ""]
            else:
                md += ["## The same shards through Ray Data (pnp_vqa, 2 workers, medians)", "",
                       "| this project's actor pool | Ray Data map_batches, actor pool |", "|---|---|",
                       f"| {r['actor_pool_s']:.1f} s | {r['ray_data_s']:.1f} s |", ""]
    text = "\n".join(md)
    print(text)
    if a.write:
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "ray_engine.md").write_text(text + "\n")
        (out / "ray_engine.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
