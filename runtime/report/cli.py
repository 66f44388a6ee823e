"""The ``report`` and ``compare`` subcommands: argument parsers and their entry points.

Kept free of heavy imports so that ``runtime --help`` stays fast: the work is imported when a
command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_LIMIT = 200      # same as runtime.report.build.DEFAULT_LIMIT
DEFAULT_PAGE_SIZE = 50


def add_report_parsers(sub) -> None:
    """Add ``report`` and ``compare`` to the ``runtime`` command's subparsers."""
    rp = sub.add_parser(
        "report", help="an HTML report of one or more runs (summary, samples, heatmaps, plots)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write one HTML report of the given run folders: a summary per run, a sortable and "
                    "filterable table of samples, each sample side by side across runs (heatmap overlays, "
                    "enhanced heatmap, SAM mask, peak points, sampled patches, captions, answers), each image "
                    "with all its questions, and plots. The pictures are drawn from results.parquet and the "
                    "dataset's images (nothing is re-run), cached in RUN/render/, and copied next to the HTML "
                    "file, so the report folder can be moved or zipped.")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with results.parquet and manifest.json)")
    rp.add_argument("--output", "-o", metavar="PATH",
                    help="report folder (index.html + assets/) or an .html file (pictures in <name>_files/); "
                         "default: FIRST_RUN/report/")
    rp.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                    help=f"samples that get pictures and captions: the first N, rounded up to whole images "
                         f"(default {DEFAULT_LIMIT}); the table always lists every sample")
    rp.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, metavar="N",
                    help=f"table rows per page (default {DEFAULT_PAGE_SIZE})")
    rp.add_argument("--format", choices=["png", "jpeg"], default="png",
                    help="picture format (default png; jpeg is about a tenth of the size on photos)")
    rp.add_argument("--max-side", type=int, default=384, metavar="PX",
                    help="pictures are at most this many pixels on the longer side (default 384)")
    rp.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of the report (headless Chromium)")
    rp.add_argument("--view", default="", metavar="VIEW",
                    help="page of the screenshot: summary, samples, sample, image, plots, or sample=ID / image=ID")
    cp = sub.add_parser("compare", help="metrics of runs side by side and the samples whose answers differ")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with results.parquet and manifest.json)")
    cp.add_argument("--show", type=int, default=20, metavar="N", help="disagreeing samples to list (default 20)")


def report_main(args) -> int:
    """``runtime report RUN... [--output PATH] [--limit N] [--page-size N] [--format png|jpeg] [--max-side PX]``;
    ``args`` needs only ``runs``, the rest defaults."""
    from runtime.report.build import build_report
    from runtime.report.render import RenderOptions

    def arg(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    runs = [Path(r) for r in args.runs]
    output = arg("output", runs[0] / "report")
    options = RenderOptions(format=arg("format", "png"), max_side=arg("max_side", 384))
    path = build_report(runs, Path(output), page_size=arg("page_size", DEFAULT_PAGE_SIZE),
                        limit=arg("limit", DEFAULT_LIMIT), options=options)
    print(f"report: {path}")
    if getattr(args, "screenshot", None):
        from runtime.report.screenshot import take_screenshot

        html = path if path.suffix == ".html" else path / "index.html"
        print(f"screenshot: {take_screenshot(html, Path(args.screenshot), getattr(args, 'view', ''))}")
    return 0


def compare_main(args) -> int:
    """``runtime compare RUN... [--show N]``."""
    from runtime.report.comparison import compare

    show = getattr(args, "show", None)
    print(compare([Path(r) for r in args.runs], limit=20 if show is None else show))
    return 0
