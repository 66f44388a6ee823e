"""The mask-free part of ``runtime quality``: faithfulness of the heatmap that drives the
captions (deletion / insertion / ROAD AUC through ``graphs/overlays/faithfulness.yaml``, against
random and centre-prior orders) on the first images of the held-out set, and how far each of
these scores agrees with the mask scores: Spearman's rho over samples (per variant and pooled)
and over the variants' means. Where it agrees, it can stand in for them on data without masks.

Agreement is measured on each score's gain over the random order on the same question, not on
the raw area: an area also carries how strongly the ITM matches that question at all (its
level), which moves every order's area together and correlates with the mask scores by itself
(a question whose object the heatmap finds tends to be one the ITM matches strongly). The
level's own agreement is reported beside it, so the reader sees what the raw areas would mix in.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from reports.agreement import spearman

GRAPHS = Path(__file__).resolve().parents[1] / "graphs"
OVERLAY = GRAPHS / "overlays" / "faithfulness.yaml"
# the mask-free scores and their sign: times it, higher is better (a faithful heatmap's cells
# remove the evidence fast - a low deletion / ROAD area - and restore it fast - a high insertion area)
SCORES = {"deletion": -1, "insertion": 1, "road": -1}
ORDERS = {"": "heatmap", "random_": "random", "centre_": "centre"}
MASK_SCORES = {"pointing_game": "pointing", "energy_in_mask": "energy", "topk_recall": "top-20"}
LABELS = {"deletion": "−deletion", "insertion": "insertion", "road": "−ROAD"}
STEPS = 8  # curve points minus one: 3 x 9 perturbed images per question and order


def first_image_samples(seed: int, images: int) -> set[str]:
    """The sample ids of the first ``images`` held-out shapes images (each image's samples do
    not depend on how many images follow it)."""
    from shapes.dataset import ShapesParams, iter_samples

    return {row["sample_id"] for row in iter_samples(ShapesParams(seed=seed, num_images=images))}


def run_faithfulness(variant, *, seed: int, images: int, scored: int, runs: Path, executor: str,
                     cache_dir: str | None, progress: bool) -> list[dict[str, Any]]:
    """Run ``variant`` with the faithfulness overlay on its first ``scored`` images; one row per
    question: the AUCs of the heatmap driving the captions (``deletion_auc``, ``random_road_auc``...)
    and its mask scores (``pointing_game``...). The variant's own nodes come from its cached run."""
    import pyarrow.parquet as pq

    from runtime.api import run_graph
    from runtime.graph import load_graph

    overrides = [f"dataset.seed={seed}", f"dataset.num_images={images}", f"faithfulness.steps={STEPS}"]
    graph = load_graph(variant.graph, overrides, overlays=[OVERLAY])
    heatmap = graph.nodes[variant.heatmap_node].inputs["heatmap"]
    node = next(n for n, nd in graph.nodes.items() if nd.stage.name == "heatmap_faithfulness"
                and nd.inputs["heatmap"] == heatmap)
    summary = run_graph(graph, ids=first_image_samples(seed, scored), executor=executor,
                        output=runs / graph.name, cache_dir=cache_dir, progress=progress,
                        arguments={"graph": str(variant.graph), "overrides": overrides, "overlay": [str(OVERLAY)],
                                   "quality": True})
    if summary.errors:
        print(f"warning: {graph.name}: {summary.errors} rows failed ({'; '.join(summary.error_examples[:2])})",
              file=sys.stderr)
    rows = [r for r in pq.read_table(summary.results).to_pylist() if r.get("status", "ok") == "ok"]
    return [{**{f"{o}{s}_auc": r[f"{node}.{o}{s}_auc"] for o in ORDERS for s in SCORES},
             **{m: r[f"{variant.heatmap_node}.{m}"] for m in MASK_SCORES}} for r in rows]


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _gain(row: dict[str, Any], score: str) -> float | None:
    """How much better than the random order on the same question the heatmap's order does
    (signed so higher is better)."""
    area, level = row[f"{score}_auc"], row[f"random_{score}_auc"]
    return None if area is None or level is None else SCORES[score] * (area - level)


def _rhos(rows: Sequence[dict[str, Any]], value=_gain) -> dict[str, dict[str, float | None]]:
    """``{score: {mask score: rho}}`` over ``rows`` of ``value(row, score)``."""
    return {s: {m: spearman([value(r, s) for r in rows], [r[m] for r in rows]) for m in MASK_SCORES}
            for s in SCORES}


def _level(row: dict[str, Any], score: str) -> float | None:
    """The random order's area: the question's evidence level, whatever the heatmap."""
    return row[f"random_{score}_auc"]


