"""The built-in synthetic dataset as a source: shapes on a light background, questions with
exact answers and exact ground-truth masks of the objects each answer is about (the ``shapes``
package makes them; training and the quality report use it directly)."""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa

from artifacts.columns import tensor_type
from sources.base import BASE_COLUMNS, SOURCES, Source, SourceColumn
from shapes.dataset import ShapesParams, iter_samples


@SOURCES.add
class ShapesSource(Source):
    """Synthetic shapes with colour, shape, count, position and existence questions.

    Deterministic by seed; images are PNG bytes; ``gt_mask`` is the exact mask of the
    objects the answer refers to.
    """

    name = "shapes"
    Params = ShapesParams
    data = "shapes"  # the data the shipped weights were trained on
    params: ShapesParams

    def columns(self) -> dict[str, SourceColumn]:
        size = self.params.image_size
        return {
            **BASE_COLUMNS,
            "gt_mask": SourceColumn(
                tensor_type("uint8", [size, size]),
                "0/1 mask of the objects the answer refers to; null when none"),
            "answer_type": SourceColumn(pa.string(), 'VQAv2 answer type: "yes/no", "number" or "other"'),
            "scene": SourceColumn(
                pa.string(),
                "JSON: image_size, background and objects (shape, color, center [x, y], size, "
                "bbox [x0, y0, x1, y1] with exclusive ends)", image_level=True),
        }

    def count(self) -> int:
        """At most (a scene with few objects may offer fewer distinct questions)."""
        return self.params.num_images * self.params.questions_per_image

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        return iter_samples(self.params)
