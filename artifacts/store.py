"""Content-addressed Parquet store: one file per (node, shard) result, keyed by content.

Layout: ``ROOT/<stage>/<key[:2]>/<key>.parquet``. Writes go to a temporary file in the same
folder and are renamed into place, so a reader never sees a partial file and a process
killed mid-write leaves only a ``*.tmp-*`` file that ``gc`` removes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"pnpvqa.entry"


@dataclass
class Entry:
    key: str
    stage: str
    path: Path
    size: int
    mtime: float
    meta: dict


def write_table_atomic(path: Path, table: pa.Table) -> None:
    """Write ``table`` to ``path`` as Parquet via temp file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Store:
    """The cache of stage results under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / f"{key}.parquet"

    def has(self, stage: str, key: str) -> bool:
        return self.path(stage, key).exists()

    def read(self, stage: str, key: str, columns: list[str] | None = None) -> pa.Table:
        path = self.path(stage, key)
        table = pq.read_table(path, columns=columns)
        try:  # last use, for `cache gc --older-than`
            os.utime(path, None)
        except OSError:
            pass
        return table

    def write(self, stage: str, key: str, table: pa.Table, meta: dict) -> None:
        meta = {**meta, "key": key, "stage": stage, "created": time.time()}
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps(meta, default=str).encode()
        write_table_atomic(self.path(stage, key), table.replace_schema_metadata(schema_meta))

    def entries(self) -> Iterator[Entry]:
        if not self.root.exists():
            return
        for path in sorted(self.root.glob("*/*/*.parquet")):
            try:
                st = path.stat()
                raw = pq.read_schema(path).metadata or {}
                meta = json.loads(raw.get(META_KEY, b"{}"))
            except (OSError, pa.ArrowInvalid, ValueError):
                meta = {"unreadable": True}
                st = path.stat()
            yield Entry(path.stem, path.parent.parent.name, path, st.st_size, st.st_mtime, meta)

    def stray_temp_files(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(self.root.glob("*/*/*.tmp-*"))
