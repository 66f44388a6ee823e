"""Operators, by name for graph files: ``STAGES["heatmap_points"]``.

Each stage class adds itself with ``@STAGES.add`` where it is defined; importing this package
imports the built-in stage modules. Stages of other installed packages come from the
``pnpvqa.stages`` entry points (``plugins``, ``examples/heatmap_plugin``).
"""

from stages import blip, evaluation, faithfulness, fusion, heatmaps, images, qa, qavit, render, sam  # noqa: F401  (they register)
from stages.base import STAGES, Batch, Granularity, Input, Output, Resources, Role, Stage, StageParams

# what a stage of this project or of a plugin is written with
__all__ = ["STAGES", "Batch", "Granularity", "Input", "Output", "Resources", "Role", "Stage", "StageParams"]
