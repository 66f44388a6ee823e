"""``build_report``: one HTML file comparing runs, with its pictures in a folder beside it.

Layout (``out`` a folder, the default)::

    OUT/index.html          the report: inline CSS and JS, the data as embedded JSON
    OUT/assets/r0/...jpg    pictures of run 0 (heatmap overlays, points, mask, patches, ...; JPEG
                            unless png was asked for), heatmaps again on the range shared across runs
    OUT/assets/plots/...png matplotlib plots

(``out`` ending in ``.html``: the pictures go to ``<stem>_files/`` beside it.) Every picture is
referenced by a relative path, nothing from the network, so the folder can be copied or
zipped anywhere and still opens. Pictures load as they come into view (``loading="lazy"``);
the table of samples is paginated in the browser from the embedded JSON, so a report of 10k+
samples opens quickly. Pictures and captions are included
for the first ``limit`` samples only (rounded up to whole images), and samples beyond it
show their text and metrics.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UsageError
from reports.comparison import accuracy_tables, disagreements, metric_rows, shared_samples
from reports.data import HEATMAP_LABELS, Run, SourceImages, unique_labels
from reports.plots import TOP_ANSWERS, answer_counts, make_plots
from reports.render import RenderOptions, render_run, writable_folder
from reports.template import render_html
from stages.evaluation import official_line
from stages.render import colorize, encode_image

DEFAULT_LIMIT = 200
DEFAULT_PAGE_SIZE = 50
MAX_CAPTIONS = 20          # captions per sample kept in the report
MARKER = ".pnpvqa-report"  # marks an assets folder this module owns (and may replace)


def report_paths(out: str | Path) -> tuple[Path, Path]:
    """``(html file, assets folder)`` for an output path (a folder, or a ``.html`` file)."""
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        return out, out.parent / f"{out.stem}_files"
    return out / "index.html", out / "assets"


def _prepare_assets(assets: Path) -> None:
    if assets.exists():
        if not (assets / MARKER).exists() and any(assets.iterdir()):
            raise UsageError(f"{assets} exists and was not written by 'runtime report'; choose another --output")
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    (assets / MARKER).write_text("written by runtime report; replaced on the next report to this place\n")


def _num(v: Any, digits: int = 4) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else round(f, digits)


def _answer_counts(answers: list[str] | None) -> list[list] | None:
    if answers is None:
        return None
    counts: dict[str, int] = {}
    for a in answers:
        counts[str(a)] = counts.get(str(a), 0) + 1
    return [[a, n] for a, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def heatmap_range(heatmap: Any) -> list[float] | None:
    """``[min, max]`` of a heatmap's finite cells: each overlay is drawn min-max scaled, so the
    picture alone hides whether a map spans 0..1 or 0..1e-4."""
    if heatmap is None:
        return None
    h = np.asarray(heatmap, dtype=np.float64)
    finite = h[np.isfinite(h)]
    if not finite.size:
        return None
    return [float(finite.min()), float(finite.max())]


def heatmap_ranges(run: Run, sample_ids: list[str]) -> dict[str, dict[str, list[float]]]:
    """``{sample id: {heatmap label: [min, max]}}`` of ``sample_ids``, labels as the views are named."""
    labels = run.roles.heatmaps
    rows = run.details(sample_ids, list(labels.values())) if labels and sample_ids else {}
    out: dict[str, dict[str, list[float]]] = {}
    for sid, row in rows.items():
        ranges = {label: heatmap_range(row.get(column)) for label, column in labels.items()}
        out[sid] = {label: r for label, r in ranges.items() if r is not None}
    return out


def shared_ranges(ranges: list[dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, list[float]]]:
    """``{sample id: {heatmap label: [lo, hi]}}``: the range spanning the runs' ranges of the same
    sample's heatmap of the same label, for those that two or more runs have (the others have
    only their own range to share)."""
    spans: dict[str, dict[str, list[list[float]]]] = {}
    for run_ranges in ranges:
        for sid, labels in run_ranges.items():
            for label, r in labels.items():
                spans.setdefault(sid, {}).setdefault(label, []).append(r)
    out: dict[str, dict[str, list[float]]] = {}
    for sid, labels in spans.items():
        joint = {label: [min(r[0] for r in rs), max(r[1] for r in rs)] for label, rs in labels.items() if len(rs) > 1}
        if joint:
            out[sid] = joint
    return out


def write_colorbar(path: Path, colormap: str) -> None:
    """A horizontal strip of the overlays' colormap, low (left) to high (right)."""
    strip = np.repeat(np.linspace(0.0, 1.0, 256, dtype=np.float32)[None, :], 12, axis=0)
    path.write_bytes(encode_image(colorize(strip, colormap), "png"))


