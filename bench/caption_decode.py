"""Caption decoding alone at a published BLIP size: the runtime's ``BlipCaption.generate``
(cross-attention keys/values projected once, sampling on the top-k tokens) against the reference
loop's ``lavis_generate`` (LAVIS's per-step work: keys/values of the image tokens projected again
at every step, logits processors and the draw over the whole vocabulary), on the same patch
states and uniforms, A/B alternated; ids checked equal.

Each way's matrix-multiply FLOPs are counted once (``torch.utils.flop_counter``) and its time
split by operator once (``torch.profiler``): the share in ``addmm`` / ``mm`` is the part only
less work or a faster matmul can shorten. Random weights never emit the end token, so every
row decodes ``max_length`` minus the prompt's tokens on both sides.

    .venv/bin/python bench/caption_decode.py --preset large --rows 256 --repeats 3 \
        --out bench/results/caption_decode.json      # and caption_decode.md beside it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm")


def operator_shares(fn) -> dict[str, float]:
    """Share of ``fn``'s operator time (self CPU) in matrix multiplies, attention and the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    return {"matmul": matmul / total, "attention": attention / total, "other": 1 - (matmul + attention) / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="large")
    ap.add_argument("--rows", type=int, default=256, help="captions decoded at once (the stage's generation_batch)")
    ap.add_argument("--patches", type=int, default=20, help="sampled patches per caption (PNP-VQA: 20)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="JSON file of the results (and a .md table beside it)")
    a = ap.parse_args()
    from runtime.executors import apply_threads

    apply_threads(a.threads)
    os.environ["PNPVQA_RANDOM_WEIGHTS"] = "1"
    import torch

    from qa_fid import counted_gflop
    from reference_loop import lavis_generate
    from stages.blip import Caption

    stage = Caption(Caption.Params(preset=a.preset, num_captions=100, min_length=10, max_length=20, top_k=50))
    stage.setup("cpu")
    p, tok = stage.params, stage.tokenizer
    g = torch.Generator().manual_seed(0)
    size = stage.model.config.vit.image_size
    with torch.no_grad():
        image = stage.model.encode_image(torch.randn(1, 3, size, size, generator=g))         # [1, 1+P, width]
    width = image.shape[-1]
    index = torch.stack([torch.randperm(image.shape[1] - 1, generator=g)[:a.patches] + 1 for _ in range(a.rows)])
    states = image[0][index.sort(dim=1).values]                                       # [rows, patches, width]
    uniforms = torch.rand(a.rows, p.max_length - len(stage.prompt_ids), generator=g, dtype=torch.float64)

    ways = {"reference": lambda: lavis_generate(stage, states, uniforms),
            "runtime": lambda: stage.model.generate(states, stage.prompt_ids, uniforms, max_length=p.max_length,
                                                    min_length=p.min_length, top_k=p.top_k, top_p=p.top_p,
                                                    eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)}
    times: dict[str, list[float]] = {w: [] for w in ways}
    ids: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(a.repeats):
            for w, fn in ways.items():
                start = time.perf_counter()
                ids[w] = fn()
                times[w].append(time.perf_counter() - start)
                print(f"{w}: {times[w][-1]:.1f} s", flush=True)
        gflop = {w: counted_gflop(fn) for w, fn in ways.items()}
        shares = {w: operator_shares(fn) for w, fn in ways.items()}
    med = {w: statistics.median(t) for w, t in times.items()}
    result = {"preset": a.preset, "rows": a.rows, "patches": a.patches, "width": width, "threads": a.threads,
              "new_tokens": int(ids["runtime"].shape[1] - len(stage.prompt_ids)), "seconds": times, "median_s": med,
              "speedup_over_reference": {w: med["reference"] / m for w, m in med.items()},
              "ids_equal_reference": {w: bool(torch.equal(ids[w], ids["reference"])) for w in ids},
              "gflop": gflop, "gflop_per_s": {w: gflop[w] / med[w] for w in gflop}, "operator_shares": shares}
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
        a.out.with_suffix(".md").write_text(markdown(result, " ".join(sys.argv[1:])))


def markdown(r: dict, argv: str) -> str:
    lines = [f"# Caption decoding alone: BLIP {r['preset']}, random weights", "",
             f"{r['rows']} captions of {r['new_tokens']} new tokens decoded at once from {r['patches']} image tokens "
             f"each, {r['threads']} torch threads. GFLOP: matrix multiplies counted by torch's flop counter; operator "
             "shares: self CPU time by torch's profiler (one extra run each).", "",
             "| way | median time | speed-up | GFLOP | GFLOP/s | matmul | attention | other ops | ids equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for way, seconds in r["median_s"].items():
        s = r["operator_shares"][way]
        lines.append(f"| {way} | {seconds:.1f} s | {r['speedup_over_reference'][way]:.2f}x | {r['gflop'][way]:.0f} | "
                     f"{r['gflop_per_s'][way]:.0f} | {100 * s['matmul']:.0f}% | {100 * s['attention']:.0f}% | "
                     f"{100 * s['other']:.0f}% | {'yes' if r['ids_equal_reference'][way] else 'NO'} |")
    return "\n".join(lines + ["", f"_`bench/caption_decode.py {argv}`, medians of "
                                   f"{len(next(iter(r['seconds'].values())))} alternated rounds._", ""])


if __name__ == "__main__":
    main()
