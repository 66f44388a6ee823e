"""Reports of finished runs: ``build_report`` (one HTML file with its pictures beside it),
``compare`` (a terminal table), and the ``runtime report`` / ``runtime compare`` entry points.

Imports are lazy so that importing this package (for the CLI parsers) costs nothing.
"""

from __future__ import annotations

from typing import Any

from runtime.report.cli import add_report_parsers, compare_main, report_main

__all__ = ["add_report_parsers", "build_report", "compare", "compare_main", "render_run", "report_main"]


def __getattr__(name: str) -> Any:
    if name == "build_report":
        from runtime.report.build import build_report

        return build_report
    if name == "compare":
        from runtime.report.comparison import compare

        return compare
    if name == "render_run":
        from runtime.report.render import render_run

        return render_run
    raise AttributeError(name)
