"""Dataset sources: stream samples (one row per image-question pair) into the runtime.

A source never loads images into memory up front: it yields light records (ids, question,
answers, an image path or, for embedded datasets, encoded image bytes) in an order that keeps
all questions of an image together, so shards can be cut at image boundaries.

Sources are found by name in ``SOURCES``: this project's add themselves with ``@SOURCES.add``,
other installed packages through the ``pnpvqa.sources`` entry points (``plugins``,
``examples/folder_source_plugin``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from plugins import Registry

# private keys of a record, not columns: where it comes from (for messages, e.g. "m.jsonl, line 7")
# and what is wrong with it alone (it becomes an error row); see ``runtime.records``
WHERE = "_where"
ERROR = "_error"


class SourceParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # the params holding file or folder paths: in a dataset file, relative ones are relative to it
    path_params: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class SourceColumn:
    type: pa.DataType
    doc: str
    image_level: bool = False  # same value for every question of an image


# Columns every source provides (the runtime relies on the first three).
BASE_COLUMNS: dict[str, SourceColumn] = {
    "sample_id": SourceColumn(pa.string(), "unique id of the (image, question) pair"),
    "image_id": SourceColumn(pa.string(), "id of the image; questions of one image share it", True),
    "question": SourceColumn(pa.string(), "the question text"),
    "image_path": SourceColumn(pa.string(), "path of the image file (null when bytes are embedded)", True),
    "image_bytes": SourceColumn(pa.binary(), "encoded image bytes (null when a path is given)", True),
    "answers": SourceColumn(pa.list_(pa.string()), "human answers (VQAv2: ten; GQA: one); null if unknown"),
    "question_type": SourceColumn(pa.string(), "question type / category; null if unknown"),
}


class Source:
    """Base class of dataset sources. Subclasses set ``name``, ``Params`` and ``iter_samples``."""

    name: ClassVar[str]
    Params: ClassVar[type[SourceParams]] = SourceParams
    # what the samples are, where weights may be trained on them (``ModelFamily.trained_on``):
    # a model trained on other data answers about this data at random
    data: ClassVar[str | None] = None

    def __init__(self, params: SourceParams):
        self.params = params

    def columns(self) -> dict[str, SourceColumn]:
        """Every column a sample record carries (a superset of ``BASE_COLUMNS``)."""
        return dict(BASE_COLUMNS)

    def problems(self) -> list[tuple[str, str]]:
        """``(param, message)`` for anything that makes the source unusable (missing files)."""
        return []

    def count(self) -> int | None:
        """Number of samples (or an upper bound) when known without reading images: for
        progress bars and for ``--executor auto``."""
        return None

    def vouched(self, limit: int | None) -> int | None:
        """The number of samples of the first ``limit`` (all: None) when the source itself
        guarantees what the runtime's dataset check looks for (unique sample ids, one image per
        image id, no record of a wrong type), so that a run need not read them all before its
        first shard (``runtime.records``); None when it does not know. ``ValueError`` when the
        source cannot be read."""
        return None

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        """Yield one dict per sample with a value (or None) for every column of ``columns()``,
        keeping the questions of one image consecutive. A record may also carry ``WHERE`` and
        ``ERROR``."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


# dataset sources by name; plugins add theirs through the ``pnpvqa.sources`` entry points
SOURCES: Registry[type[Source]] = Registry("source", "pnpvqa.sources", lambda cls: cls.name)
