"""``compare``: a terminal table of metrics per run over the samples every run has, and the
samples whose answers differ, with their ground truth and which run was right."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from reports.data import Run, column_mean, error_count, unique_labels
from reports.paired import EXACT_UP_TO, Difference, paired_difference
from runtime.errors import UsageError

MAX_DISAGREEMENTS = 20
TRUTH = "answers"  # the sources' ground-truth answers, kept under the source column's name
MARKS = {None: " ", "right": "✓", "partly": "~", "wrong": "✗"}
RESAMPLES = 10000
TYPE_COLUMNS = (("answer type", "answer_type"), ("question type", "question_type"))  # source columns


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


def shared_samples(runs: list[Run]) -> list[str]:
    """The sample ids present in every run, in the first run's order."""
    return [s for s in runs[0].sample_ids if all(s in r.index for r in runs[1:])]


class Rows:
    """The rows of one run that hold the given samples: its metrics over those samples only."""

    def __init__(self, run: Run, sample_ids: list[str] | None = None):
        self.run = run
        self.rows = np.arange(len(run)) if sample_ids is None else np.array([run.index[s] for s in sample_ids], int)
        self.table = run.table.take(pa.array(self.rows, pa.int64()))

    def mean(self, column: str | None) -> float | None:
        return column_mean(self.table, column)

    def errors(self) -> int:
        return error_count(self.table)

    def mean_entropy(self, label: str) -> float | None:
        ent = self.run.entropy().get(label)
        ent = None if ent is None else ent[self.rows]
        return float(np.nanmean(ent)) if ent is not None and np.isfinite(ent).any() else None


def metric_rows(runs: list[Run], shared: list[str] | None = None) -> list[tuple[str, list]]:
    """``[(metric, value per run)]`` in a fixed order, over the ``shared`` samples (default: each
    run's all); heatmap metrics once per heatmap label."""
    sub = [Rows(r, shared) for r in runs]
    rows: list[tuple[str, list]] = [
        ("samples", [len(s.rows) for s in sub]),
        ("errors", [s.errors() for s in sub]),
        ("VQA accuracy", [s.mean(s.run.roles.accuracy) for s in sub]),
    ]
    if any(official_overall(r) is not None for r in runs):
        whole = shared is not None and any(len(r) != len(shared) for r in runs)
        rows.append((f"accuracy, official report (%{', whole run' if whole else ''})", [official_overall(r) for r in runs]))
    for kind, title in (("pointing", "pointing game"), ("energy", "energy in mask")):
        for label in dict.fromkeys(lab for r in runs for lab in getattr(r.roles, kind)):
            rows.append((f"{title} ({label})", [s.mean(getattr(s.run.roles, kind).get(label)) for s in sub]))
    if any(r.roles.itm for r in runs):
        rows.append(("ITM score", [s.mean(s.run.roles.itm) for s in sub]))
    for label in dict.fromkeys(lab for r in runs for lab in r.roles.heatmaps):
        rows.append((f"heatmap entropy ({label})", [s.mean_entropy(label) for s in sub]))
    return rows


# -- which run was right ---------------------------------------------------------------------------

def exact_match(answer: str | None, truth: list[str] | None) -> float | None:
    """1.0 when ``answer`` is one of the ground-truth answers once both are normalised as the
    official evaluations do (punctuation, case, number words, articles), else 0.0; None
    without ground truth."""
    if not truth:
        return None
    from stages.evaluation import process_digit_article, process_punctuation

    norm = lambda text: process_digit_article(process_punctuation(str(text)))  # noqa: E731
    return float(answer is not None and norm(answer) in {norm(t) for t in truth})


def scores(run: Run) -> dict[str, float | None]:
    """How right each of the run's answers is, per sample (None: unknown): its per-question
    accuracy (its column of role accuracy) when it kept one, else the normalised exact match of
    its answers against the ground truth."""
    if run.roles.accuracy:
        return dict(zip(run.sample_ids, run.values(run.roles.accuracy)))
    if TRUTH in run.table.column_names:
        return {s: exact_match(a, t) for s, a, t in zip(run.sample_ids, run.values(run.roles.answer), run.values(TRUTH))}
    return {}


def scoring_basis(run: Run) -> str:
    """What ``scores`` scores the run's answers by, in words."""
    if run.roles.accuracy:
        return f"its per-question accuracy ({run.roles.accuracy})"
    if TRUTH in run.table.column_names:
        return "exact match against the ground-truth answers, after normalisation"
    return "nothing (it kept neither an accuracy column nor the ground-truth answers)"


def mark(score: float | None) -> str:
    if score is None:
        return MARKS[None]
    return MARKS["right" if score >= 1 else "partly" if score > 0 else "wrong"]


