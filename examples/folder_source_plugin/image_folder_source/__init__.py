"""A dataset source as a plugin: every image of a folder, asked the same questions.

For looking at your own pictures without writing a manifest: ``folder`` holds the images
(``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``; read in name order) and ``questions`` the
questions asked of each. There are no ground-truth answers, so a graph on it keeps no accuracy.
It registers through the ``pnpvqa.sources`` entry point in ``pyproject.toml``: no file of
pnpvqa-runtime is edited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from sources import WHERE, Source, SourceParams

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderParams(SourceParams):
    folder: str = Field(..., description="folder of the images (not searched recursively)")
    questions: list[str] = Field(..., min_length=1, description="the questions asked of every image")


class ImageFolder(Source):
    """Every image of a folder, asked the same questions (example plugin).

    Sample ids are ``<file name>-q<question number>``; image ids the file names.
    """

    name = "image_folder"
    Params = ImageFolderParams
    params: ImageFolderParams

    def _images(self) -> list[Path]:
        folder = Path(self.params.folder).expanduser().absolute()
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def problems(self) -> list[tuple[str, str]]:
        folder = Path(self.params.folder).expanduser()
        if not folder.is_dir():
            return [("folder", f"{folder} does not exist or is not a folder; set folder to a folder of images")]
        if not self._images():
            return [("folder", f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)})")]
        return []

    def count(self) -> int:
        return len(self._images()) * len(self.params.questions)

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        for image in self._images():  # all questions of an image together, as shards need
            for number, question in enumerate(self.params.questions):
                yield {"sample_id": f"{image.name}-q{number}", "image_id": image.name, "question": question,
                       "image_path": str(image), "image_bytes": None, "answers": None, "question_type": None,
                       WHERE: f"{image}, question {number}"}
