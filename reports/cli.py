"""``runtime report`` and ``runtime compare``: their argument parsers and entry points
(``main(argv)``, named in ``runtime.commands``).

Kept free of heavy imports so that ``--help`` stays fast: the work is imported when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_LIMIT = 200      # same as reports.build.DEFAULT_LIMIT
DEFAULT_PAGE_SIZE = 50


def report_parser() -> argparse.ArgumentParser:
    rp = argparse.ArgumentParser(
        prog="runtime report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write one HTML report of the given run folders: a summary per run, a sortable and "
                    "filterable table of samples, each sample side by side across runs (heatmap overlays, "
                    "enhanced heatmap, SAM mask, peak points, sampled patches, captions, answers), each image "
                    "with all its questions, and plots. Each heatmap has a colour bar stating its range; a toggle "
                    "draws a sample's heatmaps on their own ranges or on one range shared across the runs. The "
                    "pictures are drawn from results.parquet and the dataset's images (nothing is re-run), cached "
                    "in RUN/render/, copied next to the HTML file (so the report folder can be moved or zipped) "
                    "and loaded as they scroll into view.")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with results.parquet and manifest.json)")
    rp.add_argument("--output", "-o", metavar="PATH",
                    help="report folder (index.html + assets/) or an .html file (pictures in <name>_files/); "
                         "default: FIRST_RUN/report/")
    rp.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                    help=f"samples that get pictures and captions: the first N, rounded up to whole images "
                         f"(default {DEFAULT_LIMIT}); the table always lists every sample")
    rp.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, metavar="N",
                    help=f"table rows per page (default {DEFAULT_PAGE_SIZE})")
    rp.add_argument("--format", choices=["jpeg", "png"], default="jpeg",
                    help="picture format (default jpeg, about a tenth of PNG's size on photos; png keeps "
                         "the pictures lossless)")
    rp.add_argument("--max-side", type=int, default=384, metavar="PX",
                    help="pictures are at most this many pixels on the longer side (default 384)")
    rp.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of the report (headless Chromium)")
    rp.add_argument("--view", default="", metavar="VIEW",
                    help="page of the screenshot: summary, samples, sample, image, plots, or sample=ID / image=ID")
    return rp


def compare_parser() -> argparse.ArgumentParser:
    cp = argparse.ArgumentParser(
        prog="runtime compare",
        description="Compare finished runs in the terminal, over the samples present in every run (how many "
                    "of each run's are left out is said first): metrics side by side (samples, errors, VQA "
                    "accuracy, heatmap metrics, ITM score, heatmap entropy), then the samples whose answers "
                    "differ, each with its question, its ground-truth answers, each run's answer marked right "
                    "(✓), partly right (~) or wrong (✗), and the run(s) that were right. Right or wrong comes "
                    "from a run's per-question accuracy column when it kept one, else from a normalised exact "
                    "match against the ground-truth answers; the output says which. Also, per answer type and "
                    "question type, each run's accuracy side by side, and for each run after the first its "
                    "accuracy difference to the first over the questions both answered, with a 95% interval "
                    "from a bootstrap that resamples images and a sign-flip permutation test's p-value. Columns are found by the "
                    "roles the manifest records (answer, accuracy) and the source's answers column.")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with results.parquet and manifest.json)")
    cp.add_argument("--show", type=int, default=20, metavar="N", help="disagreeing samples to list (default 20)")
    cp.add_argument("--resamples", type=int, default=10000, metavar="N",
                    help="bootstrap resamples (and random sign flips) for each accuracy difference (default 10000)")
    cp.add_argument("--seed", type=int, default=0, metavar="S",
                    help="seed of the resampling, so that intervals and p-values are reproducible (default 0)")
    return cp


def report_main(argv: list[str]) -> int:
    """``runtime report RUN... [--output PATH] [--limit N] [--page-size N] [--format png|jpeg] [--max-side PX]``."""
    from reports.build import build_report
    from reports.render import RenderOptions

    a = report_parser().parse_args(argv)
    runs = [Path(r) for r in a.runs]
    path = build_report(runs, Path(a.output or runs[0] / "report"), page_size=a.page_size, limit=a.limit,
                        options=RenderOptions(format=a.format, max_side=a.max_side))
    print(f"report: {path}")
    if a.screenshot:
        from reports.screenshot import take_screenshot

        html = path if path.suffix == ".html" else path / "index.html"
        print(f"screenshot: {take_screenshot(html, Path(a.screenshot), a.view)}")
    return 0


def compare_main(argv: list[str]) -> int:
    """``runtime compare RUN... [--show N] [--resamples N] [--seed S]``."""
    from reports.comparison import compare
    from runtime.errors import UsageError

    a = compare_parser().parse_args(argv)
    if a.resamples < 1:
        raise UsageError(f"--resamples must be at least 1, got {a.resamples}")
    print(compare([Path(r) for r in a.runs], limit=a.show, resamples=a.resamples, seed=a.seed))
    return 0
