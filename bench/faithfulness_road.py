"""Benchmark: ROAD's imputation in ``heatmap_faithfulness`` against pytorch-grad-cam's
``NoisyLinearImputer`` (the exact sparse solve of Rong et al. 2022, one image at a time with
scipy), and the ROAD curve of the stage against grad-cam's ``ROADMostRelevantFirst`` on the
same samples. Writes ``bench/results/faithfulness_road.json`` and ``.md``.

    .venv/bin/python bench/faithfulness_road.py     # minutes; 25 on 2 shared, loaded cores with the figures' settings:
    .venv/bin/python bench/faithfulness_road.py --samples 2 --candidates 12 --repeats 2 --batch 2 --iterations 8 16 64
    .venv/bin/python bench/faithfulness_road.py --threads 1 --repeats 5

Parts:

- ``imputation``: one 384 px image (a shapes sample's preprocessed pixels) with the cells a
  GradCAM heatmap ranks highest removed (12.5 %, 50 % and 87.5 % of the 24 x 24 cells, steps
  1, 4, 7 of 8): the largest and mean absolute difference of the imputed pixels from
  grad-cam's solution (noise 0 on both sides) at several iteration counts of the stage's
  coarse-to-fine conjugate gradients, and of the previous stage version's 64 Jacobi iterations
  from a push-pull fill; the time per image of each (ours batched over ``--batch`` copies,
  grad-cam one image per call, as it runs), alternated over ``--repeats`` rounds, medians.
- ``curves``: on ``--samples`` shapes questions with their GradCAM heatmaps (those of
  ``--candidates`` the model matches best on the whole image), grad-cam's
  ``ROADMostRelevantFirstAverage`` (percentiles 10..90: the mean over removing the top 90 % ..
  10 % of the pixels of the score change from the whole image) against the stage's ROAD curve
  at ``steps=10`` read the same way (mean of points 1..9 minus point 0), with the shapes ITM
  match probability of the question as the model score on both sides; and the time of each.
  The differences by construction: grad-cam ranks pixels by the percentile of a pixel-level
  map (here the heatmap upsampled, one value per cell block, so a threshold removes whole cells
  and ties remove a cell entirely), the stage ranks grid cells and removes
  ``floor(k * cells / steps)`` of them; grad-cam's noise is ``torch.randn`` (seeded here), the
  stage's is seeded by the image and the removed cells; grad-cam solves exactly, the stage
  iterates.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.faithfulness import (  # noqa: E402
    HeatmapFaithfulness, ROAD_NEIGHBOURS, curve_auc, heatmap_order, image_key, pixel_mask, road_impute,
    visible_cells,
)

RESULTS = ROOT / "bench" / "results"
GRAPH = """extends: {graphs}/pnp_vqa.yaml
nodes:
  caption: null
  answer: null
  accuracy: null
  heatmap_quality: null
