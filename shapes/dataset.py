"""The shapes dataset: scenes and questions by seed and index, as plain records.

Image ``i`` is drawn from ``np.random.default_rng([seed, i])`` alone, so it is the same
whatever ``num_images`` is and in whichever process it is generated.
"""

from __future__ import annotations

from typing import Any, Iterator

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shapes.questions import ask_questions, human_answers
from shapes.scene import Scene, draw_scene


# Upper bounds that keep a typo from costing minutes and gigabytes before any row is made: an
# image of MAX_IMAGE_SIZE takes about a second and 50 MB; a scene offers fewer than 50 distinct
# questions.
MAX_IMAGE_SIZE = 4096
MAX_NUM_IMAGES = 1_000_000
MAX_QUESTIONS_PER_IMAGE = 100


class ShapesParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="dataset seed; same seed, same images and questions")
    num_images: int = Field(16, ge=1, le=MAX_NUM_IMAGES, description="number of images")
    questions_per_image: int = Field(
        4, ge=1, le=MAX_QUESTIONS_PER_IMAGE, description="questions per image (fewer if a scene allows fewer)")
    image_size: int = Field(256, ge=32, le=MAX_IMAGE_SIZE, description="side of the square images in pixels")
    min_shapes: int = Field(2, ge=1, le=4, description="fewest objects in a scene")
    max_shapes: int = Field(4, ge=1, le=4, description="most objects in a scene")
    textured_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="fraction of images with a textured (vs plain) background")

    @model_validator(mode="after")
    def _shape_range(self) -> "ShapesParams":
        if self.min_shapes > self.max_shapes:
            raise ValueError(f"min_shapes ({self.min_shapes}) > max_shapes ({self.max_shapes})")
        return self


def render_scene(seed: int, index: int, params: ShapesParams) -> Scene:
    """Image ``index`` of the dataset with ``seed``: pixels, objects and their exact masks."""
    return _draw(np.random.default_rng([seed, index]), params)


def _draw(rng: np.random.Generator, params: ShapesParams) -> Scene:
    return draw_scene(rng, params.image_size, params.min_shapes, params.max_shapes, params.textured_fraction)


def iter_samples(p: ShapesParams) -> Iterator[dict[str, Any]]:
    """One record per question: ids, question, PNG bytes, ten human answers, question and
    answer type, the mask of the objects the answer is about (None when none), the scene JSON."""
    for index in range(p.num_images):
        rng = np.random.default_rng([p.seed, index])
        scene = _draw(rng, p)
        image_id = f"shapes-{p.seed}-{index:06d}"
        ok, png = cv2.imencode(".png", cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {image_id}")
        image_bytes, scene_json = png.tobytes(), scene.to_json()
        for k, q in enumerate(ask_questions(rng, scene, p.questions_per_image)):
            masks = [scene.masks[i] for i in q.referred]
            yield {
                "sample_id": f"{image_id}-q{k}",
                "image_id": image_id,
                "question": q.text,
                "image_path": None,
                "image_bytes": image_bytes,
                "answers": human_answers(rng, q.answer),
                "question_type": q.question_type,
                "gt_mask": np.maximum.reduce(masks) if masks else None,
                "answer_type": q.answer_type,
                "scene": scene_json,
            }
