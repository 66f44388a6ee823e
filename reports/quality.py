"""``runtime quality``: what each heatmap variant is worth, measured on held-out shapes data.

Runs every variant graph (and two baselines: uniform patch sampling, the ground-truth-mask
heatmap) on the same held-out ``shapes`` images (seed 9000 by default: training used seeds 0-2,
the training runs' held-out sets 1000-1002 and the shipped weights' checks 7000), with the graphs'
own defaults (the ``shapes`` presets), then writes a Markdown report: per variant VQA accuracy,
accuracy per question type, and the quality of the heatmap that drives the captions (pointing
game, energy inside the referred object's mask, top-20 patch recall), plus the ITM accuracy on
hard negatives of the ITM model that gives GradCAM; and, on the first few images, the mask-free
faithfulness scores of that heatmap with their agreement with the mask scores
(``reports/quality_faithfulness.py``). Runs share the content-addressed cache, so a second call
only recomputes what changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from plugins import Registry
from reports.quality_faithfulness import faithfulness_table, render_section, run_faithfulness
from shapes.scene import TEXTURES

GRAPHS = Path(__file__).resolve().parents[1] / "graphs"
QUALITY_SEED = 9000
MIN_IMAGES = 2  # the ITM check's hard negatives include other images' questions
QUESTION_TYPES = ("color", "shape", "count", "position", "exists")
BACKGROUNDS = ("plain", *TEXTURES)


@dataclass(frozen=True)
class Variant:
    name: str
    graph: Path
    heatmap_node: str        # the heatmap_metrics node scoring the heatmap that drives the captions
    note: str
    changes: str | None = None  # the variant this one modifies (its graph extends that graph)


# the variants of the report; other packages add theirs through the ``pnpvqa.variants`` entry points
VARIANTS: Registry[Variant] = Registry("quality variant", "pnpvqa.variants", lambda v: v.name)
for _variant in (
    Variant("pnp_vqa", GRAPHS / "pnp_vqa.yaml", "heatmap_quality", "BLIP ITM GradCAM (LAVIS recipe)"),
    Variant("esam_enhanced", GRAPHS / "esam_enhanced.yaml", "enhanced_quality",
            "GradCAM blended with the EfficientSAM mask prompted at its peaks", "pnp_vqa"),
    Variant("fusion_caption", GRAPHS / "fusion_caption.yaml", "heatmap_quality",
            "GradCAM; the captioner reads BLIP tokens fused with SAM (DIFNet)", "pnp_vqa"),
    Variant("fusion_gradcam", GRAPHS / "fusion_gradcam.yaml", "heatmap_quality",
            "GradCAM through the ITM on BLIP + SAM fused tokens", "pnp_vqa"),
    Variant("qavit", GRAPHS / "qavit.yaml", "heatmap_quality", "QA-ViT question-aware attention"),
    Variant("uniform_sampling", GRAPHS / "baselines" / "uniform_sampling.yaml", "heatmap_quality",
            "baseline: flat heatmap, patches sampled uniformly"),
    Variant("gt_mask_heatmap", GRAPHS / "baselines" / "gt_mask_heatmap.yaml", "heatmap_quality",
            "upper bound: heatmap from the ground-truth mask"),
):
    VARIANTS.add(_variant, "reports/quality.py")


def run_variant(variant: Variant, *, seed: int, images: int, runs: Path, executor: str,
                cache_dir: str | None, progress: bool) -> Path:
    """Run one variant on the held-out data; returns its results.parquet."""
    from runtime.api import run_graph

    overrides = [f"dataset.seed={seed}", f"dataset.num_images={images}"]
    summary = run_graph(variant.graph, overrides=overrides, executor=executor, output=runs / variant.name,
                        cache_dir=cache_dir, progress=progress,
                        arguments={"graph": str(variant.graph), "overrides": overrides, "quality": True})
    if summary.errors:
        print(f"warning: {variant.name}: {summary.errors} rows failed ({'; '.join(summary.error_examples[:2])})",
              file=sys.stderr)
    return summary.results


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def sample_backgrounds(seed: int, images: int) -> dict[str, str]:
    """``sample_id -> background`` (``plain`` or a texture name) of the held-out shapes samples."""
    from shapes.dataset import ShapesParams, iter_samples

    return {row["sample_id"]: json.loads(row["scene"])["background"]
            for row in iter_samples(ShapesParams(seed=seed, num_images=images))}


def variant_metrics(results: Path, heatmap_node: str, backgrounds: dict[str, str] | None = None) -> dict[str, Any]:
    """VQA accuracy (overall, per question type) and heatmap metrics from a results file; with
    ``backgrounds`` (sample_id -> background) also VQA accuracy and pointing game per background."""
    import pyarrow.parquet as pq

    rows = pq.read_table(results).to_pylist()
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    out: dict[str, Any] = {"questions": len(rows), "errors": len(rows) - len(ok),
                           "vqa_accuracy": _mean(r["accuracy.accuracy"] for r in ok)}
    for qtype in QUESTION_TYPES:
        out[f"accuracy_{qtype}"] = _mean(r["accuracy.accuracy"] for r in ok if r["question_type"] == qtype)
        out[f"questions_{qtype}"] = sum(r["question_type"] == qtype for r in ok)
    for metric in ("pointing_game", "energy_in_mask", "topk_recall"):
        column = f"{heatmap_node}.{metric}"
        out[metric] = _mean(r.get(column) for r in ok)
    if backgrounds is not None:
        out["by_background"] = {
            kind: {"questions": sum(backgrounds.get(r["sample_id"]) == kind for r in ok),
                   "vqa_accuracy": _mean(r["accuracy.accuracy"] for r in ok if backgrounds.get(r["sample_id"]) == kind),
                   "pointing_game": _mean(r.get(f"{heatmap_node}.pointing_game") for r in ok
                                          if backgrounds.get(r["sample_id"]) == kind)}
            for kind in BACKGROUNDS}
    return out


def itm_accuracy(seed: int, images: int) -> dict[str, float]:
    """The shapes ITM's accuracy on held-out positives and hard negatives (and its pointing game)."""
    from models.blip.family import BLIP_ITM
    from training.itm import check_metrics

    return check_metrics(BLIP_ITM.find("shapes"), seed=seed, num_images=images)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _background_questions(table: dict[str, dict[str, Any]], background: str) -> int:
    return next(iter(table.values()))["by_background"][background]["questions"]