outputs: [pixels.pixels, source.question, gradcam.heatmap]
"""


def previous_road(pixels: torch.Tensor, removed: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """The stage's version 1 imputation (for the record): a push-pull fill of the holes, then
    Jacobi iterations of "each removed pixel is the weighted mean of its neighbours"."""
    weights = torch.tensor(ROAD_NEIGHBOURS, dtype=pixels.dtype)

    def neighbour_mean(x):
        total = F.conv2d(x, weights.view(1, 1, 3, 3).expand(3, 1, 3, 3), padding=1, groups=3)
        return total / F.conv2d(torch.ones_like(x[:, :1]), weights.view(1, 1, 3, 3), padding=1)

    def push_pull(x, known):
        if x.shape[-1] == 1:
            return x * known
        ck = F.avg_pool2d(known, 2, ceil_mode=True)
        coarse = F.avg_pool2d(x * known, 2, ceil_mode=True) / ck.clamp(min=1e-12)
        up = F.interpolate(push_pull(coarse, (ck > 0).to(known.dtype)), size=x.shape[-2:], mode="bilinear",
                           align_corners=False)
        return torch.where(known > 0, x, up)

    hole = removed[:, None]
    out = push_pull(pixels, (~hole).to(pixels.dtype))
    for _ in range(iterations):
        out = torch.where(hole, neighbour_mean(out), pixels)
    return out


def samples(n: int) -> list[dict]:
    """``n`` shapes questions with their preprocessed pixels and GradCAM heatmaps."""
    import pyarrow.parquet as pq

    from runtime.api import run_graph

    with tempfile.TemporaryDirectory(prefix="faith-bench-") as tmp:
        graph = Path(tmp) / "g.yaml"
        graph.write_text(GRAPH.format(graphs=ROOT / "graphs"))
        run_graph(graph, executor="local", output=Path(tmp) / "o", no_cache=True, limit=n, device="cpu",
                  progress=False)
        rows = pq.read_table(Path(tmp) / "o" / "results.parquet").to_pylist()
    return [{"pixels": np.asarray(r["pixels.pixels"], np.float32).reshape(3, 384, 384),
             "question": r["question"],
             "heatmap": np.asarray(r["gradcam.heatmap"], np.float32).reshape(24, 24)} for r in rows]


def clock(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def imputation(sample: dict, a) -> dict:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    pixels = torch.from_numpy(sample["pixels"])[None]
    order = heatmap_order(sample["heatmap"][None])
    visible = visible_cells(order, 8, "road")[0]
    exact = NoisyLinearImputer(noise=0.0)
    out = {}
    for step in (1, 4, 7):
        removed = ~pixel_mask(torch.from_numpy(visible[step:step + 1]), 24, 384)     # [1, s, s]
        keep = (~removed[0]).float()
        reference = exact(pixels[0], keep)
        batch_pixels, batch_removed = pixels.expand(a.batch, -1, -1, -1).contiguous(), removed.expand(a.batch, -1, -1)
        zero = torch.zeros_like(batch_pixels)
        methods = {f"cg{i}": (lambda i=i: road_impute(batch_pixels, batch_removed, zero, i)) for i in a.iterations}
        methods["jacobi64_v1"] = lambda: previous_road(batch_pixels, batch_removed, 64)
        row = {"removed_share": float(removed.float().mean()), "methods": {}}
        for name, run in methods.items():
            diff = (run()[0] - reference).abs()[:, removed[0]]
            row["methods"][name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "s_per_image": []}
        row["gradcam_s_per_image"] = []
        for _ in range(a.repeats):  # alternated: grad-cam, then each of ours
            row["gradcam_s_per_image"].append(clock(lambda: exact(pixels[0], keep)))
            for name, run in methods.items():
                row["methods"][name]["s_per_image"].append(clock(run) / a.batch)
        out[f"step {step} of 8"] = row
    return out


class MatchModel(torch.nn.Module):
    """grad-cam's model interface: images -> ``[B, 2]`` ITM match probabilities of one question."""

    def __init__(self, stage: HeatmapFaithfulness, question: str):
        super().__init__()
        from models.blip.tokenizer import tokenize_questions
        from stages.text import blip_question

        self.stage = stage
        self.ids, self.mask = tokenize_questions(stage.tokenizer, [blip_question(question)], stage.params.max_length)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.stage.model.encode_image(images)
        n = len(images)
        return self.stage.model.itm_logits(tokens, self.ids.expand(n, -1), self.mask.expand(n, -1)).float().softmax(-1)


def our_road_curve(stage: HeatmapFaithfulness, sample: dict, steps: int) -> np.ndarray:
    """The stage's ROAD curve of the heatmap order (what ``process`` computes for it)."""
    model = MatchModel(stage, sample["question"])
    pixels = torch.from_numpy(sample["pixels"])[None]
    visible = visible_cells(heatmap_order(sample["heatmap"][None]), steps, "road")[0]
    specs = [(0, "whole", b"")] + [(0, "road", np.packbits(v).tobytes()) for v in visible[1:]]
    with torch.no_grad():
        images = stage.perturbed(pixels, pixels, [image_key(sample["pixels"])], specs, 24)
        return model(images)[:, 1].numpy()


def curves(stage: HeatmapFaithfulness, rows: list[dict], a) -> dict:
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirstAverage

    class Match:
        def __call__(self, output):
            return output[1]

    out = {"samples": []}
    with torch.no_grad():  # the questions the model matches best: a curve of near-zero scores says little
        whole = [float(MatchModel(stage, r["question"])(torch.from_numpy(r["pixels"])[None])[0, 1]) for r in rows]
    for r in [rows[i] for i in np.argsort(whole)[::-1][:a.samples]]:
        cam = np.kron(r["heatmap"], np.ones((16, 16), np.float32))[None]               # [1, 384, 384]
        model = MatchModel(stage, r["question"])
        pixels = torch.from_numpy(r["pixels"])[None]
        ours_t, theirs_t = [], []
        for _ in range(a.curve_repeats):  # alternated
            torch.manual_seed(0)
            start = time.perf_counter()
            with torch.no_grad():
                theirs = float(ROADMostRelevantFirstAverage()(pixels, cam, [Match()], model)[0])
            theirs_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            curve = our_road_curve(stage, r, 10)
            ours_t.append(time.perf_counter() - start)
        ours = float(curve[1:10].mean() - curve[0])
        out["samples"].append({"question": r["question"], "gradcam_morf_average": theirs, "ours_morf_average": ours,
                               "ours_curve": [float(x) for x in curve], "ours_auc": float(curve_auc(curve)),
                               "gradcam_s": theirs_t, "ours_s": ours_t})
    diffs = [abs(s["gradcam_morf_average"] - s["ours_morf_average"]) for s in out["samples"]]
    out["max_abs_diff"], out["mean_abs_diff"] = max(diffs), float(np.mean(diffs))
    out["gradcam_median_s"] = statistics.median(t for s in out["samples"] for t in s["gradcam_s"])
    out["ours_median_s"] = statistics.median(t for s in out["samples"] for t in s["ours_s"])
    return out


