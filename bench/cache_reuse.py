"""Benchmark: what the cache saves. Runs the model-free example graph three times in one
process and prints wall times and ratios:

1. first run (everything computed),
2. the same command again (served from finished parts and the cache),
3. a variant that changes one downstream param (only that node and its descendants run).

    .venv/bin/python bench/cache_reuse.py --images 200 --executor local
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from runtime.api import run_graph

GRAPH = Path(__file__).resolve().parents[1] / "graphs" / "oracle_heatmap.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    ap.add_argument("--shard-size", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = dict(executor=a.executor, cache_dir=tmp / "cache", progress=False, device="cpu")
        sets = [f"dataset.num_images={a.images}", f"shard_size={a.shard_size}"]
        times = {}
        for label, extra, out in (("first run", [], "a"), ("same command again", [], "a"),
                                  ("variant: enhance.alpha=0.3", ["enhance.alpha=0.3"], "b")):
            start = time.perf_counter()
            summary = run_graph(GRAPH, overrides=sets + extra, output=tmp / out, **common)
            times[label] = time.perf_counter() - start
            ran = sorted(n for n, s in summary.nodes.items() if s.computed_shards)
            print(f"{label:<28} {times[label]:7.2f} s  {summary.samples} samples, nodes run: {', '.join(ran) or 'none'}")
        first = times["first run"]
        for label, t in times.items():
            print(f"  {label:<26} {t / first:6.3f} x first run")


if __name__ == "__main__":
    main()
