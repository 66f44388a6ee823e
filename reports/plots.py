"""Report plots (matplotlib, Agg backend): accuracy by question type and by answer type,
heatmap entropy, pointing game and energy in the mask, one series per run; the most frequent
answers of each run."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np

from reports.data import Run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def accuracy_by_type(runs: list[Run], column: str = "question_type"
                     ) -> tuple[list[str], list[list[float | None]], list[list[int]]]:
    """Types of ``column`` (by count over all runs) and, per run, mean accuracy and count per type."""
    counts: dict[str, int] = {}
    per_run: list[dict[str, list[float]]] = []
    for run in runs:
        acc = run.values(run.roles.accuracy)
        types = run.values(column)
        groups: dict[str, list[float]] = {}
        for t, a in zip(types, acc):
            if a is None:
                continue
            key = t if t is not None else "(none)"
            groups.setdefault(key, []).append(float(a))
            counts[key] = counts.get(key, 0) + 1
        per_run.append(groups)
    types = sorted(counts, key=lambda t: (-counts[t], t))
    means = [[(float(np.mean(g[t])) if t in g else None) for t in types] for g in per_run]
    ns = [[len(g.get(t, [])) for t in types] for g in per_run]
    return types, means, ns


def plot_accuracy_by_type(runs: list[Run], path: Path, column: str = "question_type",
                          title: str = "Accuracy by question type") -> bool:
    if not any(column in r.table.column_names for r in runs):
        return False
    types, means, ns = accuracy_by_type(runs, column)
    if not types:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(types) * max(1, len(runs)) / 2 + 2), 3.6), dpi=100)
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(types))
    for i, (run, m, color) in enumerate(zip(runs, means, _colors(len(runs)))):
        heights = [v if v is not None else 0.0 for v in m]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=run.label, color=color)
        for b, v, n in zip(bars, m, ns[i]):
            if v is not None:
                ax.annotate(f"{v:.2f}\nn={n}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, types, rotation=20 if len(types) > 6 else 0, ha="right" if len(types) > 6 else "center")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("VQA accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_entropy(runs: list[Run], path: Path) -> bool:
    series = []
    for run in runs:
        for label, ent in run.entropy().items():
            vals = ent[np.isfinite(ent)]
            if len(vals):
                series.append((f"{run.label}: {label}", vals))
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 3.6), dpi=100)
    lo = min(float(v.min()) for _, v in series)
    hi = max(float(v.max()) for _, v in series)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    bins = np.linspace(lo, hi, 31)
    styles = ["-", "--", ":", "-."]
    for k, ((label, vals), color) in enumerate(zip(series, _colors(len(series)))):
        ax.hist(vals, bins=bins, histtype="step", linewidth=1.8, label=f"{label} (mean {vals.mean():.3f})",
                color=color, linestyle=styles[k % len(styles)])
        ax.hist(vals, bins=bins, alpha=0.15, color=color)
    ax.set_xlabel("normalised entropy of the heatmap (0 = one cell, 1 = uniform)")
    ax.set_ylabel("samples")
    ax.set_title("Heatmap entropy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_pointing(runs: list[Run], path: Path) -> bool:
    panels = [("pointing", "Pointing game accuracy"), ("energy", "Energy in the mask")]
    panels = [(k, t) for k, t in panels if any(getattr(r.roles, k) for r in runs)]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), dpi=100, squeeze=False)
    for ax, (kind, title) in zip(axes[0], panels):
        labels = list(dict.fromkeys(lab for r in runs for lab in getattr(r.roles, kind)))
        width = 0.8 / max(1, len(labels))
        x = np.arange(len(runs))
        for j, (lab, color) in enumerate(zip(labels, _colors(len(labels)))):
            vals = [r.mean(getattr(r.roles, kind).get(lab)) for r in runs]
            bars = ax.bar(x - 0.4 + width * (j + 0.5), [v if v is not None else 0 for v in vals], width,
                          label=lab, color=color)
            for b, v in zip(bars, vals):
                text = "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
                ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=8)
        ax.set_xticks(x, [r.label for r in runs])
        ax.set_ylim(0, 1.1)
        ax.set_title(title)
        ax.legend(title="heatmap", fontsize=8, title_fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


TOP_ANSWERS = 15


def answer_counts(run: Run) -> list[tuple[str, int]]:
    """Every answer of ``run`` with its count, most frequent first (ties by answer); samples
    without an answer (errors) are left out."""
    counts: dict[str, int] = {}
    for a in run.values(run.roles.answer):
        if a is not None:
            counts[str(a)] = counts.get(str(a), 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _short(text: str, limit: int = 24) -> str:
    """A tick label that leaves the bars room: long free-text answers are cut."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def plot_answers(runs: list[Run], path: Path, top: int = TOP_ANSWERS) -> bool:
    """One panel per run: its ``top`` answers and their counts, so a run that collapsed onto a
    few answers shows at once."""
    counts = [answer_counts(run) for run in runs]
    if not any(counts):
        return False
    plt = _pyplot()
    rows = max(min(top, len(c)) for c in counts)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 1, 0.28 * rows + 1.6), dpi=100, squeeze=False)
    for ax, run, c, color in zip(axes[0], runs, counts, _colors(len(runs))):
        shown = c[:top]
        total = sum(n for _, n in c)
        y = np.arange(len(shown))
        ax.barh(y, [n for _, n in shown], color=color)
        ax.set_yticks(y, [_short(a) for a, _ in shown], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("samples")
        ax.set_title(f"{run.label}: {len(c)} distinct in {total}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Most frequent answers (top {top})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


PLOTS = (
    ("accuracy_by_type.png", "Accuracy by question type", plot_accuracy_by_type),
    ("accuracy_by_answer_type.png", "Accuracy by answer type",
     partial(plot_accuracy_by_type, column="answer_type", title="Accuracy by answer type")),
    ("heatmap_entropy.png", "Heatmap entropy per run", plot_entropy),
    ("pointing_game.png", "Pointing game and energy in the mask per run", plot_pointing),
    ("answers.png", "Answers per run", plot_answers),
)


def make_plots(runs: list[Run], folder: Path) -> list[tuple[str, str]]:
    """Write the plots that have data into ``folder``; ``[(file name, title)]``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, title, fn in PLOTS:
        if fn(runs, folder / name):
            out.append((name, title))
    return out
