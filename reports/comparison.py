"""``compare``: a terminal table of metrics per run and the samples whose answers differ."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from reports.data import Run, unique_labels

MAX_DISAGREEMENTS = 20


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.4f}"


def _cut(text: str | None, width: int) -> str:
    text = "-" if text is None else " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def official_overall(run: Run) -> float | None:
    """The overall accuracy of the run's first evaluation node, as the official code reports it."""
    for report in (run.manifest.get("evaluation") or {}).values():
        if report.get("overall") is not None:
            return report["overall"]
    return None


def metric_rows(runs: list[Run]) -> list[tuple[str, list]]:
    """``[(metric, value per run)]`` in a fixed order; heatmap metrics once per heatmap label."""
    rows: list[tuple[str, list]] = [
        ("samples", [len(r) for r in runs]),
        ("errors", [r.errors() for r in runs]),
        ("VQA accuracy", [r.mean(r.roles.accuracy) for r in runs]),
    ]
    if any(official_overall(r) is not None for r in runs):
        rows.append(("accuracy, official report (%)", [official_overall(r) for r in runs]))
    for kind, title in (("pointing", "pointing game"), ("energy", "energy in mask")):
        for label in dict.fromkeys(lab for r in runs for lab in getattr(r.roles, kind)):
            rows.append((f"{title} ({label})", [r.mean(getattr(r.roles, kind).get(label)) for r in runs]))
    if any(r.roles.itm for r in runs):
        rows.append(("ITM score", [r.mean(r.roles.itm) for r in runs]))
    for label in dict.fromkeys(lab for r in runs for lab in r.roles.heatmaps):
        vals = []
        for r in runs:
            ent = r.entropy().get(label)
            vals.append(float(np.nanmean(ent)) if ent is not None and np.isfinite(ent).any() else None)
        rows.append((f"heatmap entropy ({label})", vals))
    return rows


def disagreements(runs: list[Run]) -> tuple[int, list[tuple[str, str, list[str | None]]]]:
    """Samples present in every run whose answers (stripped, lower-cased) are not all equal:
    ``(shared samples, [(sample id, question, answer per run)])`` in the first run's order."""
    if len(runs) < 2:
        return 0, []
    answers = [dict(zip(r.sample_ids, r.values(r.roles.answer))) for r in runs]
    questions = dict(zip(runs[0].sample_ids, runs[0].values("question")))
    shared = [s for s in runs[0].sample_ids if all(s in a for a in answers)]
    out = []
    for sid in shared:
        per_run = [a[sid] for a in answers]
        norm = {None if x is None else " ".join(str(x).lower().split()) for x in per_run}
        if len(norm) > 1:
            out.append((sid, questions.get(sid), per_run))
    return len(shared), out


def compare(run_dirs: list[str | Path] | list[Run], limit: int = MAX_DISAGREEMENTS) -> str:
    """A plain-text comparison of runs: metrics per run (rows = metrics, columns = runs), then
    the first ``limit`` samples where the runs' answers disagree, with each run's answer."""
    runs = [r if isinstance(r, Run) else Run(r) for r in run_dirs]
    unique_labels(runs)
    lines = ["runs:"]
    for i, r in enumerate(runs):
        lines.append(f"  [{i}] {r.label}: {r.dir}  (graph {r.graph_name}, {len(r)} samples)")
    lines.append("")
    rows = metric_rows(runs)
    width = max(14, *(len(r.label) for r in runs))
    first = max(len(name) for name, _ in rows) + 2
    head = f"{'metric':<{first}}" + "".join(f"{r.label:>{width + 2}}" for r in runs)
    lines += [head, "-" * len(head)]
    for name, vals in rows:
        lines.append(f"{name:<{first}}" + "".join(f"{_fmt(v):>{width + 2}}" for v in vals))
    lines.append("")
    if len(runs) < 2:
        lines.append("one run: no answers to compare")
        return "\n".join(lines)
    shared, diff = disagreements(runs)
    lines.append(f"answers differ on {len(diff)} of {shared} samples present in every run"
                 + (f" (first {min(limit, len(diff))}):" if diff else ""))
    if diff:
        col = max(16, min(30, max(len(r.label) for r in runs)))
        idw = min(28, max(len(s) for s, _, _ in diff[:limit]))
        head = f"{'sample':<{idw}}  {'question':<36}" + "".join(f"  {_cut(r.label, col):<{col}}" for r in runs)
        lines += [head, "-" * len(head)]
        for sid, q, answers in diff[:limit]:
            lines.append(f"{_cut(sid, idw):<{idw}}  {_cut(q, 36):<36}"
                         + "".join(f"  {_cut(a, col):<{col}}" for a in answers))
    return "\n".join(lines)