def best(per_run: list[float | None]) -> list[int] | None:
    """The runs whose answer scores highest (above 0); [] when none scores; None when unknown."""
    if any(s is None for s in per_run):
        return None
    top = max(per_run)
    return [i for i, s in enumerate(per_run) if s == top and top > 0]


def ground_truth(answers: list[str] | None) -> str | None:
    """The ground-truth answers, most given first, with their counts when there are several."""
    if not answers:
        return None
    counts = Counter(answers).most_common()
    return counts[0][0] if len(counts) == 1 and len(answers) == 1 else \
        ", ".join(f"{a} ({n})" if n > 1 else a for a, n in counts)


@dataclass(frozen=True)
class Disagreement:
    sample_id: str
    question: str | None
    truth: str | None            # ground_truth() of the sample
    answers: list[str | None]    # per run
    scores: list[float | None]   # per run, by scores()
    right: list[int] | None      # best()


def disagreements(runs: list[Run], shared: list[str] | None = None) -> tuple[int, list[Disagreement]]:
    """Samples present in every run (``shared``, worked out when not given) whose answers
    (stripped, lower-cased) are not all equal: ``(shared samples, [Disagreement])`` in the first
    run's order."""
    if len(runs) < 2:
        return 0, []
    shared = shared_samples(runs) if shared is None else shared
    answers = [dict(zip(r.sample_ids, r.values(r.roles.answer))) for r in runs]
    questions = dict(zip(runs[0].sample_ids, runs[0].values("question")))
    truths = {}
    for r in reversed(runs):  # the first run's ground truth, else another's
        truths.update({s: t for s, t in zip(r.sample_ids, r.values(TRUTH)) if t})
    scored = [scores(r) for r in runs]
    out = []
    for sid in shared:
        per_run = [a[sid] for a in answers]
        if len({None if x is None else " ".join(str(x).lower().split()) for x in per_run}) > 1:
            # a row without an answer (it failed) is wrong, whatever its accuracy column says
            per_run_scores = [0.0 if a is None else s.get(sid) for a, s in zip(per_run, scored)]
            out.append(Disagreement(sid, questions.get(sid), ground_truth(truths.get(sid)), per_run, per_run_scores,
                                    best(per_run_scores)))
    return len(shared), out


# -- accuracy per answer type and question type -----------------------------------------------------

def source_values(runs: list[Run], column: str, shared: list[str]) -> list:
    """A source column's value per shared sample: the first run's, else another's."""
    known: dict[str, object] = {}
    for r in reversed(runs):
        known.update({s: v for s, v in zip(r.sample_ids, r.values(column)) if v is not None})
    return [known.get(s) for s in shared]


def answered_scores(run: Run, shared: list[str]) -> list[float | None]:
    """The run's score per shared sample (by ``scores``); None where its row failed or
    cannot be scored (no ground truth), so that such questions are left out, not counted wrong."""
    scored = scores(run)
    failed = {s for s, st, a in zip(run.sample_ids, run.values("status"), run.values(run.roles.answer))
              if st == "error" or a is None}
    return [None if s in failed else scored.get(s) for s in shared]


def type_groups(runs: list[Run], shared: list[str]) -> list[tuple[str, np.ndarray]]:
    """``[(row name, mask over shared)]``: overall, then each answer type and question type."""
    groups = [("overall", np.ones(len(shared), bool))]
    for title, column in TYPE_COLUMNS:
        types = np.array(source_values(runs, column, shared), object)
        for t in sorted({t for t in types if t is not None}):
            groups.append((f"{title}: {t}", types == t))
    return groups


@dataclass(frozen=True)
class TypeRow:
    """One row of the side-by-side accuracy table, over the questions every run answered."""
    name: str
    questions: int
    accuracy: list[float]    # per run, in points
    differ: int              # questions whose answers differ
    right: list[int]         # per run: of those, how often it was (among) the best
    none_right: int          # of those, how often no run scored


def type_rows(runs: list[Run], shared: list[str]) -> list[TypeRow]:
    """Each run's accuracy side by side per answer type and question type, with how many
    answers differ and who was right, over the questions every run answered."""
    per_run = np.array([[np.nan if x is None else x for x in answered_scores(r, shared)] for r in runs], float)
    answered = ~np.isnan(per_run).any(axis=0)
    right = {d.sample_id: d.right for d in disagreements(runs, shared)[1]}
    rows = []
    for name, mask in type_groups(runs, shared):
        keep = mask & answered
        if not keep.any():
            continue
        winners = [right[s] for s, k in zip(shared, keep) if k and s in right]
        rows.append(TypeRow(name, int(keep.sum()), [float(100 * a) for a in per_run[:, keep].mean(axis=1)],
                            len(winners), [sum(i in w for w in winners) for i in range(len(runs))],
                            sum(not w for w in winners)))
    return rows