def render_markdown(table: dict[str, dict[str, Any]], itm: dict[str, float], *, seed: int, images: int,
                    command: str, findings: Sequence[str], faithfulness: dict[str, Any] | None = None,
                    faithfulness_images: int = 0) -> str:
    lines = [
        "# Heatmap variants on held-out shapes data",
        "",
        f"Generated by `{command}` on {datetime.now(timezone.utc).date().isoformat()}: "
        f"{images} held-out `shapes` images (seed {seed}, never used in training), "
        f"{next(iter(table.values()))['questions']} questions, every graph with its defaults "
        "(the bundled `shapes` presets, `models/assets/shapes/*.manifest.json`). "
        "Regenerate with the same command; the runs share the cache.",
        "",
        "Columns: VQA accuracy (VQAv2 metric against the 10 human answers); accuracy per question type; "
        "heatmap quality of the heatmap that drives the captions, on the questions that refer to objects: "
        "pointing game (argmax cell overlaps the referred objects' mask), energy in mask (share of the "
        "positive heatmap mass on the mask), top-20 recall (share of the mask's cells among the 20 "
        "highest cells; PNP-VQA samples 20 patches per caption).",
        "",
        "| variant | VQA acc | color | shape | count | position | exists | pointing | energy in mask | top-20 recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in table.items():
        lines.append("| " + " | ".join([f"`{name}`", _fmt(m["vqa_accuracy"])]
                                        + [_fmt(m[f"accuracy_{t}"]) for t in QUESTION_TYPES]
                                        + [_fmt(m["pointing_game"]), _fmt(m["energy_in_mask"]),
                                           _fmt(m["topk_recall"])]) + " |")
    counts = next(iter(table.values()))
    kinds = [k for k in BACKGROUNDS if any((m.get("by_background") or {}).get(k, {}).get("questions")
                                          for m in table.values())]
    if kinds:
        lines += ["", "By background (VQA accuracy / pointing game; the background is plain or a texture, "
                  "questions per background in the header):", "",
                  "| variant | " + " | ".join(f"{k} ({_background_questions(table, k)})" for k in kinds) + " |",
                  "|---|" + "---|" * len(kinds)]
        for name, m in table.items():
            cells = [f"{_fmt(m['by_background'][k]['vqa_accuracy'])} / {_fmt(m['by_background'][k]['pointing_game'])}"
                     for k in kinds]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Questions per type: " + ", ".join(f"{t} {counts[f'questions_{t}']}" for t in QUESTION_TYPES) + ".",
        "",
        "Variants: " + "; ".join(f"`{v.name}`: {v.note}" for v in VARIANTS.values() if v.name in table)
        + ".",
        "",
        f"ITM accuracy of the shapes BLIP ITM (the model whose GradCAM drives `pnp_vqa`, `esam_enhanced` and "
        f"`fusion_caption`) on the same images, each question as a positive and one hard negative "
        f"(a colour or shape swapped to a combination absent from the scene, or another image's question): "
        f"**{_fmt(itm.get('itm_accuracy'))}** overall, {_fmt(itm.get('swap_accuracy'))} on swapped negatives; "
        f"its GradCAM pointing game on the positives (questions whose colour / shape words are all in the "
        f"scene; the table's pointing column covers every question that refers to objects): "
        f"{_fmt(itm.get('pointing_game'))}.",
        "",
        *([*render_section(faithfulness, images=faithfulness_images), ""] if faithfulness else []),
        "## What the numbers say",
        "",
        *[f"- {f}" for f in findings],
        "",
        "## How to read them",
        "",
        "- The shapes ITM and QA-ViT were trained with a grounding loss on the attention their heatmaps "
        "read (docs/training.md): their heatmap quality here is supervised, not emergent as in the "
        "published models; the question is whether the rest of each variant turns a good heatmap into answers.",
        "- Captions name the visible objects left to right; nothing in them says top / bottom, and a count "
        "is only right when one caption shows every object of the kind, so `position` and `count` questions "
        "are bounded by the captions, not by the heatmap (see the ground-truth-mask row).",
        "- `uniform_sampling` keeps the same captioner and QA model: the gap to it is what the question "
        "guidance buys; the gap to `gt_mask_heatmap` is what a perfect heatmap would add.",
        "",
    ]
    return "\n".join(lines)


