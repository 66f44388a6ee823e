"""Cut the sample stream into shards whose boundaries the samples decide, and fingerprint them.

Boundaries are content-defined, so that a subset, an appended or removed question, a block of
images moved elsewhere or another ``--limit`` changes only the shards around the edit: a
shard ends after an image when one of that image's questions is a *cut sample* (the hash of
its ``sample_id`` falls in the lowest ``1/shard_size`` of the hash space), or when it reached
``MAX_FACTOR * shard_size`` samples. Shards hold about ``shard_size`` samples on average and
never split an image's questions.

What a node's result depends on is fingerprinted per node, not per shard
(:meth:`Shard.source_fingerprint`): the ids of its rows and the content of the source columns
it reads, in an order-free way (rows sorted by id), so reordering questions inside a shard,
or editing a column a node does not read, keeps its cached result. Image files count by the
sha256 of their bytes (remembered per file version: ``artifacts.filehash``), not by path, so a
dataset moved to another folder or machine keeps its cache. An image given as a URI counts by
its URI, size and modification time, from the object's metadata (``_object_tokens``): the
driver downloads no image, the worker that decodes it reads it once; an object overwritten
with one of the same size within the same second (S3's times are whole seconds) is not noticed.
"""

from __future__ import annotations

import hashlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from artifacts.columns import python_to_column
from artifacts.filehash import hash_files, sha256_bytes
from artifacts.location import is_uri, object_version
from artifacts.fingerprint import fingerprint
from runtime.records import ERROR, clean_records
from sources.base import Source

MAX_FACTOR = 4  # a shard is cut at MAX_FACTOR * shard_size samples when no cut sample came


@dataclass
class Shard:
    """Consecutive samples of the stream; all questions of an image are in the same shard.

    ``table`` holds the source columns, one row per sample; ``image_rows[i]`` is the image
    row of sample ``i`` and ``image_first[j]`` the first sample of image ``j``. ``tokens`` maps
    each source column to a per-sample content token (hashes for bytes, arrays and image files).
    """

    index: int
    table: pa.Table
    tokens: dict[str, list]
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

    def source_fingerprint(self, columns: Iterable[str], per_image: bool) -> str:
        """Identity of what a node sees of this shard: its row ids (image ids for a per-image
        node, sample ids with their image ids otherwise), which rows arrive failed from the
        source, and the tokens of the source ``columns`` it reads. Row order does not count."""
        columns = sorted(set(columns))
        ids = self.table.column("sample_id").to_pylist()
        images = self.table.column("image_id").to_pylist()
        if per_image:
            rows = [[images[i], self.image_errors[j], [self.tokens[c][i] for c in columns]]
                    for j, i in enumerate(self.image_first)]
        else:
            rows = [[ids[i], images[i], self.sample_errors[i], [self.tokens[c][i] for c in columns]]
                    for i in range(self.num_samples)]
        rows.sort(key=lambda r: fingerprint(r))
        return fingerprint("per-image" if per_image else "per-sample", columns, rows)

    def ordered_fingerprint(self, columns: Iterable[str]) -> str:
        """Identity of the rows in their order with the tokens of ``columns`` (for results parts,
        which keep the dataset's order)."""
        columns = sorted(set(columns))
        return fingerprint(columns, self.sample_errors, [self.tokens[c] for c in columns])


def _value_token(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ["array", list(value.shape), str(value.dtype), hashlib.sha256(value.tobytes()).hexdigest()]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ["bytes", sha256_bytes(value)]
    return value


def _tokens(records: list[dict[str, Any]], schema: dict[str, pa.DataType]) -> dict[str, list]:
    tokens = {name: [_value_token(r.get(name)) for r in records] for name in schema if name != "image_path"}
    if "image_path" in schema:
        paths = [r.get("image_path") for r in records]
        files = sorted({p for p in paths if p and not is_uri(p)})
        objects = sorted({p for p in paths if p and is_uri(p)})
        found = {p: ["file", d] for p, d in zip(files, hash_files(files, missing_ok=True)) if d}
        found.update(_object_tokens(objects))
        # a readable file counts by its bytes, an object in a bucket by its version; a missing one
        # by its path (its error names it)
        tokens["image_path"] = [None if not p else found.get(p, ["missing", p]) for p in paths]
    return tokens


def _object_tokens(uris: list[str], threads: int = 8) -> dict[str, list]:
    """An object in a bucket counts by its URI, size and modification time, read from its
    metadata: the driver downloads no image (the worker that decodes it does)."""
    if not uris:
        return {}
    with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
        versions = list(pool.map(object_version, uris))
    return {u: ["object", u, *v] for u, v in zip(uris, versions) if v is not None}


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
    image_errors = []
    for i in image_first:
        r = records[i]
        if r.get("image_path") or r.get("image_bytes"):
            image_errors.append(None)
        elif ERROR in r:
            image_errors.append(f"[source] {r[ERROR]}")
        else:
            image_errors.append("[source] no image: the record has neither an image path nor image bytes")
    sample_errors = []
    for i, r in enumerate(records):
        question = r.get("question")
        if ERROR in r:
            sample_errors.append(f"[source] {r[ERROR]}")
        elif image_errors[image_rows[i]]:
            sample_errors.append(image_errors[image_rows[i]])
        elif not isinstance(question, str) or not question.strip():
            sample_errors.append("[source] empty question")
        else:
            sample_errors.append(None)
    return Shard(index, table, _tokens(records, schema), image_rows, np.asarray(image_first, dtype=np.int64),
                 sample_errors, image_errors)


def select_samples(records: Iterable[dict[str, Any]], ids: set[str] | None, limit: int | None) -> Iterator[dict[str, Any]]:
    """Keep samples whose id is in ``ids`` (when given), then the first ``limit``."""
    if ids is not None:
        records = (r for r in records if str(r.get("sample_id")) in ids)
    if limit is not None:
        records = itertools.islice(records, limit)
    return iter(records)


def is_cut_sample(sample_id: Any, shard_size: int) -> bool:
    """True for about one sample in ``shard_size``, decided by the sample id alone."""
    h = int.from_bytes(hashlib.sha256(str(sample_id).encode()).digest()[:8], "big")
    return h < (1 << 64) // max(1, shard_size)


def iter_shards(source: Source, shard_size: int, ids: set[str] | None = None,
                limit: int | None = None, records: list[dict[str, Any]] | None = None) -> Iterator[Shard]:
    """Yield shards of about ``shard_size`` samples with content-defined boundaries (module doc);
    ``records``: the selected records, already read (else the source is read)."""
    schema = {name: col.type for name, col in source.columns().items()}
    current: list[dict[str, Any]] = []
    cut_after_image = False  # the current image holds a cut sample
    index = 0
    selected = records if records is not None else select_samples(source.iter_samples(), ids, limit)
    for record in clean_records(selected):
        new_image = bool(current) and record["image_id"] != current[-1]["image_id"]
        if new_image and (cut_after_image or len(current) >= MAX_FACTOR * shard_size):
            yield _build(index, current, schema)
            index += 1
            current = []
        if new_image:
            cut_after_image = False
        current.append(record)
        cut_after_image = cut_after_image or is_cut_sample(record["sample_id"], shard_size)
    if current:
        yield _build(index, current, schema)