@dataclass(frozen=True)
class PairedRow:
    """One row of a pair's accuracy difference: both runs' accuracy (points) and the difference."""
    name: str
    first: float
    other: float
    difference: Difference   # other - first, in fractions


def paired_rows(runs: list[Run], shared: list[str], other: int, resamples: int = RESAMPLES,
                seed: int = 0) -> list[PairedRow]:
    """``runs[other]`` against ``runs[0]`` per type group, over the questions both answered; the
    questions of one image are resampled together (``paired_difference``)."""
    first, second = (np.array([np.nan if x is None else x for x in answered_scores(runs[k], shared)], float)
                     for k in (0, other))
    images = np.array([i if i is not None else s for s, i in zip(shared, source_values(runs, "image_id", shared))],
                      object)  # without an image id each question is its own image
    both = ~np.isnan(first) & ~np.isnan(second)
    rows = []
    for name, mask in type_groups(runs, shared):
        keep = mask & both
        if keep.any():
            d = paired_difference(first[keep], second[keep], images[keep], resamples=resamples, seed=seed)
            rows.append(PairedRow(name, float(100 * first[keep].mean()), float(100 * second[keep].mean()), d))
    return rows


# -- the text --------------------------------------------------------------------------------------

def compare(run_dirs: list[str | Path] | list[Run], limit: int = MAX_DISAGREEMENTS, resamples: int = RESAMPLES,
            seed: int = 0) -> str:
    """A plain-text comparison of runs over the samples they share: metrics per run (rows =
    metrics, columns = runs); accuracy per answer and question type side by side; for each run
    after the first, its accuracy difference to the first with a 95% interval and p-value
    (``resamples`` draws, ``seed``); then the first ``limit`` samples where the runs' answers
    disagree, with the ground truth, each run's answer marked right or wrong, and the run(s)
    that were right."""
    runs = [r if isinstance(r, Run) else Run(r) for r in run_dirs]
    unique_labels(runs)
    shared = shared_samples(runs)
    if not shared and len(runs) > 1:
        raise UsageError("the runs share no sample: "
                         + ", ".join(f"{r.label} has {len(r)} ({r.sample_ids[0] if len(r) else 'none'}, ...)"
                                     for r in runs) + "; compare runs of the same dataset")
    lines = ["runs:"]
    for i, r in enumerate(runs):
        lines.append(f"  [{i}] {r.label}: {r.dir}  (graph {r.graph_name}, {len(r)} samples)")
    lines += ["", *coverage_lines(runs, shared), ""]
    lines += metrics_table(runs, shared)
    lines.append("")
    if len(runs) < 2:
        lines.append("one run: no answers to compare")
        return "\n".join(lines)
    for table in accuracy_tables(runs, shared, resamples, seed):
        lines += [*text_table(table), ""]
    lines += disagreement_table(runs, shared, limit)
    return "\n".join(lines)


def coverage_lines(runs: list[Run], shared: list[str]) -> list[str]:
    """Which samples are compared, and how many of each run's are left out."""
    if len(runs) < 2:
        return [f"compared on its {len(shared)} samples"]
    left = [f"[{i}] {r.label} {len(r) - len(shared)} of {len(r)}" for i, r in enumerate(runs) if len(r) > len(shared)]
    return [f"compared on the {len(shared)} samples present in every run; "
            + (f"left out (not in every run): {', '.join(left)}" if left else "none left out")]


def metrics_table(runs: list[Run], shared: list[str]) -> list[str]:
    rows = metric_rows(runs, shared)
    width = max(14, *(len(r.label) for r in runs))
    first = max(len(name) for name, _ in rows) + 2
    head = f"{'metric':<{first}}" + "".join(f"{r.label:>{width + 2}}" for r in runs)
    lines = [head, "-" * len(head)]
    for name, vals in rows:
        lines.append(f"{name:<{first}}" + "".join(f"{_fmt(v):>{width + 2}}" for v in vals))
    return lines


@dataclass(frozen=True)
class Table:
    """A table of formatted cells, shared by the terminal text and the HTML report."""
    title: str
    notes: list[str]
    head: list[str]
    rows: list[list[str]]
    align: str               # per column: "l" left or "r" right


def text_table(table: Table) -> list[str]:
    """The table as aligned lines of text, under its title and notes."""
    widths = [max(len(c) for c in column) for column in zip(table.head, *table.rows)]
    line = lambda cells: "  ".join(c.ljust(w) if a == "l" else c.rjust(w)  # noqa: E731
                                   for c, w, a in zip(cells, widths, table.align)).rstrip()
    if not table.rows:
        return [table.title + ": none (no such question has ground truth)"]
    head = line(table.head)
    return [table.title, *(f"  {n}" for n in table.notes), head, "-" * len(head), *map(line, table.rows)]


