"""Reports built on finished run folders, on top of the runtime and the training code: the HTML
report (``build_report``, ``runtime report``), the terminal comparison (``compare``, ``runtime
compare``) and the quality report of every variant (``runtime quality``). They find what to show
by the roles the run's manifest records for its columns, never by stage names.

Imports are lazy so that importing this package costs nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "compare", "render_run"]


def __getattr__(name: str) -> Any:
    if name == "build_report":
        from reports.build import build_report

        return build_report
    if name == "compare":
        from reports.comparison import compare

        return compare
    if name == "render_run":
        from reports.render import render_run

        return render_run
    raise AttributeError(name)
