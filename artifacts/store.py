"""Content-addressed Parquet store: one file per (stage, key) result, checked on every read.

Layout (docs/store.md has the whole description, for other tools)::

    ROOT/<stage>/<key[:2]>/<key>.<sha256>.parquet    an entry: the result's Parquet bytes,
                                                      <sha256> the hash of exactly those bytes
    ROOT/<stage>/<key[:2]>/.<name>.tmp-<writer>-<r>   a write in progress (or left by a dead one)
    ROOT/<stage>/_index/<writer>-<n>.parquet         index segments: one row per written entry

A read hashes the bytes and compares them with the name before parsing, so a flipped bit or a
truncated file is never returned: it is reported as a warning, removed, and the caller
recomputes it. Writes go to a temporary name and are renamed into place, so readers see a
whole entry or none. The index lets ``cache ls`` list entries with their rows, node and graph
without opening them; each writer appends its own segments, so writers never contend.
``ROOT`` may be a local folder or a URI (``artifacts.location``).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from artifacts.filehash import sha256_bytes
from artifacts.location import Location, new_writer_id, writer_alive

log = logging.getLogger(__name__)

META_KEY = b"pnpvqa.entry"
INDEX_DIR = "_index"
ENTRY_RE = re.compile(r"^(?P<key>[0-9a-f]{32})\.(?P<sha>[0-9a-f]{64})\.parquet$")
LEGACY_RE = re.compile(r"^[0-9a-f]{32}\.parquet$")  # entries of the first layout: no checksum
TEMP_RE = re.compile(r"^\..+\.tmp-(?P<writer>.+-\d+-[0-9a-f]{8})-[0-9a-f]{6}$")
INDEX_FLUSH_ENTRIES = 64
INDEX_FLUSH_SECONDS = 30.0
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("checksum", pa.string()), ("size", pa.int64()),
                          ("rows", pa.int64()), ("created", pa.float64()), ("meta", pa.string())])


@dataclass
class Entry:
    """One stored file. ``meta`` comes from the index (None when the entry is not indexed)."""

    stage: str
    key: str
    checksum: str | None      # None for legacy entries
    rel: str                  # path relative to the store root
    size: int
    mtime: float              # last use on local stores (reads touch it), else creation
    indexed: dict | None = None  # its index row (key, checksum, size, rows, created, meta)


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def parse_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(data), columns=columns)


def check_bytes(data: bytes, checksum: str) -> str | None:
    """Why ``data`` is not a good entry with this checksum, or None."""
    actual = sha256_bytes(data)
    if actual != checksum:
        return (f"checksum mismatch: {len(data)} bytes hash to {actual[:12]}..., written as {checksum[:12]}... "
                "(the file changed or was cut short after it was written)")
    try:
        pq.read_metadata(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        return f"not readable Parquet: {exc}"
    return None


class Store:
    """The cache of stage results under ``root`` (a folder or a URI)."""

    def __init__(self, root: Location | str):
        self.loc = root if isinstance(root, Location) else Location(root)
        self.writer_id = new_writer_id()
        self._pending: dict[str, list[dict]] = {}
        self._segments = 0
        self._last_flush = time.monotonic()
        self.discarded: list[str] = []  # messages about corrupt entries removed by reads

    @property
    def root(self) -> str:
        return self.loc.display()

    # -- one entry ---------------------------------------------------------------------------
    @staticmethod
    def _folder(stage: str, key: str) -> str:
        return f"{stage}/{key[:2]}"

    def candidates(self, stage: str, key: str) -> list[Entry]:
        """The files stored for ``key``, newest first (normally one)."""
        folder = self._folder(stage, key)
        found = []
        for f in self.loc.list(folder):
            m = ENTRY_RE.match(f.name)
            if m and m["key"] == key:
                found.append(Entry(stage, key, m["sha"], f"{folder}/{f.name}", f.size, f.mtime))
        return sorted(found, key=lambda e: e.mtime, reverse=True)

    def read(self, stage: str, key: str, columns: list[str] | None = None) -> pa.Table | None:
        """The stored table of ``key`` after checking its bytes, or None when there is no good
        one (a corrupt file is reported, removed and skipped)."""
        for entry in self.candidates(stage, key):
            try:
                data = self.loc.read_bytes(entry.rel)
            except FileNotFoundError:  # removed since the listing (gc, or a newer write)
                continue
            problem = check_bytes(data, entry.checksum)
            if problem is None:
                try:
                    table = parse_table(data, columns)
                except (pa.ArrowInvalid, OSError, KeyError) as exc:
                    problem = f"not readable: {exc}"
            if problem is not None:
                self._discard(entry, problem)
                continue
            self.loc.touch(entry.rel)
            return table
        return None

    def _discard(self, entry: Entry, problem: str) -> None:
        message = (f"cache entry {self.loc.display(entry.rel)} is corrupt ({problem}); "
                   "removed, its result will be recomputed")
        log.warning("warning: %s", message)
        self.discarded.append(message)
        self.loc.delete(entry.rel)

    def write(self, stage: str, key: str, table: pa.Table, meta: dict, described: dict | None = None) -> Entry:
        """Store ``table`` under ``key`` (replacing any older file of the key).

        ``described`` (what the key was made of) is written into the file, so the bytes depend
        only on the key and the result: two writers of one result write the same file. ``meta``
        (who wrote it, when, for which node and graph) goes to the index only.
        """
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps({"stage": stage, "key": key, **(described or {})},
                                           default=str, sort_keys=True).encode()
        data = table_bytes(table.replace_schema_metadata(schema_meta))
        checksum = sha256_bytes(data)
        rel = f"{self._folder(stage, key)}/{key}.{checksum}.parquet"
        started = time.time()
        self.loc.write_bytes_atomic(rel, data, self.writer_id)
        for older in self.candidates(stage, key):  # superseded (not a concurrent writer's copy)
            if older.rel != rel and older.mtime < started - 1.0:
                self.loc.delete(older.rel)
        meta = {**meta, "created": started, "writer": self.writer_id}
        self._pending.setdefault(stage, []).append(
            {"key": key, "checksum": checksum, "size": len(data), "rows": table.num_rows,
             "created": started, "meta": json.dumps(meta, default=str)})
        if (sum(map(len, self._pending.values())) >= INDEX_FLUSH_ENTRIES
                or time.monotonic() - self._last_flush > INDEX_FLUSH_SECONDS):
            self.flush_index()
        return Entry(stage, key, checksum, rel, len(data), time.time(), None)

    # -- the index -----------------------------------------------------------------------------
    def flush_index(self) -> None:
        """Write this writer's new index rows as one segment per stage."""
        for stage, rows in self._pending.items():
            if rows:
                self._segments += 1
                table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
                rel = f"{stage}/{INDEX_DIR}/{self.writer_id}-{self._segments:06d}.parquet"
                self.loc.write_bytes_atomic(rel, table_bytes(table), self.writer_id)
        self._pending = {}
        self._last_flush = time.monotonic()

    close = flush_index

    def index(self, stage: str) -> dict[tuple[str, str], dict]:
        """(key, checksum) -> index row, from every segment of ``stage`` (unreadable ones skipped)."""
        out: dict[tuple[str, str], dict] = {}
        for f in sorted(self.loc.list(f"{stage}/{INDEX_DIR}"), key=lambda f: f.name):
            if f.name.startswith(".") or not f.name.endswith(".parquet"):
                continue
            try:
                rows = parse_table(self.loc.read_bytes(f"{stage}/{INDEX_DIR}/{f.name}")).to_pylist()
            except (FileNotFoundError, pa.ArrowInvalid, OSError):
                continue
            for row in rows:
                try:
                    row["meta"] = json.loads(row["meta"] or "{}")
                except ValueError:
                    row["meta"] = {}
                out[(row["key"], row["checksum"])] = row
        return out

    def compact_index(self, stage: str) -> int:
        """Replace the segments of ``stage`` by one that lists the entries present now (and
        indexes entries that were missing from it, from their own metadata)."""
        segments = [f.name for f in self.loc.list(f"{stage}/{INDEX_DIR}")
                    if not f.name.startswith(".") and f.name.endswith(".parquet")]
        index = self.index(stage)
        rows = []
        for e in self.entries([stage], index={stage: index}):
            if e.checksum is None:
                continue
            row = index.get((e.key, e.checksum))
            if row is None:
                meta = self._footer_meta(e)
                if meta is None:
                    continue
                row = {"key": e.key, "checksum": e.checksum, "size": e.size, "rows": meta.get("rows"),
                       "created": meta.get("created", e.mtime), "meta": meta}
            rows.append({**row, "meta": json.dumps(row["meta"], default=str)})
        self._segments += 1
        rel = f"{stage}/{INDEX_DIR}/{self.writer_id}-{self._segments:06d}.parquet"
        self.loc.write_bytes_atomic(rel, table_bytes(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)),
                                    self.writer_id)
        for name in segments:
            self.loc.delete(f"{stage}/{INDEX_DIR}/{name}")
        return len(rows)

    def _footer_meta(self, entry: Entry) -> dict | None:
        """What an entry says of itself (reads only its footer): the description written with
        it, and its row count; None if unreadable."""
        try:
            data = self.loc.read_tail(entry.rel, max(entry.size, 8))
            parquet_meta = pq.read_metadata(pa.BufferReader(data))
            raw = parquet_meta.schema.to_arrow_schema().metadata or {}
            return {**json.loads(raw.get(META_KEY, b"{}")), "rows": parquet_meta.num_rows}
        except (OSError, pa.ArrowInvalid, ValueError):
            return None

    # -- everything ------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        return [d for d in self.loc.list_dirs() if not d.startswith((".", "_"))]

    def entries(self, stages: Iterable[str] | None = None,
                index: dict[str, dict] | None = None) -> Iterator[Entry]:
        """Every stored entry (legacy ones too, with ``checksum=None``), with its index row."""
        for stage in (list(stages) if stages is not None else self.stages()):
            idx = index[stage] if index and stage in index else self.index(stage)
            for folder in self.loc.list_dirs(stage):
                if folder.startswith((".", "_")):
                    continue
                for f in sorted(self.loc.list(f"{stage}/{folder}"), key=lambda f: f.name):
                    m = ENTRY_RE.match(f.name)
                    rel = f"{stage}/{folder}/{f.name}"
                    if m:
                        row = idx.get((m["key"], m["sha"]))
                        yield Entry(stage, m["key"], m["sha"], rel, f.size, f.mtime, row)
                    elif LEGACY_RE.match(f.name):
                        yield Entry(stage, f.name.split(".")[0], None, rel, f.size, f.mtime, None)

    def quick_problem(self, entry: Entry) -> str | None:
        """What is wrong with an entry by a cheap check (no full read): written by the first
        layout (no checksum), a size other than the one indexed, or no Parquet footer."""
        if entry.checksum is None:
            return "written by an older version without a checksum; it is never read"
        if entry.indexed is not None:
            if entry.indexed.get("size") not in (None, entry.size):
                return f"size {entry.size} bytes, written as {entry.indexed['size']} (truncated or replaced)"
            return None
        try:
            tail = self.loc.read_tail(entry.rel, 4)
        except OSError as exc:
            return f"unreadable: {exc}"
        return None if tail == b"PAR1" else "no Parquet footer (truncated)"

    def verify(self, entry: Entry) -> str | None:
        """What is wrong with an entry by reading it whole and checking its checksum, or None."""
        if entry.checksum is None:
            return self.quick_problem(entry)
        try:
            data = self.loc.read_bytes(entry.rel)
        except FileNotFoundError:
            return None  # removed meanwhile
        except OSError as exc:
            return f"unreadable: {exc}"
        return check_bytes(data, entry.checksum)

    def temp_files(self) -> list[tuple[str, str, float]]:
        """(relative path, writer id, mtime) of every temporary file in the store."""
        out = []
        for stage in self.stages():
            for folder in [*self.loc.list_dirs(stage)]:
                for f in self.loc.list(f"{stage}/{folder}"):
                    m = TEMP_RE.match(f.name)
                    if m:
                        out.append((f"{stage}/{folder}/{f.name}", m["writer"], f.mtime))
        return out

    def stale_temp_files(self, grace_seconds: float, now: float | None = None) -> list[str]:
        """Temporary files no running writer will finish: their writer's process is gone (same
        host), or, for writers on other hosts, they are older than ``grace_seconds``."""
        now = time.time() if now is None else now
        stale = []
        for rel, writer, mtime in self.temp_files():
            alive = writer_alive(writer)
            if alive is False or (alive is None and now - mtime > grace_seconds):
                stale.append(rel)
        return stale
