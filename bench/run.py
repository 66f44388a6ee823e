"""The benchmark: one command, whole commands timed as a user runs them, A/B alternated,
medians quoted. Writes ``bench/results/bench.json`` and ``bench/results/bench.md``.

    bin/bench                    # everything, about 40 minutes on 2 cores
    bin/bench --only startup     # one part (repeatable): e2e, profile, startup, sweep, ray, memory, memory_scale,
                                 # resume, batch, published

Parts:

- ``e2e``: questions/s of ``graphs/pnp_vqa.yaml`` (local executor, empty cache) against
  ``bench/reference_loop.py`` (LAVIS ``predict_answers``' control flow and per-step work, same
  models and draws: GradCAM by a full backward through the ITM model, ViT included, and caption
  decoding that projects the image tokens' cross-attention keys/values at every step, ViTs with
  LAVIS's explicit attention) on the same questions, answers checked equal;
- ``profile``: the share of wall time spent inside model forward / backward passes and decoding
  loops (``runtime run --profile``), local and Ray (one worker);
- ``startup``: ``runtime validate``, and a rerun whose parts are all finished;
- ``sweep``: four variants in one ``runtime run A.yaml B.yaml ...`` against one after another;
- ``ray``: Ray (one worker) against local, and one Ray worker against two;
- ``memory``: peak RSS of a run at 1k and 10k questions (tiny presets: the runtime's memory,
  not the models');
- ``memory_scale``: peak RSS, full-run time and time to the first results part of a model-free
  graph over 20k / 200k / 1M generated VQAv2-shaped questions (``bench/memory_scale.py``; 1M:
  the ``--limit 64`` runs only);
- ``resume``: a run killed when half its shards are done, resumed, against half a fresh run;
- ``batch``: the model stages' time at several batch sizes (the defaults' evidence);
- ``published``: the runtime against the reference loop at the published sizes with random
  weights (BLIP large ITM and captioner, ViT-L/16 at 384; UnifiedQA T5 ``--published-t5``) and
  LAVIS's VQAv2 settings (100 captions, 20 patches, top-k 50, captions 10 to 20 tokens), one
  sampling round: seconds and peak RSS per step, answers checked equal (the reference's ITM
  step holds parameter gradients and ViT activations, attention maps included, as LAVIS's
  does). A random captioner
  rarely emits the end token, so each question decodes 100 captions of 20 tokens on both sides:
  the same decoding work (their texts are short: most ids fall outside the tokenizer).
  Not in the default set (an hour on 2 cores).

Every command runs with ``--threads`` set to the CPUs available (the runtime's default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
SWEEP = ["pnp_vqa", "esam_enhanced", "fusion_caption", "qavit"]


def runtime(*args: str) -> list[str]:
    return [PY, "-m", "runtime", *args]


def pnp_run(tmp: Path, tag: str, images: int, *extra: str) -> list[str]:
    """``runtime run graphs/pnp_vqa.yaml`` on ``images`` shapes images (4 questions each)."""
    return runtime("run", str(ROOT / "graphs" / "pnp_vqa.yaml"), "--quiet", "--device", "cpu",
                   "--set", f"dataset.num_images={images}", "--cache", str(tmp / f"cache-{tag}"),
                   "--output", str(tmp / f"out-{tag}"), *extra)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def manifest(tmp: Path, tag: str) -> dict:
    return json.loads((tmp / f"out-{tag}" / "manifest.json").read_text())


def answers(tmp: Path, tag: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(tmp / f"out-{tag}" / "results.parquet", columns=["sample_id", "answer.answer"])
    return dict(zip(table["sample_id"].to_pylist(), table["answer.answer"].to_pylist()))


def alternate(repeats: int, **commands) -> dict[str, list[float]]:
    """Wall times of each named command factory ``f(round) -> cmd``, A/B alternated."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for r in range(repeats):
        for name, make in commands.items():
            times[name].append(timed(make(r)))
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# --- parts -------------------------------------------------------------------------------------

def e2e(tmp: Path, a) -> dict:
    images = a.questions // 4
    out = tmp / "reference"
    out.mkdir()
    times = alternate(
        a.repeats,
        runtime=lambda r: pnp_run(tmp, f"e2e{r}", images),
        reference=lambda r: [PY, str(ROOT / "bench" / "reference_loop.py"), "--images", str(images),
                             "--out", str(out / f"{r}.json")])
    ours = answers(tmp, "e2e0")
    ref = json.loads((out / "0.json").read_text())
    equal = sum(ours.get(k) == v for k, v in ref.items())
    q = images * 4
    return {"questions": q, "runtime_s": times["runtime"], "reference_s": times["reference"],
            "runtime_qps": q / med(times["runtime"]), "reference_qps": q / med(times["reference"]),
            "speedup": med(times["reference"]) / med(times["runtime"]), "answers_equal": equal,
            "answers_compared": len(ref)}


