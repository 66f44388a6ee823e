"""Peak memory and time to first work against the number of questions (issue 27), on a
generated VQAv2-shaped dataset: ``questions`` questions, one image per ``per_image`` of them,
every image file a hard link to one of a few tiny JPEGs (COCO names), annotations with ten
answers each. The graph (``bench/graphs/decode_only.yaml``) only decodes the images: what
grows is the runtime's, not a model's.

    python bench/memory_scale.py make FOLDER --questions 200000      # the dataset only
    python bench/memory_scale.py run --questions 20000 200000       # peak RSS of full runs + --limit 64 runs

``bin/bench --only memory_scale`` runs the second and writes the table into bench/results.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "bench" / "graphs" / "decode_only.yaml"
DISTINCT_JPEGS = 8
SHAPES = ("circle", "square", "triangle", "star")


def make_dataset(folder: Path, questions: int, per_image: int = 5) -> Path:
    """Write the dataset under ``folder``; returns its dataset file (``--dataset``)."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    jpegs = []
    for k in range(DISTINCT_JPEGS):
        path = folder / f"tiny-{k}.jpg"
        buf = io.BytesIO()
        Image.new("RGB", (16 + k, 12 + k), (30 * k % 256, 90, 200)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue())
        jpegs.append(path)
    qs, anns = [], []
    for i in range(questions):
        image_id = 1 + i // per_image
        qid = image_id * 1000 + i % per_image
        qs.append({"image_id": image_id, "question": f"What shape is number {i % 97} next to the "
                   f"{SHAPES[i % 4]}?", "question_id": qid})
        answer = SHAPES[(i + 1) % 4]
        anns.append({"question_type": "what shape is", "multiple_choice_answer": answer, "answer_type": "other",
                     "image_id": image_id, "question_id": qid,
                     "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j in range(10)]})
        if i % per_image == 0:
            target = images / f"COCO_val2014_{image_id:012d}.jpg"
            if not target.exists():
                os.link(jpegs[image_id % DISTINCT_JPEGS], target)
    info = {"description": "generated (bench/memory_scale.py)", "data_subtype": "val2014"}
    (folder / "questions.json").write_text(json.dumps({**info, "questions": qs}))
    (folder / "annotations.json").write_text(json.dumps({**info, "annotations": anns}))
    dataset = folder / "dataset.yaml"
    dataset.write_text("source: vqav2\nparams:\n  questions: questions.json\n  annotations: annotations.json\n"
                       "  images: images\n")
    return dataset


def measure(dataset: Path, work: Path, tag: str, *extra: str) -> dict:
    """One ``runtime run`` of the graph (local executor) in a child process: wall seconds, its peak
    RSS, and when its first results part was written (the first shard's work done)."""
    cmd = [sys.executable, "-m", "runtime", "run", str(GRAPH), "--dataset", str(dataset), "--executor", "local",
           "--device", "cpu", "--quiet", "--cache", str(work / f"cache-{tag}"), "--output", str(work / f"out-{tag}"),
           *extra]
    # the question index beside the dataset: none from before, the first run builds it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PNPVQA_QUESTION_INDEX": str(work / "index")}
    done = subprocess.run([sys.executable, __file__, "child", str(work / f"out-{tag}" / "parts"), *cmd], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    manifest = json.loads((work / f"out-{tag}" / "manifest.json").read_text())
    return {**result, "samples": manifest["totals"]["samples"], "shards": manifest["totals"]["shards"]}


def child(parts: Path, cmd: list[str]) -> None:
    """Run ``cmd``, watching ``parts`` for the first new part; print its figures as JSON. A
    process of its own, so that ``RUSAGE_CHILDREN`` is this command's peak RSS alone."""
    before = set(parts.glob("part-*")) if parts.is_dir() else set()
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and parts.is_dir() and set(parts.glob("part-*")) - before:
            first = time.perf_counter() - began
        time.sleep(0.02)
    wall = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"exit {proc.returncode}: {proc.stderr.read()[-3000:]}")
    print(json.dumps({"seconds": wall, "first_part_s": first,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def scale(sizes: list[int], shard_size: int, limit_only: set[int] = frozenset()) -> dict:
    """At each of ``sizes``: a ``--limit 64`` run on a dataset never seen (its question index is
    built), another on a fresh output and cache (the index is there), then a full run and a
    rerun with every part finished (only the ``--limit`` runs for those in ``limit_only``)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="pnpvqa-memory-") as tmp:
        for n in sizes:
            work = Path(tmp) / str(n)
            began = time.perf_counter()
            dataset = make_dataset(work, n)
            row = {"make_s": time.perf_counter() - began}
            common = ("--set", f"shard_size={shard_size}")
            row["limit_64_new"] = measure(dataset, work, "limit-new", "--limit", "64", *common)
            row["limit_64"] = measure(dataset, work, "limit", "--limit", "64", *common)
            if n not in limit_only:
                row["full"] = measure(dataset, work, "full", *common)
                row["rerun"] = measure(dataset, work, "full", *common)
            out[str(n)] = row
            print(f"[memory_scale] {n}: {json.dumps(row)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write a generated dataset")
    mk.add_argument("folder", type=Path)
    mk.add_argument("--questions", type=int, required=True)
    rn = sub.add_parser("run", help="measure full and --limit 64 runs")
    rn.add_argument("--questions", type=int, nargs="+", default=[20000, 200000])
    rn.add_argument("--limit-only", type=int, nargs="*", default=[], help="sizes measured with --limit 64 only")
    rn.add_argument("--shard-size", type=int, default=256)
    ch = sub.add_parser("child", help=argparse.SUPPRESS)
    ch.add_argument("parts", type=Path)
    ch.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.command == "child":
        child(a.parts, a.cmd)
    elif a.command == "make":
        print(make_dataset(a.folder, a.questions))
    else:
        print(json.dumps(scale(a.questions, a.shard_size, set(a.limit_only)), indent=2))


if __name__ == "__main__":
    main()