def findings_from(table: dict[str, dict[str, Any]]) -> list[str]:
    """Plain statements the numbers support (computed, so they stay true when regenerated)."""
    out = []
    uniform = table.get("uniform_sampling", {}).get("vqa_accuracy")
    upper = table.get("gt_mask_heatmap", {}).get("vqa_accuracy")
    for name, m in table.items():
        acc = m["vqa_accuracy"]
        if name in ("uniform_sampling", "gt_mask_heatmap") or acc is None:
            continue
        parts = [f"`{name}`: VQA accuracy {acc:.3f}"]
        if uniform is not None:
            diff = acc - uniform
            parts.append(f"{'+' if diff >= 0 else ''}{diff:.3f} vs uniform sampling"
                         + (" (no gain: the heatmap does not help here)" if diff <= 0.005 else ""))
        if upper is not None:
            parts.append(f"{acc - upper:+.3f} vs the ground-truth-mask heatmap")
        base = VARIANTS[name].changes if name in VARIANTS else None
        base_acc = table.get(base, {}).get("vqa_accuracy") if base else None
        if base_acc is not None:
            diff = acc - base_acc
            parts.append(f"{diff:+.3f} vs `{base}`, the graph it changes"
                         + (" (no gain over it)" if diff <= 0.005 else ""))
        out.append(", ".join(parts) + ".")
    sizes = [(m["vqa_accuracy"], m.get("questions")) for m in table.values() if m.get("vqa_accuracy") is not None]
    if sizes and all(n for _, n in sizes):
        p, n = sizes[0]
        se = (p * (1 - p) / n) ** 0.5
        out.append(f"Sampling noise: one standard error of a VQA accuracy near {p:.2f} over {n} questions is "
                   f"{se:.3f}; differences smaller than about {2 * se:.3f} may not hold on other images.")
    guided = {n: m for n, m in table.items() if n not in ("uniform_sampling", "gt_mask_heatmap")}
    for name, m in guided.items():
        by = m.get("by_background") or {}
        plain = (by.get("plain") or {}).get("pointing_game")
        textured = {k: v["pointing_game"] for k, v in by.items() if k != "plain" and v.get("pointing_game") is not None}
        if plain is not None and textured and min(textured.values()) < plain - 0.1:
            worst = min(textured, key=textured.get)
            out.append(f"`{name}`'s heatmap finds the referred object less often on textured backgrounds: "
                       f"pointing game {plain:.3f} on plain, {textured[worst]:.3f} on {worst}.")
    uniform_row = table.get("uniform_sampling", {})
    for qtype in QUESTION_TYPES:
        flat = uniform_row.get(f"accuracy_{qtype}")
        scores = {n: m.get(f"accuracy_{qtype}") for n, m in guided.items() if m.get(f"accuracy_{qtype}") is not None}
        if flat is not None and scores and max(scores.values()) < flat:
            best = max(scores, key=scores.get)
            out.append(f"`{qtype}` questions: uniform sampling ({flat:.3f}) beats every heatmap variant (best "
                       f"`{best}`, {scores[best]:.3f}): concentrating the sampled patches on the question's "
                       "object does not help this type.")
    weakest = [t for t in QUESTION_TYPES if all((m.get(f"accuracy_{t}") or 0) < 0.5 for m in table.values())]
    if weakest:
        out.append("Below 0.5 for every variant, the upper bound included: " + ", ".join(weakest)
                   + " questions: there the captioner / question-answering chain is the limit, not the heatmap.")
    return out


