"""Dataset sources by name: the synthetic ``shapes`` set, VQAv2 / OK-VQA, GQA, manifests, and
those of installed plugins (``pnpvqa.sources`` entry points).

Importing this package imports the built-in source modules, which add themselves to ``SOURCES``.
"""

from sources import shapes, vqa, manifest  # noqa: F401, I001  (they register, in the order `runtime sources` lists them)
from sources.base import BASE_COLUMNS, ERROR, SOURCES, WHERE, Source, SourceColumn, SourceParams
from sources.manifest import ManifestSource
from sources.shapes import ShapesSource
from sources.vqa import GQASource, VQAv2Source

# what a source of this project or of a plugin is written with
__all__ = [
    "BASE_COLUMNS", "ERROR", "GQASource", "ManifestSource", "SOURCES", "ShapesSource", "Source",
    "SourceColumn", "SourceParams", "VQAv2Source", "WHERE",
]
