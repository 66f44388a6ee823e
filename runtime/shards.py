"""Cut the sample stream into shards at image boundaries and fingerprint their content."""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from artifacts.columns import python_to_column
from artifacts.fingerprint import fingerprint
from runtime.sources.base import Source


@dataclass
class Shard:
    """A run of consecutive samples; all questions of an image are in the same shard.

    ``table`` holds the source columns, one row per sample; ``image_rows[i]`` is the image
    row of sample ``i`` and ``image_first[j]`` the first sample of image ``j``.
    """

    index: int
    table: pa.Table
    fingerprint: str
    image_rows: np.ndarray
    image_first: np.ndarray
    sample_errors: list[str | None]  # bad records (empty question, no image), per sample
    image_errors: list[str | None]   # per image (no image reference)

    @property
    def num_samples(self) -> int:
        return self.table.num_rows

    @property
    def num_images(self) -> int:
        return len(self.image_first)

    @property
    def sample_ids(self) -> list[str]:
        return self.table.column("sample_id").to_pylist()

    @property
    def image_ids(self) -> list[str]:
        ids = self.table.column("image_id").to_pylist()
        return [ids[i] for i in self.image_first]


def _image_token(record: dict[str, Any]) -> Any:
    """What identifies the image content cheaply: bytes hash, or path + size + mtime."""
    data = record.get("image_bytes")
    if data:
        return ["bytes", hashlib.sha256(data).hexdigest()]
    path = record.get("image_path")
    if path:
        try:
            st = os.stat(path)
            return ["path", path, st.st_size, st.st_mtime_ns]
        except OSError:
            return ["path", path, None]
    return None


def _record_token(record: dict[str, Any]) -> list:
    out = []
    for key in sorted(record):
        value = record[key]
        if key in ("image_bytes", "image_path"):
            continue
        if isinstance(value, np.ndarray):
            value = [list(value.shape), str(value.dtype), hashlib.sha256(value.tobytes()).hexdigest()]
        elif isinstance(value, (bytes, bytearray)):
            value = hashlib.sha256(value).hexdigest()
        out.append([key, value])
    out.append(["image", _image_token(record)])
    return out


def _build(index: int, records: list[dict[str, Any]], schema: dict[str, pa.DataType]) -> Shard:
    n = len(records)
    arrays = [python_to_column([r.get(name) for r in records], t, n) for name, t in schema.items()]
    table = pa.Table.from_arrays(arrays, names=list(schema))
    image_index: dict[str, int] = {}
    image_rows = np.empty(n, dtype=np.int64)
    image_first = []
    for i, r in enumerate(records):
        img = r["image_id"]
        if img not in image_index:
            image_index[img] = len(image_first)
            image_first.append(i)
        image_rows[i] = image_index[img]
    fp = fingerprint([_record_token(r) for r in records])
    image_errors = [None if (records[i].get("image_path") or records[i].get("image_bytes"))
                    else "[source] no image: the record has neither an image path nor image bytes"
                    for i in image_first]
    sample_errors = []
    for i, r in enumerate(records):
        question = r.get("question")
        if image_errors[image_rows[i]]:
            sample_errors.append(image_errors[image_rows[i]])
        elif not isinstance(question, str) or not question.strip():
            sample_errors.append("[source] empty question")
        else:
            sample_errors.append(None)
    return Shard(index, table, fp, image_rows, np.asarray(image_first, dtype=np.int64), sample_errors, image_errors)


def select_samples(records: Iterable[dict[str, Any]], ids: set[str] | None, limit: int | None) -> Iterator[dict[str, Any]]:
    """Keep samples whose id is in ``ids`` (when given), then the first ``limit``."""
    if ids is not None:
        records = (r for r in records if r["sample_id"] in ids)
    if limit is not None:
        records = itertools.islice(records, limit)
    return iter(records)


def iter_shards(source: Source, shard_size: int, ids: set[str] | None = None,
                limit: int | None = None) -> Iterator[Shard]:
    """Yield shards of about ``shard_size`` samples, cut only between images."""
    schema = {name: col.type for name, col in source.columns().items()}
    current: list[dict[str, Any]] = []
    index = 0
    for record in select_samples(source.iter_samples(), ids, limit):
        if len(current) >= shard_size and record["image_id"] != current[-1]["image_id"]:
            yield _build(index, current, schema)
            index += 1
            current = []
        current.append(record)
    if current:
        yield _build(index, current, schema)
