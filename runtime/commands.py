"""Commands whose code sits above the runtime (``runtime train NAME``, ``runtime report``,
``compare``, ``quality``), named here and imported only when they run: the runtime never imports
training or reports.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from plugins import Registry


@dataclass(frozen=True)
class Command:
    """A ``runtime train NAME`` command, or another command whose code sits above the runtime."""

    name: str
    description: str
    entry: str  # "module:function" of its main(argv); imported when the command runs (it pulls in its models)

    def main(self):
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)


# ``runtime train`` commands; other packages add theirs through the ``pnpvqa.trainers`` entry points
# (a Command object, named as the entry point)
TRAINERS: Registry[Command] = Registry("trainer", "pnpvqa.trainers", lambda t: t.name)
for _trainer in (
    Command("itm", "a BLIP ITM model (every parameter; ITM + ITC, optional grounding and patch-probe losses)",
            "training.itm:main"),
    Command("caption", "the BLIP captioner, on captions of the objects visible in sampled patches",
            "training.caption:main"),
    Command("sam", "EfficientSAM, on point prompts from object pixels", "training.sam:main"),
    Command("fid", "the UnifiedQA FiD T5, on question + captions -> answer", "training.fid:main"),
    Command("fusion", "a BLIP + SAM feature fusion module (frozen BLIP ITM and EfficientSAM)", "training.fusion:main"),
    Command("qavit", "QA-ViT (vision tower, instruction modules, question encoder)", "training.qavit:main"),
    Command("bundle", "ship a finished run as a shapes preset file with its manifest (models/assets/shapes)",
            "training.bundle:main"),
):
    TRAINERS.add(_trainer, "runtime/commands.py")

# ``runtime report``, ``compare`` and ``quality``: the reports sit on top of the runtime (and the trainers'
# checks); each parses its own options
REPORTS: dict[str, Command] = {c.name: c for c in (
    Command("quality", "VQA accuracy and heatmap quality of every variant on held-out shapes data "
            "(writes docs/quality.md; `runtime quality --help`)", "reports.quality:main"),
    Command("report", "an HTML report of one or more runs (summary, samples, heatmaps, plots)", "reports.cli:report_main"),
    Command("compare", "metrics of runs side by side, accuracy differences with 95%% intervals, and the samples "
            "whose answers differ (with the ground truth)", "reports.cli:compare_main"),
)}
