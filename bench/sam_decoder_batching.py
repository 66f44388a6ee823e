"""Benchmark: EfficientSAM mask decoding for a batch of prompt sets in one call vs one call
per sample (as the seed code did), on the same embeddings. Prints time per sample and the ratio.

    .venv/bin/python bench/sam_decoder_batching.py --preset vitt --samples 32
"""

from __future__ import annotations

import argparse
import time

import torch

from models.efficient_sam import EFFICIENT_SAM, build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=EFFICIENT_SAM.names)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--images", type=int, default=8, help="distinct images (samples share them)")
    ap.add_argument("--output-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = EFFICIENT_SAM.config(a.preset)
    model = build_model(a.preset, a.device).eval()  # random weights: timing only
    side = cfg.image_size
    with torch.no_grad():
        images = model.embed(torch.randn(a.images, 3, side, side, device=a.device))
    rows = torch.arange(a.samples, device=a.device) % a.images
    embeddings = images[rows]
    points = torch.rand(a.samples, 1, 5, 2, device=a.device) * side
    labels = torch.ones(a.samples, 1, 5, dtype=torch.long, device=a.device)
    size = (a.output_size, a.output_size)

    def batched():
        model.predict_masks(embeddings, points, labels, input_size=(side, side), output_size=size)

    def one_by_one():
        for i in range(a.samples):
            model.predict_masks(embeddings[i:i + 1], points[i:i + 1], labels[i:i + 1], input_size=(side, side),
                                output_size=size)

    times = {}
    with torch.no_grad():
        for name, fn in (("batched", batched), ("one by one", one_by_one)):
            fn()  # warm-up
            if a.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(a.repeats):
                fn()
            if a.device == "cuda":
                torch.cuda.synchronize()
            times[name] = (time.perf_counter() - start) / a.repeats / a.samples
    print(f"EfficientSAM {a.preset} decoder on {a.device}, {a.samples} prompt sets of 5 points, "
          f"{a.output_size}x{a.output_size} masks")
    for name, t in times.items():
        print(f"  {name:<11} {1000 * t:8.2f} ms per sample")
    print(f"  one-by-one / batched: {times['one by one'] / times['batched']:.1f}x")


if __name__ == "__main__":
    main()