def faithfulness_table(rows_by_variant: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: questions, mean AUCs (heatmap, random and centre orders) and mean mask scores
    over the scored questions; agreement (Spearman's rho) of the gain over the random order per
    variant, pooled over the variants' questions, and over the variants' means; and the pooled
    agreement of the random order's own area (``level``)."""
    variants = {name: {"questions": len(rows), **{k: _mean(r[k] for r in rows) for k in rows[0]}} if rows
                else {"questions": 0} for name, rows in rows_by_variant.items()}
    agreement = {name: _rhos(rows) for name, rows in rows_by_variant.items()}
    pooled = [r for rows in rows_by_variant.values() for r in rows]
    agreement["pooled"] = _rhos(pooled)
    agreement["variants"] = _rhos([m for m in variants.values() if m["questions"]])
    agreement["level"] = _rhos(pooled, _level)
    return {"variants": variants, "agreement": agreement}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render_section(table: dict[str, Any], *, images: int) -> list[str]:
    """The Markdown lines of the faithfulness section."""
    variants, agreement = table["variants"], table["agreement"]
    questions = sum(m["questions"] for m in variants.values())
    lines = [
        "## Heatmap faithfulness without masks",
        "",
        f"Scores that need no masks, for the heatmap that drives the captions, on the first {images} held-out "
        f"image{'s' if images != 1 else ''} ({questions} questions over all variants): `runtime run GRAPH --overlay "
        f"graphs/overlays/faithfulness.yaml` ({STEPS} steps, the shapes BLIP ITM as the evidence). Area under "
        "the deletion, insertion and ROAD curves of the ITM match probability as the heatmap's highest cells go "
        "first, and the same for a random and a centre-prior order on the same questions (lower is better for "
        "deletion and ROAD, higher for insertion). The ITM is the model GradCAM differentiates, so GradCAM "
        "variants are favoured: compare a heatmap with its baselines and with the mask scores below.",
        "",
        "| variant | deletion | random | centre | insertion | random | centre | ROAD | random | centre |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in variants.items():
        lines.append(f"| `{name}` | " + " | ".join(_fmt(m.get(f"{o}{s}_auc")) for s in SCORES for o in ORDERS) + " |")
    lines += [
        "",
        "Agreement with the mask scores: Spearman's rank correlation (ties at their average rank) between each "
        "mask-free score's gain over the random order on the same question, signed so that higher is better "
        "(random − deletion, insertion − random, random − ROAD), and the pointing game / energy in mask / top-20 "
        "recall of the same heatmap, over the questions of each variant that refer to objects, over all variants' "
        "questions pooled, and over the variants' means. 1: the same order; 0: unrelated; –: fewer than 3 pairs, "
        "or a score that is constant there (a flat heatmap has no order). The gain, not the raw area: an area also "
        "carries how strongly the ITM matches the question at all, whatever the heatmap; the last row is that "
        "level alone (the random order's area, unsigned), which is what a raw area's agreement would mix in.",
        "",
        "| over | " + " | ".join(f"{LABELS[s]}: {' / '.join(MASK_SCORES.values())}" for s in SCORES) + " |",
        "|---|---|---|---|",
    ]
    scopes = [*((f"questions of `{n}`", n) for n in variants), ("all questions", "pooled"),
              (f"variant means ({sum(1 for m in variants.values() if m['questions'])})", "variants"),
              ("level only: the random order's area, all questions", "level")]
    for label, key in scopes:
        lines.append(f"| {label} | " + " | ".join(" / ".join(_fmt(agreement[key][s][m]) for m in MASK_SCORES)
                                                   for s in SCORES) + " |")
    return lines + _reading(agreement)


def _reading(agreement: dict[str, Any]) -> list[str]:
    """One sentence from the agreement table: the best pair over variant means and the strongest
    pooled per-question agreement, i.e. whether the scores rank variants and whether they judge
    single heatmaps."""
    def strongest(key: str, value=lambda rho: rho) -> tuple[float, str, str] | None:
        pairs = [(rho, s, m) for s in SCORES for m, rho in agreement[key][s].items() if rho is not None]
        return max(pairs, key=lambda p: value(p[0])) if pairs else None

    ranked, single = strongest("variants"), strongest("pooled", abs)
    if ranked is None or single is None:
        return []
    return ["", f"Read: over the variants' means, {LABELS[ranked[1]]} orders the variants as {MASK_SCORES[ranked[2]]} "
                f"does with rho {ranked[0]:.2f}; over single questions the strongest agreement is {single[0]:.2f} "
                f"({LABELS[single[1]]} with {MASK_SCORES[single[2]]}), so on data without masks these scores compare "
                + ("variants, not single heatmaps." if abs(single[0]) < 0.5 else "variants and single heatmaps.")]
