"""Dataset sources by name: the synthetic ``shapes`` set, VQAv2 / OK-VQA, GQA and manifests."""

from runtime.sources.base import BASE_COLUMNS, Source, SourceColumn, SourceParams
from runtime.sources.manifest import ManifestSource
from runtime.sources.shapes import ShapesSource
from runtime.sources.vqa import GQASource, VQAv2Source

SOURCES: dict[str, type[Source]] = {
    cls.name: cls for cls in (ShapesSource, VQAv2Source, GQASource, ManifestSource)
}

__all__ = [
    "BASE_COLUMNS", "GQASource", "ManifestSource", "SOURCES", "ShapesSource", "Source",
    "SourceColumn", "SourceParams", "VQAv2Source",
]
