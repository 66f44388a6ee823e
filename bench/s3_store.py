"""The same run with its cache and run folder on local disk and on a real S3 API (issue 27): wall
time, bytes stored and the requests the store answered, for a run on an empty cache and for a
rerun into a new run folder whose every node comes from the cache.

The S3 API is moto's server on 127.0.0.1 (``tests/s3_server.py``, as the tests use it), reached
through pyarrow's own ``S3FileSystem`` with ``AWS_ENDPOINT_URL`` pointing at a proxy in front of
it that counts each request by method. Local rounds and S3 rounds alternate; medians are quoted.
moto keeps objects in memory and answers on the loopback, so the S3 times here are the
runtime's own overhead on an object store (requests, no atomic rename, listings), not a real
network's latency: multiply the request counts by a bucket's round trip for that.

    .venv/bin/python bench/s3_store.py --repeats 3        # writes bench/results/s3_store.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3_server import FaultyProxy, S3Server  # noqa: E402

GRAPH = ROOT / "graphs" / "pnp_vqa.yaml"


class RequestCount:
    """The proxy's hook: counts every request by method and lets it through."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str) -> bool:
        with self._lock:
            self.counts[method] += 1
        return False

    def take(self) -> dict[str, int]:
        with self._lock:
            out, self.counts = dict(self.counts), Counter()
        return out


def run(output: str, cache: str, env: dict[str, str], threads: int) -> float:
    """One ``runtime run`` of the graph (local executor, shapes presets); its wall seconds."""
    cmd = [sys.executable, "-m", "runtime", "run", str(GRAPH), "--executor", "local", "--device", "cpu", "--quiet",
           "--threads", str(threads), "--output", output, "--cache", cache]
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def local_bytes(*folders: Path) -> int:
    return sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())


def bucket_bytes(server: S3Server, bucket: str) -> int:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


def measure(repeats: int, threads: int) -> dict:
    server = S3Server()
    counter = RequestCount()
    proxy = FaultyProxy(server.endpoint, counter)
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    s3_env = {**base, **server.env(proxy.endpoint)}
    rounds: dict[str, list[dict]] = {"local": [], "s3": []}
    try:
        with tempfile.TemporaryDirectory(prefix="pnpvqa-s3-bench-") as tmp:
            for r in range(repeats):
                for where in ("local", "s3"):  # alternated, so load drifts hit both
                    if where == "local":
                        cache, out = Path(tmp) / f"cache{r}", Path(tmp) / f"out{r}"
                        cold = run(str(out), str(cache), base, threads)
                        warm = run(str(out) + "-again", str(cache), base, threads)
                        rounds[where].append({"cold_s": cold, "warm_s": warm, "bytes": local_bytes(cache, out)})
                        continue
                    bucket = server.new_bucket()
                    cache, out = f"s3://{bucket}/cache", f"s3://{bucket}/runs/pnp"
                    counter.take()
                    cold = run(out, cache, s3_env, threads)
                    cold_requests = counter.take()
                    stored = bucket_bytes(server, bucket)
                    warm = run(out + "-again", cache, s3_env, threads)
                    rounds[where].append({"cold_s": cold, "warm_s": warm, "bytes": stored,
                                          "cold_requests": cold_requests, "warm_requests": counter.take()})
    finally:
        proxy.stop()
        server.stop()
    return rounds


def median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def requests(counts: dict[str, int]) -> str:
    return ", ".join(f"{m} {n}" for m, n in sorted(counts.items())) + f" ({sum(counts.values())} in all)"


def table(result: dict) -> str:
    local, s3 = result["rounds"]["local"], result["rounds"]["s3"]
    last = s3[-1]
    lines = [
        "# The store on local disk and on S3 (moto on localhost)", "",
        f"`graphs/pnp_vqa.yaml` on its bundled sample (64 questions, 16 images; `shapes` presets), local "
        f"executor, `--threads {result['threads']}`; cold: empty cache; warm: the same cache, a new run "
        f"folder (every node from the cache). Medians of {result['repeats']} alternated rounds; "
        f"{result['machine']}, {result['date']}.", "",
        "| store | cold run | warm run | bytes stored (cache + run folder) |",
        "|---|---|---|---|",
        f"| local disk | {median(local, 'cold_s'):.1f} s | {median(local, 'warm_s'):.1f} s | "
        f"{median(local, 'bytes') / 2**20:.2f} MiB |",
        f"| S3 API (moto, loopback) | {median(s3, 'cold_s'):.1f} s | {median(s3, 'warm_s'):.1f} s | "
        f"{median(s3, 'bytes') / 2**20:.2f} MiB |",
        f"| ratio S3 / local | {median(s3, 'cold_s') / median(local, 'cold_s'):.2f}x | "
        f"{median(s3, 'warm_s') / median(local, 'warm_s'):.2f}x | |", "",
        f"Requests the S3 store answered (last round): cold run {requests(last['cold_requests'])}; "
        f"warm run {requests(last['warm_requests'])}.", "",
        "moto answers from memory on the loopback: the S3 times are the runtime's own overhead on an "
        "object store, not a bucket's latency; with a real bucket, add the request count times its "
        "round trip (e.g. 20-50 ms for S3 in the same region).", "",
        "_`.venv/bin/python bench/s3_store.py " + " ".join(result["argv"]) + "`_",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="alternated local / S3 rounds (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder of s3_store.{md,json}")
    a = p.parse_args()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "repeats": a.repeats, "threads": a.threads,
              "argv": sys.argv[1:], "rounds": measure(a.repeats, a.threads)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "s3_store.json").write_text(json.dumps(result, indent=2))
    (a.out / "s3_store.md").write_text(table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