def _detail_set(order: list[str], image_of: dict[str, str], limit: int) -> list[str]:
    """The first ``limit`` samples, plus the other questions of their images."""
    head = order[:max(0, limit)]
    images = {image_of[s] for s in head}
    return [s for s in order if image_of[s] in images]


def _official(report: dict) -> str:
    """'62.34 over 64 questions; yes/no 75.29, number 74.55, ...' (the official report's numbers)."""
    parts = [official_line(report)]
    for title, key in (("per answer type", "perAnswerType"), ("per question type", "perQuestionType")):
        table = report.get(key) or {}
        if table:
            parts.append(f"{title}: " + ", ".join(f"{t} {v:.2f}" for t, v in sorted(table.items())))
    return "; ".join(parts)


def _run_summary(run: Run, rows: list[tuple[str, list]], i: int, render_note: str | None) -> dict:
    m = run.manifest
    totals = m.get("totals") or {}
    nodes = [[name, n.get("stage"), n.get("rows"), n.get("computed_shards"), n.get("cached_shards"), n.get("errors"),
              _num(n.get("seconds"), 3), _num(n.get("peak_rss_mb"), 0)] for name, n in (m.get("nodes") or {}).items()]
    examples = []
    if run.errors():
        for sid, st, err in zip(run.sample_ids, run.values("status"), run.values("error")):
            if st == "error":
                examples.append(f"{sid}: {err}")
                if len(examples) >= 5:
                    break
    dataset = run.dataset
    answers = answer_counts(run)
    return {
        "label": run.label, "graph": run.graph_name, "description": run.description,
        "dir": str(run.dir.resolve()), "graph_file": m.get("graph_file"),
        "dataset": f"{dataset.get('source', '?')} {json.dumps(dataset.get('params') or {}, sort_keys=True)}",
        "samples": len(run), "errors": run.errors(), "error_examples": examples,
        "warnings": m.get("warnings") or [], "reruns": m.get("reruns") or [],
        "metrics": [[name, _num(vals[i])] for name, vals in rows],
        "manifest_means": [[k, _num(v)] for k, v in (totals.get("metrics") or {}).items()],
        "evaluation": [[f"{'VQA' if e.get('metric') == 'vqa' else 'GQA'} accuracy, official ({node})", _official(e)]
                       for node, e in (m.get("evaluation") or {}).items() if e.get("overall") is not None],
        "nodes": nodes, "seconds": _num(totals.get("seconds"), 2), "started": m.get("started"),
        "finished": m.get("finished"), "device": m.get("device"), "executor": m.get("executor"),
        "status": m.get("status"), "render_note": render_note,
        "has": {"enhanced": bool(run.roles.enhanced), "points": bool(run.roles.points),
                "mask": bool(run.roles.mask), "heatmap": bool(run.roles.heatmap)},
        "heatmaps": list(run.roles.heatmaps),
        "answers": [list(c) for c in answers[:TOP_ANSWERS]], "distinct_answers": len(answers),
    }


