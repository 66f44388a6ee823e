"""Benchmark: a sweep of variants in one pass against the same variants run one after another.

Both start from an empty cache, as whole commands (start-up included), alternated A/B with
medians reported: (A) ``runtime run`` of each graph in turn, sharing one cache; (B) one
``runtime run G1 G2 ...`` (one pass: nodes with the same key computed once, uncached
image-level work shared in memory, models loaded once).

    .venv/bin/python bench/sweep.py --repeats 3 --images 16
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["pnp_vqa", "esam_enhanced", "fusion_caption", "qavit"]


def command(graphs: list[str], tmp: Path, tag: str, images: int) -> list[str]:
    return [sys.executable, "-m", "runtime", "run", *[str(ROOT / "graphs" / f"{g}.yaml") for g in graphs], "--quiet",
            "--executor", "local", "--device", "cpu", "--cache", str(tmp / f"cache-{tag}"),
            "--set", f"dataset.num_images={images}", "--output",
            str(tmp / f"out-{tag}" / (graphs[0] if len(graphs) == 1 else ""))]


def timed(cmds: list[list[str]]) -> float:
    start = time.perf_counter()
    for cmd in cmds:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=16, help="shapes images (4 questions each)")
    a = ap.parse_args()
    alone, sweep = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(a.repeats):
            alone.append(timed([command([g], tmp, f"a{r}", a.images) for g in VARIANTS]))
            sweep.append(timed([command(VARIANTS, tmp, f"s{r}", a.images)]))
    one, many = statistics.median(alone), statistics.median(sweep)
    print(f"{len(VARIANTS)} variants ({', '.join(VARIANTS)}), {a.images * 4} questions, local executor, "
          f"medians of {a.repeats} alternated runs")
    print(f"| one after another | one sweep | ratio |\n|---|---|---|\n| {one:.1f} s | {many:.1f} s | {many / one:.2f}x |")


if __name__ == "__main__":
    main()