def profile(tmp: Path, a) -> dict:
    out = {}
    for executor, images in (("local", a.questions // 4), ("ray", a.ray_questions // 4)):
        tag = f"profile-{executor}"
        extra = ["--executor", executor, "--profile"] + (["--workers", "1"] if executor == "ray" else [])
        wall = timed(pnp_run(tmp, tag, images, *extra))
        m = manifest(tmp, tag)
        model = sum(n["model_seconds"] for n in m["nodes"].values())
        run_s = m["totals"]["seconds"]
        out[executor] = {"questions": images * 4, "command_s": wall, "run_s": run_s, "model_s": model,
                         "model_share_of_command": model / wall, "model_share_of_run": model / run_s,
                         "nodes": {k: {"seconds": v["seconds"], "model_seconds": v["model_seconds"]}
                                   for k, v in m["nodes"].items()}}
    return out


def startup(tmp: Path, a) -> dict:
    graph = str(ROOT / "graphs" / "pnp_vqa.yaml")
    timed(pnp_run(tmp, "startup", 16))  # every part finished from here on
    times = alternate(max(3, a.repeats), validate=lambda r: runtime("validate", graph),
                      finished_run=lambda r: pnp_run(tmp, "startup", 16))
    return {"validate_s": times["validate"], "finished_run_s": times["finished_run"]}


def sweep(tmp: Path, a) -> dict:
    def cmd(graphs: list[str], tag: str) -> list[str]:
        return runtime("run", *[str(ROOT / "graphs" / f"{g}.yaml") for g in graphs], "--quiet", "--executor", "local",
                       "--device", "cpu", "--cache", str(tmp / f"cache-{tag}"),
                       "--set", f"dataset.num_images={a.sweep_images}",
                       "--output", str(tmp / f"out-{tag}" / (graphs[0] if len(graphs) == 1 else "")))

    alone, together = [], []
    for r in range(a.repeats):
        alone.append(sum(timed(cmd([g], f"alone{r}")) for g in SWEEP))
        together.append(timed(cmd(SWEEP, f"sweep{r}")))
    return {"variants": SWEEP, "questions": a.sweep_images * 4, "one_after_another_s": alone,
            "one_sweep_s": together, "ratio": med(together) / med(alone)}


def ray(tmp: Path, a) -> dict:
    images = a.ray_questions // 4
    times = alternate(
        a.repeats,
        local=lambda r: pnp_run(tmp, f"ray-local{r}", images, "--executor", "local"),
        ray_1=lambda r: pnp_run(tmp, f"ray-1w{r}", images, "--executor", "ray", "--workers", "1"),
        ray_2=lambda r: pnp_run(tmp, f"ray-2w{r}", images, "--executor", "ray", "--workers", "2"))
    startups = {k: manifest(tmp, f"ray-{k}0")["totals"]["startup_seconds"] for k in ("1w", "2w")}
    runs = {k: manifest(tmp, f"ray-{k}0")["totals"]["seconds"] for k in ("1w", "2w")}
    return {"questions": images * 4, **{f"{k}_s": v for k, v in times.items()},
            "ray_over_local": med(times["ray_1"]) / med(times["local"]),
            "two_workers_speedup": med(times["ray_1"]) / med(times["ray_2"]),
            "two_workers_speedup_after_startup": (runs["1w"] - startups["1w"]) / (runs["2w"] - startups["2w"]),
            "worker_startup_s": startups}


def memory(tmp: Path, a) -> dict:
    out = {}
    for questions in (1000, 10000):
        tag = f"memory{questions}"
        # --executor local: one process, so ru_maxrss is the whole run's peak
        wall = timed(pnp_run(tmp, tag, questions // 4, "--preset", "tiny", "--executor", "local",
                             "--set", "caption.num_captions=1", "--set", "caption.max_rounds=1"))
        nodes = manifest(tmp, tag)["nodes"]
        out[str(questions)] = {"seconds": wall, "peak_rss_mb": max(n["peak_rss_mb"] for n in nodes.values())}
    return out


def memory_scale(tmp: Path, a) -> dict:
    from memory_scale import scale  # beside this script

    return scale(a.scale_questions, a.scale_shard_size, limit_only=set(a.scale_limit_only))


def resume(tmp: Path, a) -> dict:
    images = a.questions // 4
    fresh = timed(pnp_run(tmp, "fresh", images))
    cmd = pnp_run(tmp, "killed", images)
    shards = manifest(tmp, "fresh")["totals"]["shards"]
    parts = tmp / "out-killed" / "parts"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and len(list(parts.glob("part-*.parquet"))) < shards / 2:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    import pyarrow.parquet as pq

    finished = list(parts.glob("part-*.parquet"))
    done_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in finished)  # shards differ in size
    left = 1 - done_rows / (images * 4)
    resumed = timed(cmd)
    return {"questions": images * 4, "shards": shards, "parts_done_at_kill": len(finished),
            "questions_left": images * 4 - done_rows, "fresh_s": fresh, "resumed_s": resumed,
            "half_fresh_s": fresh * left, "ratio": resumed / (fresh * left)}


def batch(tmp: Path, a) -> dict:
    """Each run sets one batch size on every model node and computes everything (no cache)."""
    nodes, sizes = ("gradcam", "caption", "answer"), (8, 16, 32, 64)
    times: dict[str, dict[int, list[float]]] = {n: {s: [] for s in sizes} for n in nodes}
    for r in range(a.repeats):
        for s in sizes:
            tag = f"batch-{s}-{r}"
            timed(pnp_run(tmp, tag, a.batch_images, "--executor", "local", "--no-cache",
                          *[f"--set={n}.batch_size={s}" for n in nodes]))
            for n in nodes:
                times[n][s].append(manifest(tmp, tag)["nodes"][n]["seconds"])
    return {n: {str(s): med(v) for s, v in by_size.items()} for n, by_size in times.items()}


# LAVIS's VQAv2 settings (pnp_vqa.yaml has them but for the shapes presets' shorter captions), and
# one sampling round: a random captioner draws ids mostly outside the tiny tokenizer that
# --random-weights gives it, so its captions decode to a word or nothing, the substring rule
# rejects most, and every further round would decode 100 more captions per question
PUBLISHED_SETTINGS = ("caption.num_captions=100", "caption.min_length=10", "caption.max_length=20",
                      "caption.num_patches=20", "caption.top_k=50", "answer.num_captions_fid=1", "caption.max_rounds=1")
# reference loop step -> runtime nodes
PUBLISHED_STEPS = {"load": ("image", "pixels"), "itm": ("gradcam",), "caption": ("caption",), "qa": ("answer",)}


def published(tmp: Path, a) -> dict:
    sets = [f"gradcam.preset={a.published_blip}", f"caption.preset={a.published_blip}",
            f"answer.preset={a.published_t5}", *PUBLISHED_SETTINGS]
    data = [f"dataset.num_images={a.published_images}", "dataset.questions_per_image=5"]
    threads = ["--threads", str(a.threads)]
    out = tmp / "published-reference"
    out.mkdir()

    def ours(r: int) -> list[str]:
        return runtime("run", str(ROOT / "graphs" / "pnp_vqa.yaml"), "--quiet", "--device", "cpu", "--executor",
                       "local", "--random-weights", "--profile", "--no-cache", "--output", str(tmp / f"out-pub{r}"),
                       *threads, *[f"--set={x}" for x in sets + data])

    def reference(r: int) -> list[str]:
        return [PY, str(ROOT / "bench" / "reference_loop.py"), "--random-weights", "--images",
                str(a.published_images), "--questions-per-image", "5", *threads, *[f"--set={x}" for x in sets],
                "--out", str(out / f"{r}.json"), "--stats", str(out / f"{r}.stats.json")]

    times = alternate(a.published_repeats, runtime=ours, reference=reference)
    steps: dict[str, dict] = {}
    for r in range(a.published_repeats):
        nodes = manifest(tmp, f"pub{r}")["nodes"]
        ref = json.loads((out / f"{r}.stats.json").read_text())
        for step, names in PUBLISHED_STEPS.items():
            row = steps.setdefault(step, {"runtime_s": [], "runtime_model_s": [], "reference_s": []})
            row["runtime_s"].append(sum(nodes[n]["seconds"] for n in names))
            row["runtime_model_s"].append(sum(nodes[n]["model_seconds"] for n in names))
            row["reference_s"].append(ref["seconds"][step])
        steps.setdefault("peak_rss_mb", {"runtime": [], "reference": []})
        steps["peak_rss_mb"]["runtime"].append(max(n["peak_rss_mb"] for n in nodes.values()))
        steps["peak_rss_mb"]["reference"].append(max(ref["peak_rss_mb"].values()))
    m = manifest(tmp, "pub0")
    ours_answers = {k: v for k, v in answers(tmp, "pub0").items()}
    ref_answers = json.loads((out / "0.json").read_text())
    return {"blip": a.published_blip, "t5": a.published_t5, "images": a.published_images,
            "questions": a.published_images * 5, "threads": a.threads, "settings": sets,
            "runtime_s": times["runtime"], "reference_s": times["reference"],
            "speedup": med(times["reference"]) / med(times["runtime"]), "steps": steps,
            "run_s": m["totals"]["seconds"], "model_s": sum(n["model_seconds"] for n in m["nodes"].values()),
            "answers_equal": sum(ours_answers.get(k) == v for k, v in ref_answers.items()),
            "answers_compared": len(ref_answers)}


PARTS = {"e2e": e2e, "profile": profile, "startup": startup, "sweep": sweep, "ray": ray, "memory": memory,
         "memory_scale": memory_scale, "resume": resume, "batch": batch, "published": published}
DEFAULT_PARTS = [part for part in PARTS if part != "published"]


# --- report ------------------------------------------------------------------------------------

def table(results: dict) -> str:
    lines = [f"# Benchmark ({results['machine']})", "",
             "Whole commands, medians of A/B-alternated runs unless said; under each part the command that "
             "measured it. Targets from issue 16.", ""]
    r = results["parts"]

    def source(part: str) -> list[str]:
        run = r[part].get("_run")
        return [f"_{run['date']}, `bin/bench {' '.join(run['argv'])}`, {run['repeats']} rounds._", ""] if run else []

    if "e2e" in r:
        e = r["e2e"]
        lines += ["## End to end: runtime against the reference loop", "",
                  "| questions | runtime | reference loop | speed-up (target >= 4x) | answers equal |", "|---|---|---|---|---|",
                  f"| {e['questions']} | {med(e['runtime_s']):.1f} s ({e['runtime_qps']:.1f} q/s) | "
                  f"{med(e['reference_s']):.1f} s ({e['reference_qps']:.1f} q/s) | {e['speedup']:.2f}x | "
                  f"{e['answers_equal']}/{e['answers_compared']} |", ""] + source("e2e")
    if "profile" in r:
        lines += ["## Time inside the models (`--profile`)", "",
                  "| executor | questions | command | run | model passes | share of command | share of run (target: "
                  "local 85%, Ray 75%) |", "|---|---|---|---|---|---|---|"]
        for ex, p in r["profile"].items():
            if ex == "_run":
                continue
            lines.append(f"| {ex} | {p['questions']} | {p['command_s']:.1f} s | {p['run_s']:.1f} s | {p['model_s']:.1f} s "
                         f"| {100 * p['model_share_of_command']:.0f}% | {100 * p['model_share_of_run']:.0f}% |")
        lines += [""] + source("profile")
    if "startup" in r:
        s = r["startup"]
        lines += ["## Start-up", "", "| command | time (target) |", "|---|---|",
                  f"| `runtime validate graphs/pnp_vqa.yaml` | {med(s['validate_s']):.2f} s (1.5 s) |",
                  f"| `runtime run` with every part finished | {med(s['finished_run_s']):.2f} s (2 s) |", ""] + source("startup")
    if "sweep" in r:
        s = r["sweep"]
        lines += ["## A sweep of variants in one pass", "",
                  f"{', '.join(s['variants'])}; {s['questions']} questions, empty cache.", "",
                  "| one after another | one sweep | ratio (target < 0.6x) |", "|---|---|---|",
                  f"| {med(s['one_after_another_s']):.1f} s | {med(s['one_sweep_s']):.1f} s | {s['ratio']:.2f}x |", ""] \
            + source("sweep")
    if "ray" in r:
        s = r["ray"]
        lines += ["## Ray on one machine", "", f"pnp_vqa, {s['questions']} questions, empty cache.", "",
                  "| local | Ray, 1 worker | Ray, 2 workers | Ray / local (target <= 1.2x) | 2 workers / 1 (target >= 1.6x) "
                  "| the same after worker start-up |", "|---|---|---|---|---|---|",
                  f"| {med(s['local_s']):.1f} s | {med(s['ray_1_s']):.1f} s | {med(s['ray_2_s']):.1f} s | "
                  f"{s['ray_over_local']:.2f}x | {s['two_workers_speedup']:.2f}x | "
                  f"{s['two_workers_speedup_after_startup']:.2f}x |", ""] + source("ray")
    if "memory" in r:
        m = r["memory"]
        lines += ["## Memory", "", "pnp_vqa with the tiny presets (the runtime's memory, not the models'), one run "
                  "each.", "", "| questions | peak RSS | time |", "|---|---|---|"]
        lines += [f"| {q} | {v['peak_rss_mb']:.0f} MiB | {v['seconds']:.1f} s |" for q, v in m.items()
                  if q != "_run"]
        lines += [""] + source("memory")
    if "memory_scale" in r:
        lines += memory_scale_table(r["memory_scale"]) + source("memory_scale")
    if "resume" in r:
        s = r["resume"]
        lines += ["## Resume after a kill", "",
                  f"pnp_vqa, {s['questions']} questions in {s['shards']} shards, killed (SIGKILL) with "
                  f"{s['parts_done_at_kill']} shards done ({s.get('questions_left', '?')} questions left), then run "
                  "again. A resumed run pays start-up, model loading and the dataset check again.", "",
                  "| fresh run | resumed run | the fresh run's share of the questions left | ratio |", "|---|---|---|---|",
                  f"| {s['fresh_s']:.1f} s | {s['resumed_s']:.1f} s | {s['half_fresh_s']:.1f} s | {s['ratio']:.2f}x |", ""] \
            + source("resume")
    if "batch" in r:
        b = r["batch"]
        b = {node: v for node, v in b.items() if node != "_run"}
        sizes = sorted({int(s) for v in b.values() for s in v})
        lines += ["## Batch sizes", "", "Seconds inside each node (median), pnp_vqa, "
                  f"{results['batch_questions']} questions, by the node's batch size.", "",
                  "| node | " + " | ".join(str(s) for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        lines += [f"| {node} | " + " | ".join(f"{v[str(s)]:.1f}" for s in sizes) + " |" for node, v in b.items()]
        lines += [""] + source("batch")
    if "published" in r:
        lines += published_table(r["published"]) + source("published")
    return "\n".join(lines)


def memory_scale_table(m: dict) -> list[str]:
    sizes = sorted((int(q) for q in m if q != "_run"))
    base = m[str(sizes[0])].get("full", {}).get("peak_rss_mb")

    def cell(row: dict, run: str, key: str) -> str:
        value = row.get(run, {}).get(key)
        return "-" if value is None else f"{value:.0f} MiB" if key == "peak_rss_mb" else f"{value:.1f} s"

    lines = ["## Memory and time to first work against the dataset's size", "",
             "`bench/graphs/decode_only.yaml` (decode each image, no model), local executor, on generated "
             "VQAv2-shaped datasets (5 questions an image, tiny JPEGs, annotations): peak RSS of the command "
             "(target: 200k within 1.2x of 20k), and seconds to its first results part. `--limit 64`, new: the "
             "question index is built by this run (its peak is the build's); then: it is there. One run each; "
             "`-`: not run (a full run of 1M takes too long here).", "",
             "| questions | full run: peak RSS | / 20k | time | first part | rerun, all done: peak RSS | time "
             "| `--limit 64`, new: first part | peak RSS | `--limit 64`: first part | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for q in sizes:
        row = m[str(q)]
        peak = row.get("full", {}).get("peak_rss_mb")
        cells = [cell(row, "full", "peak_rss_mb"), f"{peak / base:.2f}x" if peak and base else "-",
                 *(cell(row, run, key) for run, key in (("full", "seconds"), ("full", "first_part_s"),
                                                         ("rerun", "peak_rss_mb"), ("rerun", "seconds"),
                                                         ("limit_64_new", "first_part_s"),
                                                         ("limit_64_new", "peak_rss_mb"),
                                                         ("limit_64", "first_part_s"), ("limit_64", "peak_rss_mb")))]
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return lines + [""]


def published_table(p: dict) -> list[str]:
    rss = p["steps"]["peak_rss_mb"]
    lines = ["## Published sizes (random weights)", "",
             f"BLIP {p['blip']} ITM and captioner{' (ViT-L/16 at 384)' if p['blip'] == 'large' else ''}, "
             f"UnifiedQA-v2 T5 {p['t5']}, random weights "
             f"(`--random-weights`); LAVIS's VQAv2 settings and one sampling round "
             f"(`{'`, `'.join(p['settings'][3:])}`); "
             f"{p['images']} shapes images x 5 questions = {p['questions']} questions, {p['threads']} torch threads, "
             "local executor. A random captioner rarely emits the end token: 100 captions of 20 tokens per question "
             "on both sides (bench/run.py says why one round). The reference loop does LAVIS's per-step work: "
             "GradCAM by a full backward through the ITM model (ViT included, into every parameter's gradient), "
             "caption decoding that projects the image tokens' cross-attention keys/values at every step. "
             "Seconds inside each step (runtime: its nodes; `model` = inside model passes, `--profile`), medians.", "",
             "| step | runtime (model passes) | reference loop | speed-up |", "|---|---|---|---|"]
    names = {"load": "decode + preprocess", "itm": "ITM + GradCAM", "caption": "captions", "qa": "QA (FiD)"}
    for step, name in names.items():
        s = p["steps"][step]
        lines.append(f"| {name} | {med(s['runtime_s']):.1f} s ({med(s['runtime_model_s']):.1f} s) | "
                     f"{med(s['reference_s']):.1f} s | {med(s['reference_s']) / med(s['runtime_s']):.2f}x |")
    lines += [f"| whole command (target >= 5x) | {med(p['runtime_s']):.1f} s | {med(p['reference_s']):.1f} s | "
              f"{p['speedup']:.2f}x |",
              f"| peak RSS (target <= 0.6x) | {med(rss['runtime']):.0f} MiB | {med(rss['reference']):.0f} MiB | "
              f"{med(rss['runtime']) / med(rss['reference']):.2f}x |", "",
              f"Answers equal: {p['answers_equal']}/{p['answers_compared']}. Model passes: {p['model_s']:.1f} s of the "
              f"runtime's {p['run_s']:.1f} s run ({100 * p['model_s'] / p['run_s']:.0f}%, target 85%); the rest is "
              "mostly building the random-weight models inside the run (each `nn.Linear` initialised by torch, then "
              "again by its model's own scheme), which loading checkpoint files replaces.", "",
              "QA reads the distinct captions only (LAVIS's rule, on both sides): a random captioner's are mostly "
              "empty or repeated, so QA here answers from far fewer than 100 passages; `bench/qa_fid.py` times QA "
              "alone at 100 captions ([qa_fid.md](qa_fid.md)).", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    ap.add_argument("--repeats", type=int, default=3, help="A/B rounds per comparison (medians)")
    ap.add_argument("--questions", type=int, default=1000, help="questions of the end-to-end, profile and resume runs")
    ap.add_argument("--ray-questions", type=int, default=200, help="questions of the Ray comparisons")
    ap.add_argument("--sweep-images", type=int, default=16, help="shapes images of the sweep (4 questions each)")
    ap.add_argument("--batch-images", type=int, default=32, help="shapes images of the batch-size runs")
    ap.add_argument("--scale-questions", type=int, nargs="+", default=[20000, 200000, 1000000],
                    help="dataset sizes of memory_scale")
    ap.add_argument("--scale-limit-only", type=int, nargs="*", default=[1000000],
                    help="sizes memory_scale measures with --limit 64 runs only (a full run takes too long)")
    ap.add_argument("--scale-shard-size", type=int, default=256, help="shard_size of the memory_scale runs")
    ap.add_argument("--published-images", type=int, default=2, help="shapes images (5 questions each) of published")
    ap.add_argument("--published-blip", default="large", help="BLIP preset of published")
    ap.add_argument("--published-t5", default="base", help="UnifiedQA T5 preset of published (base, large, 3b)")
    ap.add_argument("--published-repeats", type=int, default=1, help="A/B rounds of published")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of published's commands")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for bench.json and bench.md")
    a = ap.parse_args()
    parts = a.only or DEFAULT_PARTS
    previous = a.out / "bench.json"
    results = json.loads(previous.read_text()) if a.only and previous.exists() else {"parts": {}}
    results.update(machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}")
    if "batch" in parts:
        results["batch_questions"] = a.batch_images * 4
    with tempfile.TemporaryDirectory(prefix="pnpvqa-bench-") as tmp:
        for part in parts:
            started = time.perf_counter()
            print(f"[bench] {part} ...", flush=True)
            results["parts"][part] = {**PARTS[part](Path(tmp), a),
                                      "_run": {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d"),
                                               "repeats": a.published_repeats if part == "published"
                                               else a.repeats}}
            print(f"[bench] {part}: {time.perf_counter() - started:.0f} s", flush=True)
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "bench.json").write_text(json.dumps(results, indent=2))
            (a.out / "bench.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