def build_report(run_dirs: list[str | Path], out: str | Path, page_size: int = DEFAULT_PAGE_SIZE,
                 limit: int = DEFAULT_LIMIT, options: RenderOptions = RenderOptions(),
                 title: str | None = None) -> Path:
    """Write a report of ``run_dirs`` to ``out`` (a folder, or an ``.html`` file) and return the
    HTML file's path. ``page_size``: table rows per page; ``limit``: samples (rounded up to whole
    images) that get pictures and captions; pictures are cached in each ``RUN/render/``."""
    if not run_dirs:
        raise UsageError("report: give at least one run folder")
    if page_size < 1:
        raise UsageError(f"page size must be at least 1, got {page_size}")
    if limit < 0:
        raise UsageError(f"--limit must be 0 or more samples, got {limit}")
    runs = [Run(d) for d in run_dirs]
    unique_labels(runs)
    html_path, assets = report_paths(out)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    _prepare_assets(assets)
    rel = assets.name  # pictures are referenced relative to the HTML file's folder

    # samples of all runs, in the first run's order, then new ones of later runs
    order: list[str] = []
    seen: set[str] = set()
    image_of: dict[str, str] = {}
    for run in runs:
        for sid, iid in zip(run.sample_ids, run.values("image_id")):
            if sid not in seen:
                seen.add(sid)
                order.append(sid)
                image_of[sid] = iid
    detail = _detail_set(order, image_of, limit)
    detail_set = set(detail)

    # pictures: drawn into RUN/render (cached there), copied next to the report
    sources: dict[str, SourceImages] = {}
    views: list[dict[str, dict[str, str]]] = []
    plain: dict[str, str] = {}
    notes: list[str | None] = []
    captions: list[dict[str, Any]] = []
    vshared: list[dict[str, dict[str, str]]] = []
    ranges = [heatmap_ranges(run, detail) for run in runs]
    shared_range = shared_ranges(ranges)
    for i, run in enumerate(runs):
        key = json.dumps(run.dataset, sort_keys=True)
        images = sources.setdefault(key, SourceImages(run.dataset, run.dir))
        folder = run.dir / "render"
        if not writable_folder(folder):
            folder = assets / f".render-r{i}"
        # a heatmap whose own range is the shared one is its own picture in both scalings
        redraw = {sid: {label: r for label, r in labels.items() if ranges[i].get(sid, {}).get(label) != r}
                  for sid, labels in shared_range.items()}
        rendered = render_run(run, detail, images, options, folder, redraw) if detail else None
        target = assets / f"r{i}"
        target.mkdir()
        run_views: dict[str, dict[str, str]] = {}
        run_shared: dict[str, dict[str, str]] = {}
        if rendered is not None:
            for kept, drawn in ((run_views, rendered.samples), (run_shared, rendered.shared)):
                for sid, files in drawn.items():
                    kept[sid] = {}
                    for view, name in files.items():
                        shutil.copyfile(rendered.folder / name, target / name)
                        kept[sid][view] = f"{rel}/r{i}/{name}"
            for iid, name in rendered.images.items():
                if iid not in plain:
                    shutil.copyfile(rendered.folder / name, target / name)
                    plain[iid] = f"{rel}/r{i}/{name}"
        views.append(run_views)
        vshared.append(run_shared)
        note = None
        if rendered is not None and rendered.problem:
            note = f"images of the dataset are not available: {rendered.problem}"
        elif rendered is not None and rendered.patches_rebuilt:
            note = ("sampled patches: the caption stage's first round of draws, rebuilt from "
                    f"{run.roles.caption_sampling['heatmap']} and its seed")
        notes.append(note)
        caps = run.details(detail, [run.roles.captions]) if run.roles.captions and detail else {}
        captions.append({sid: row.get(run.roles.captions) for sid, row in caps.items()})
        if folder.parent == assets:
            shutil.rmtree(folder, ignore_errors=True)

    plots = make_plots(runs, assets / "plots")
    write_colorbar(assets / "colorbar.png", options.colormap)

    rows = metric_rows(runs)
    shared, diff = disagreements(runs)
    differ = {d.sample_id for d in diff}

    # one record per sample, one entry per run
    per_run = []
    for run in runs:
        r = run.roles
        ent = run.entropy()
        cols = {
            "a": run.values(r.answer), "acc": run.values(r.accuracy), "itm": run.values(r.itm),
            "st": run.values("status"), "err": run.values("error"), "es": run.values(r.status_enhance),
        }
        pg = {lab: run.values(c) for lab, c in r.pointing.items()}
        em = {lab: run.values(c) for lab, c in r.energy.items()}
        per_run.append((cols, pg, em, ent))
    questions = [dict(zip(run.sample_ids, run.values("question"))) for run in runs]
    qtypes = [dict(zip(run.sample_ids, run.values("question_type"))) for run in runs]
    answers = [dict(zip(run.sample_ids, run.values("answers"))) for run in runs]

    samples = []
    for sid in order:
        first = next(j for j, run in enumerate(runs) if sid in run.index)
        entries = []
        for j, run in enumerate(runs):
            k = run.index.get(sid)
            if k is None:
                entries.append(None)
                continue
            cols, pg, em, ent = per_run[j]
            acc = _num(cols["acc"][k])
            e = {"a": cols["a"][k], "acc": acc, "ok": None if acc is None else int(acc > 0),
                 "itm": _num(cols["itm"][k]), "st": cols["st"][k]}
            if cols["err"][k]:
                e["err"] = cols["err"][k]
            if cols["es"][k]:
                e["es"] = cols["es"][k]
            if pg:
                e["pg"] = {lab: _num(v[k]) for lab, v in pg.items()}
            if em:
                e["em"] = {lab: _num(v[k]) for lab, v in em.items()}
            if ent:
                e["en"] = {lab: _num(v[k]) for lab, v in ent.items()}
            if sid in detail_set:
                caps = captions[j].get(sid)
                if caps is not None:
                    e["caps"] = list(caps)[:MAX_CAPTIONS]
                    e["ncaps"] = len(caps)
                if sid in views[j]:
                    e["v"] = views[j][sid]
                if ranges[j].get(sid):
                    e["hr"] = ranges[j][sid]
                if sid in vshared[j]:
                    e["vs"] = vshared[j][sid]
            entries.append(e)
        samples.append({
            "id": sid, "im": image_of[sid], "q": questions[first].get(sid), "qt": qtypes[first].get(sid),
            "gt": _answer_counts(answers[first].get(sid)), "d": int(sid in detail_set),
            "img": plain.get(image_of[sid]) if sid in detail_set else None,
            "x": int(sid in differ), "r": entries,
            **({"hs": shared_range[sid]} if sid in detail_set and sid in shared_range else {}),
        })

    data = {
        "title": title or "PNP-VQA report: " + " vs ".join(r.label for r in runs),
        "generated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "limit": limit, "page_size": page_size, "detail_samples": len(detail),
        "runs": [_run_summary(run, rows, i, notes[i]) for i, run in enumerate(runs)],
        "metrics": [[name, [_num(v) for v in vals]] for name, vals in rows],
        "shared": shared, "differ": len(diff),
        "accuracy_tables": [vars(t) for t in accuracy_tables(runs, shared_samples(runs))],
        "plots": [{"src": f"{rel}/plots/{name}", "title": t} for name, t in plots],
        "colorbar": {"src": f"{rel}/colorbar.png", "colormap": options.colormap,
                     "opacity": [options.min_alpha, options.alpha]},
        "views": {"heatmap": "heatmap", "enhanced": "enhanced heatmap",
                  **{label: f"{label} heatmap" for run in runs for label in run.roles.heatmaps
                     if label not in HEATMAP_LABELS.values()},
                  "points": "peak points", "mask": "SAM mask", "patches": "sampled patches",
                  "attention": "attention per layer"},
        "samples": samples,
    }
    html_path.write_text(render_html(data), encoding="utf-8")
    return html_path

