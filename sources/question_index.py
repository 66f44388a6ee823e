"""The index of a question file: its entries as Arrow columns in an Arrow file, rows already in
the order the source yields them (grouped by image), read a batch at a time.

A question file is parsed once per version (``artifacts.filehash.file_version`` of every file
it is built from; of an object in a bucket, its URI, size and modification time, read from its
metadata: a later run downloads nothing of it): later runs read the index instead, so a ``--limit``, resumed or extended
run starts at once, and a run's memory holds a batch of records, not the dataset. Indexes live under ``$PNPVQA_QUESTION_INDEX``
(default ``~/.cache/pnpvqa-runtime/question-index``; ``off``: built in a temporary folder
for each run, never reused); building one removes those of earlier versions of the same files.

Building streams the file (``sources.json_stream``) into batches of rows written as they
fill, then reorders them from a memory-mapped scratch copy: the grouping (a few ints per row)
and the mapped pages are what a build holds (about 100 bytes a question, once per version).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artifacts.filehash import file_version
from artifacts.location import is_uri, object_version

INDEX_ENV = "PNPVQA_QUESTION_INDEX"
INDEX_VERSION = 2  # of the index's layout and of what the sources put in it
BATCH_ROWS = 1 << 16  # rows parsed or reordered at a time while building
READ_ROWS = 1 << 10   # rows of a batch of the index file: what a run holds of it at a time
GROUP = "group"  # the column rows are grouped by (in order of first appearance)


def index_folder() -> Path | None:
    value = os.environ.get(INDEX_ENV)
    if value == "off":
        return None
    if value:
        return Path(value)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pnpvqa-runtime" / "question-index"


def write_rows(path: Path, schema: pa.Schema, rows: Iterable[tuple]) -> None:
    """Write ``rows`` (tuples of plain values, in the order of ``schema``) to an Arrow file in
    batches of ``BATCH_ROWS``."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        rows = iter(rows)
        while True:
            batch = list(itertools.islice(rows, BATCH_ROWS))
            columns = list(zip(*batch)) if batch else [[] for _ in schema.names]
            writer.write_batch(pa.record_batch([list(c) for c in columns], schema=schema))
            if len(batch) < BATCH_ROWS:
                return


def mapped(path: Path) -> pa.Table:
    """The Arrow file at ``path``, memory-mapped (no copy)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def grouped_order(table: pa.Table) -> np.ndarray:
    """Row numbers with the rows of each ``GROUP`` value together, groups in order of their first
    row, rows of a group in file order."""
    codes = pc.dictionary_encode(table.column(GROUP)).combine_chunks().indices  # first-appearance numbering
    return np.argsort(codes.to_numpy(zero_copy_only=False), kind="stable")


def write_in_order(path: Path, table: pa.Table, order: np.ndarray,
                   extra: Callable[[pa.Table], dict[str, pa.Array]] | None = None,
                   metadata: dict[str, str] | None = None) -> None:
    """``table``'s rows in ``order`` (with the columns ``extra(rows)`` adds) to an Arrow file in
    batches of ``READ_ROWS``; its schema keeps ``metadata``, the number of rows and whether
    the index vouches for its rows (``QuestionIndex.vouched``)."""
    plain = table.column("odd").null_count == table.num_rows
    unique = pc.count_distinct(table.column("sample_id")).as_py() == table.num_rows
    metadata = {**(metadata or {}), "rows": str(table.num_rows), "vouched": json.dumps(plain and unique)}
    writer = None
    with pa.OSFile(str(path), "wb") as sink:
        for start in range(0, max(len(order), 1), BATCH_ROWS):
            rows = order[start:start + BATCH_ROWS]
            batch = table.take(pa.array(rows, type=pa.int64()))
            for name, column in (extra(batch) if extra else {}).items():
                batch = batch.append_column(name, column)
            batch = batch.combine_chunks().replace_schema_metadata(metadata)
            if writer is None:  # compressed: the answers of a VQAv2 file repeat (a third of the bytes)
                writer = pa.ipc.new_file(sink, batch.schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))
            writer.write_table(batch, max_chunksize=READ_ROWS)
        writer.close()


class QuestionIndex:
    """An index file, read one batch at a time (not mapped: mapped pages touched would count in
    the run's resident memory until the OS wants them back)."""

    def __init__(self, path: Path, keep: object = None):
        self.path = path
        self._keep = keep  # a temporary folder holding the file, removed with this object
        with pa.OSFile(str(path)) as f:
            self.metadata = {k.decode(): v.decode() for k, v in (pa.ipc.open_file(f).schema.metadata or {}).items()}
        self.rows = int(self.metadata["rows"])

    def vouched(self, limit: int | None) -> int | None:
        """The rows of the first ``limit`` when every entry is plain (a well-typed record whose
        image id names one file: no ``odd`` one) and no sample id comes twice; else None."""
        if not json.loads(self.metadata["vouched"]):
            return None
        return self.rows if limit is None else min(limit, self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rows as dicts, one small batch in memory at a time."""
        with pa.OSFile(str(self.path)) as f:
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                yield from reader.get_batch(i).to_pylist()


def open_index(kind: str, files: list[str], build: Callable[[Path, Path], None]) -> QuestionIndex:
    """The index of ``files`` (the question file first; a later one: annotations), built by
    ``build(folder for scratch files, path to write)`` when none is there for their versions."""
    folder = index_folder()
    if folder is None:  # built for this run alone, in a folder removed with the index
        scratch = tempfile.TemporaryDirectory(prefix="pnpvqa-index-")
        build(Path(scratch.name), Path(scratch.name) / "index.arrow")
        return QuestionIndex(Path(scratch.name) / "index.arrow", keep=scratch)
    folder.mkdir(parents=True, exist_ok=True)
    versions = [_version(f) for f in files]
    files_key = _digest([kind, [v[0] for v in versions]])  # the files by real path or URI
    path = folder / f"{kind}-{files_key}-{_digest([INDEX_VERSION, versions])}.arrow"
    if not path.is_file():
        with tempfile.TemporaryDirectory(prefix=f".{kind}-", dir=folder) as scratch:
            build(Path(scratch), Path(scratch) / "index.arrow")
            os.replace(Path(scratch) / "index.arrow", path)  # whole or absent: a run killed here leaves none
        for older in folder.glob(f"{kind}-{files_key}-*.arrow"):  # of earlier versions of the same files
            if older != path:
                older.unlink(missing_ok=True)
    return QuestionIndex(path)


def _version(file: str) -> tuple:
    """What a version of ``file`` is known by: a local file's ``file_version``; an object's URI,
    size and modification time (an object is rewritten whole, with a new time: to the second on
    S3, so a rewrite of the same size within that second would keep the old index)."""
    if not is_uri(file):
        return file_version(os.path.expanduser(file))  # as the source reads it
    version = object_version(file)
    if version is None:
        raise FileNotFoundError(errno.ENOENT, "no such object", file)
    return (file, *version)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:24]
