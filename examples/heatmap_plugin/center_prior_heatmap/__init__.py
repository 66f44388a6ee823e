"""A heatmap variant as a plugin: GradCAM weighed by a Gaussian centre prior.

Photographers centre what a question is about more often than not; this stage multiplies a
question-guided heatmap by ``exp(-d^2 / (2 sigma^2))``, ``d`` the distance of a cell from the
grid centre in units of the grid side, mixed as ``(1 - strength) + strength * prior`` so that
``strength: 0`` leaves the heatmap unchanged. It registers through the ``pnpvqa.stages`` entry
point in ``pyproject.toml``: no file of pnpvqa-runtime is edited.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from artifacts.columns import TensorSpec
from stages import Batch, Input, Output, Stage, StageParams

HEATMAP = TensorSpec("float32", ("g", "g"))


class CenterPriorParams(StageParams):
    sigma: float = Field(0.35, gt=0, description="width of the prior, as a fraction of the grid side")
    strength: float = Field(0.5, ge=0, le=1, description="0: heatmap unchanged; 1: heatmap times the prior")


class CenterPrior(Stage):
    """Question-guided heatmap weighed by a Gaussian centre prior (example plugin)."""

    name = "center_prior"
    Params = CenterPriorParams
    INPUTS = {"heatmap": Input(HEATMAP, "question-guided heatmap [g, g], e.g. itm_gradcam's")}
    OUTPUTS = {"heatmap": Output(HEATMAP, "the heatmap weighed by the centre prior [g, g]", role="heatmap")}

    def process(self, batch: Batch) -> dict[str, Any]:
        heat = batch["heatmap"]                                        # [N, g, g]
        g = heat.shape[-1]
        centre = (np.arange(g) + 0.5) / g - 0.5                        # cell centres, grid side = 1
        d2 = centre[:, None] ** 2 + centre[None, :] ** 2
        prior = np.exp(-d2 / (2 * self.params.sigma ** 2))
        weight = (1 - self.params.strength) + self.params.strength * prior
        return {"heatmap": (heat * weight).astype(np.float32)}