def _at_least(low: int):
    """An argparse type: an integer no smaller than ``low`` (argparse names the argument, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runtime quality",
        description="Run every heatmap variant (pnp_vqa, esam_enhanced, fusion_caption, fusion_gradcam, qavit) and two "
                    "baselines (uniform patch sampling, ground-truth-mask heatmap) with their graph defaults on "
                    "held-out shapes data, and write a Markdown table of VQA accuracy (overall and per question "
                    "type), heatmap pointing game, energy in mask, top-20 recall and ITM accuracy, VQA "
                    "accuracy and pointing game per background, heatmap faithfulness without masks (deletion / "
                    "insertion / ROAD AUC) with its Spearman agreement with the mask scores, and findings computed "
                    "from the numbers (plus a .json beside it). Runs share the cache: a second call recomputes only what changed.")
    p.add_argument("--images", type=_at_least(MIN_IMAGES), default=100,
                   help=f"held-out shapes images, 4 questions each (default 100, at least {MIN_IMAGES}: the ITM check "
                        "pairs each question with another image's as a negative)")
    p.add_argument("--seed", type=_at_least(0), default=QUALITY_SEED,
                   help=f"shapes seed of the held-out images (default {QUALITY_SEED}; training used 0-2, its "
                        "held-out sets 1000-1002, the shipped weights' checks 7000)")
    p.add_argument("--faithfulness-images", type=_at_least(0), default=16, metavar="N",
                   help="score the heatmaps' faithfulness without masks (deletion / insertion / ROAD, 8 steps) on the "
                        "first N of the images, and its agreement with the mask scores (default 16; per variant, each "
                        "image costs about 45 ITM ViT passes and each question 21; 0: leave the section out)")
    p.add_argument("--out", default="docs/quality.md", help="Markdown report to write (default docs/quality.md)")
    p.add_argument("--runs", default="runs/quality", help="folder of the variants' runs (default runs/quality)")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="as `runtime run` (default local)")
    p.add_argument("--cache", default=None, help="cache folder (default: the runtime's, .runtime_cache)")
    p.add_argument("--only", action="append", default=[], metavar="VARIANT",
                   help="run only this variant (repeatable; default: all): "
                        + ", ".join(VARIANTS))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from models.weights import RANDOM_WEIGHTS_ENV, random_weights

    if random_weights():
        print(f"error: {RANDOM_WEIGHTS_ENV}=1 (--random-weights) gives every model random weights: a quality "
              "report of them would be meaningless; unset it", file=sys.stderr)
        return 2
    unknown = set(args.only) - set(VARIANTS)
    if unknown:
        print(f"error: unknown variant(s) {', '.join(sorted(unknown))}; choose from "
              f"{', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    chosen = [v for v in VARIANTS.values() if not args.only or v.name in args.only]
    from models.weights import WeightsError
    from runtime.errors import GraphError

    table: dict[str, dict[str, Any]] = {}
    backgrounds = sample_backgrounds(args.seed, args.images)
    try:
        for variant in chosen:
            if not args.quiet:
                print(f"== {variant.name} ({variant.graph.relative_to(GRAPHS.parent)})", file=sys.stderr)
            results = run_variant(variant, seed=args.seed, images=args.images, runs=Path(args.runs),
                                  executor=args.executor, cache_dir=args.cache, progress=not args.quiet)
            table[variant.name] = variant_metrics(results, variant.heatmap_node, backgrounds)
        scored = min(args.faithfulness_images, args.images)
        faithfulness = faithfulness_table({
            v.name: run_faithfulness(v, seed=args.seed, images=args.images, scored=scored, runs=Path(args.runs),
                                     executor=args.executor, cache_dir=args.cache, progress=not args.quiet)
            for v in chosen}) if scored else None
        itm = itm_accuracy(args.seed, args.images)
    except GraphError as exc:
        print("error: " + "; ".join(str(p) for p in exc.problems), file=sys.stderr)
        return 2
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "runtime quality" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = render_markdown(table, itm, seed=args.seed, images=args.images, command=command.strip(),
                           findings=findings_from(table), faithfulness=faithfulness, faithfulness_images=scored)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"seed": args.seed, "images": args.images, "variants": table,
                                                    "itm": itm, "faithfulness": faithfulness,
                                                    "faithfulness_images": scored}, indent=2, sort_keys=True) + "\n")
    print(text)
    return 0