def type_table(runs: list[Run], shared: list[str]) -> Table:
    """Each run's accuracy per answer and question type, and who was right where answers differ."""
    rows = type_rows(runs, shared)
    runs_ = range(len(runs))
    return Table(
        f"accuracy (points) by answer type and question type, over the {rows[0].questions if rows else 0} "
        "questions every run answered",
        ["failed rows and rows without ground truth left out; differ: the answers differ; right: the run(s) "
         "whose answer scores highest there"],
        ["questions of", "n", *(f"[{i}] acc" for i in runs_), "differ", *(f"[{i}] right" for i in runs_), "none"],
        [[r.name, str(r.questions), *(f"{a:.2f}" for a in r.accuracy), str(r.differ), *map(str, r.right),
          str(r.none_right)] for r in rows],
        "l" + "r" * (2 * len(runs) + 3))


def difference_table(runs: list[Run], shared: list[str], other: int, resamples: int, seed: int) -> Table:
    """``runs[other]`` minus the first run in accuracy points, per type, with interval and p-value."""
    rows = paired_rows(runs, shared, other, resamples, seed)
    return Table(
        f"[{other}] {runs[other].label} - [0] {runs[0].label}: accuracy difference in points over the "
        f"{rows[0].difference.n_questions if rows else 0} questions both answered",
        ["failed rows and rows without ground truth left out",
         f"95% interval: percentile, bootstrap resampling images ({resamples} resamples, seed {seed}); p: two-sided "
         f"sign-flip permutation test over images (every flip up to {EXACT_UP_TO} images, else {resamples} drawn)"],
        ["questions of", "n", "images", "[0] acc", f"[{other}] acc", "diff", "95% interval", "p", "p by"],
        [[r.name, str(r.difference.n_questions), str(r.difference.n_images), f"{r.first:.2f}", f"{r.other:.2f}",
          f"{100 * r.difference.mean:+.2f}", f"[{100 * r.difference.low:+.2f}, {100 * r.difference.high:+.2f}]",
          f"{r.difference.p_value:.4f}", r.difference.p_method] for r in rows],
        "lrrrrrlrl")


def accuracy_tables(runs: list[Run], shared: list[str], resamples: int = RESAMPLES, seed: int = 0) -> list[Table]:
    """The accuracy per type side by side, then each later run's difference to the first."""
    if len(runs) < 2:
        return []
    return [type_table(runs, shared), *(difference_table(runs, shared, k, resamples, seed) for k in range(1, len(runs)))]


def disagreement_table(runs: list[Run], shared: list[str], limit: int) -> list[str]:
    """The samples whose answers differ: ground truth, each run's answer marked, who was right."""
    count, diff = disagreements(runs, shared)
    lines = [f"answers differ on {len(diff)} of {count} samples present in every run"
             + (f" (first {min(limit, len(diff))}):" if diff else "")]
    if not diff:
        return lines
    lines.append(f"  {MARKS['right']} right, {MARKS['partly']} partly right, {MARKS['wrong']} wrong; scored by")
    lines += [f"    [{i}] {r.label}: {scoring_basis(r)}" for i, r in enumerate(runs)]
    lines.append("  right: the run(s) whose answer scores highest; " + right_counts(runs, diff))
    col = max(16, min(30, max(len(r.label) for r in runs)))
    idw = min(28, max(len("sample"), *(len(d.sample_id) for d in diff[:limit])))
    head = (f"{'sample':<{idw}}  {'question':<36}  {'ground truth':<24}"
            + "".join(f"  {_cut(f'[{i}] {r.label}', col + 2):<{col + 2}}" for i, r in enumerate(runs)) + "  right")
    lines += [head, "-" * len(head)]
    for d in diff[:limit]:
        lines.append(f"{_cut(d.sample_id, idw):<{idw}}  {_cut(d.question, 36):<36}  {_cut(d.truth, 24):<24}"
                     + "".join(f"  {mark(s)} {_cut(a, col):<{col}}" for a, s in zip(d.answers, d.scores))
                     + f"  {right_cell(d.right, len(runs))}")
    return lines


def right_cell(right: list[int] | None, runs: int) -> str:
    if right is None:
        return "?"
    if not right:
        return "none"
    if len(right) == runs:
        return "both" if runs == 2 else "all"
    return " ".join(f"[{i}]" for i in right)


def right_counts(runs: list[Run], diff: list[Disagreement]) -> str:
    """How often each run was right over all the differing samples."""
    known = [d.right for d in diff if d.right is not None]
    parts = [f"[{i}] {sum(1 for r in known if i in r)}" for i in range(len(runs))]
    parts.append(f"none {sum(1 for r in known if not r)}")
    unknown = len(diff) - len(known)
    return f"over the {len(diff)}: " + ", ".join(parts) + (f", unknown {unknown}" if unknown else "")