def table(r: dict) -> str:
    lines = [f"# ROAD: heatmap_faithfulness against pytorch-grad-cam ({r['machine']}, torch threads "
             f"{r['threads']}, {r['date']})", "",
             "## Imputation of one 384 px image (noise 0), agreement with grad-cam's exact solve and time", "",
             "Pixel units: normalised (CLIP mean / std); the image's pixels span "
             f"{r['pixel_range']:.2f}. Time: median of {r['repeats']} alternated rounds; ours per image of a "
             f"batch of {r['batch']}, grad-cam one image per call.", "",
             "| removed | method | max abs diff | mean abs diff | s / image | grad-cam s / image | grad-cam / ours |",
             "|---|---|---|---|---|---|---|"]
    for step, row in r["imputation"].items():
        g = statistics.median(row["gradcam_s_per_image"])
        for name, m in row["methods"].items():
            t = statistics.median(m["s_per_image"])
            label = name.replace("cg", "coarse-to-fine CG, ").replace("jacobi64_v1", "v1: 64 Jacobi") + \
                (" iterations / level" if name.startswith("cg") else "")
            lines.append(f"| {row['removed_share']:.1%} ({step}) | {label} | {m['max_abs']:.4f} | "
                         f"{m['mean_abs']:.5f} | {t:.3f} | {g:.3f} | {g / t:.1f}x |")
    c = r["curves"]
    lines += ["", f"## ROAD most-relevant-first average on {len(c['samples'])} shapes questions (GradCAM heatmaps)",
              "", "grad-cam: `ROADMostRelevantFirstAverage` (percentiles 10..90) on the heatmap upsampled to "
              "pixels; ours: the stage's ROAD curve at steps=10, mean of points 1..9 minus point 0. "
              "Score: the shapes ITM match probability of the question.", "",
              "| question | whole-image match | grad-cam | ours | ours AUC |", "|---|---|---|---|---|"]
    for s in c["samples"]:
        lines.append(f"| {s['question']} | {s['ours_curve'][0]:.4f} | {s['gradcam_morf_average']:+.4f} | "
                     f"{s['ours_morf_average']:+.4f} | "
                     f"{s['ours_auc']:.4f} |")
    lines += ["", f"Largest difference {c['max_abs_diff']:.2e}, mean {c['mean_abs_diff']:.2e}. Time per "
              f"question and curve (median, alternated): grad-cam {c['gradcam_median_s']:.2f} s, ours "
              f"{c['ours_median_s']:.2f} s ({c['gradcam_median_s'] / c['ours_median_s']:.1f}x)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated rounds of the imputation timing")
    ap.add_argument("--curve-repeats", type=int, default=1, help="alternated rounds of the curve timing")
    ap.add_argument("--batch", type=int, default=4, help="images per call of our imputation")
    ap.add_argument("--iterations", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--samples", type=int, default=4, help="shapes questions of the curve comparison: those "
                    "with the highest ITM match on the whole image among --candidates")
    ap.add_argument("--candidates", type=int, default=16, help="shapes questions run through GradCAM")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = samples(a.candidates)
    stage = HeatmapFaithfulness(HeatmapFaithfulness.Params(preset="shapes"))
    stage.setup("cpu")
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"python {platform.python_version()}, torch {torch.__version__}",
              "threads": a.threads, "date": time.strftime("%Y-%m-%d"), "repeats": a.repeats, "batch": a.batch,
              "pixel_range": float(rows[0]["pixels"].max() - rows[0]["pixels"].min()),
              "road_iterations_default": HeatmapFaithfulness.Params().road_iterations}
    result["imputation"] = imputation(rows[0], a)
    result["curves"] = curves(stage, rows, a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "faithfulness_road.json").write_text(json.dumps(result, indent=2))
    (a.out / "faithfulness_road.md").write_text(table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
