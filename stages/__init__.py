"""Operators, registered by name for graph files: ``STAGES["heatmap_points"]``."""

from stages.base import Stage, StageParams
from stages.blip import BlipFeatures, Caption, ItmGradcam
from stages.evaluation import VQAEval
from stages.fusion import FeatureFusion
from stages.heatmaps import (
    HeatmapEnhance, HeatmapMetrics, HeatmapPoints, MaskHeatmap, SamplePatches,
)
from stages.images import LoadImage, PreprocessImage
from stages.qa import QAFiD
from stages.qavit import QAViTAttention
from stages.render import Render
from stages.sam import SamEmbed, SamMask

STAGE_CLASSES: tuple[type[Stage], ...] = (
    LoadImage,
    PreprocessImage,
    MaskHeatmap,
    HeatmapPoints,
    SamEmbed,
    SamMask,
    HeatmapEnhance,
    HeatmapMetrics,
    SamplePatches,
    BlipFeatures,
    FeatureFusion,
    ItmGradcam,
    QAViTAttention,
    Caption,
    QAFiD,
    VQAEval,
    Render,
)

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in STAGE_CLASSES}

__all__ = ["STAGES", "STAGE_CLASSES", "Stage", "StageParams"]
