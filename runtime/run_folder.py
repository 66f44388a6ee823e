"""``RunFolder``: the files of one run folder (``--output``), beside the ``Store`` of the cache.

Layout (docs/store.md)::

    results.parquet                            the parts concatenated, in shard order (only once the run finished)
    manifest.json                              the run's record (written by ``runtime.run``)
    parts/part-<part key>.<sha256>.parquet     one shard's rows; sha256 of exactly the file's bytes
    .lock                                      the run holding the folder (``runtime.run_lock``)

Every part and the results are written under a temporary name and renamed into place; every
part is checked against the sha256 in its name when read. A ``RunFolder`` is picklable: Ray
workers write the parts of the shards they run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from artifacts.filehash import sha256_bytes
from artifacts.location import Location, new_writer_id
from artifacts.store import check_bytes, parse_table, table_bytes
from runtime.errors import UsageError
from runtime.run_lock import RunLock

log = logging.getLogger(__name__)

RESULTS = "results.parquet"
MANIFEST = "manifest.json"
PARTS = "parts"
RESULTS_GROUP_ROWS = 1 << 13      # rows of a row group of results.parquet (about: whole parts)
RESULTS_GROUP_BYTES = 16 * 2**20  # or fewer, once the parts gathered hold this many Arrow bytes
PART_RE = re.compile(r"^part-(?P<key>[0-9a-f]{32})\.(?P<sha>[0-9a-f]{64})\.parquet$")


class CorruptPart(Exception):
    """A part whose bytes do not match the checksum in its name (it has been removed)."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


class RunFolder:
    """The run folder at ``where`` (a path, URI or ``Location``)."""

    def __init__(self, where: Location | str | Path):
        self.loc = where if isinstance(where, Location) else Location(where)
        self._writer: tuple[int, str] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_writer": None}  # another process writes under its own id

    @property
    def writer_id(self) -> str:
        """This process's writer id (temporary names carry it: whose a leftover file is)."""
        if self._writer is None or self._writer[0] != os.getpid():
            self._writer = (os.getpid(), new_writer_id())
        return self._writer[1]

    def display(self, rel: str = "") -> str:
        return self.loc.display(rel)

    def lock(self, command: str) -> RunLock:
        return RunLock(self.loc, command=command)

    def remove_temp_files(self) -> int:
        """Remove temporary files left by runs that died (the caller holds the folder's lock,
        so no live run writes here). Returns how many were removed."""
        removed = 0
        for folder in ("", PARTS):
            for f in self.loc.list(folder):
                if f.name.startswith(".") and ".tmp-" in f.name:
                    removed += self.loc.delete(f"{folder}/{f.name}" if folder else f.name)
        return removed

    # -- parts ---------------------------------------------------------------------------------
    def write_part(self, part_key: str, table: pa.Table) -> str:
        """Write one shard's rows atomically; returns the part's name under ``parts/``."""
        data = table_bytes(table)
        name = f"part-{part_key}.{sha256_bytes(data)}.parquet"
        self.loc.write_bytes_atomic(f"{PARTS}/{name}", data, self.writer_id)
        return name

    def parts_by_key(self) -> dict[str, list[str]]:
        """The parts present now: part key -> their names."""
        found: dict[str, list[str]] = {}
        for f in self.loc.list(PARTS):
            m = PART_RE.match(f.name)
            if m:
                found.setdefault(m["key"], []).append(f.name)
        return found

    def read_part(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """A part's rows after checking its bytes. ``FileNotFoundError`` when it is gone;
        ``CorruptPart`` (and the part removed) when its bytes do not match its name."""
        rel = f"{PARTS}/{name}"
        data = self.loc.read_bytes(rel)
        problem = check_bytes(data, PART_RE.match(name)["sha"])
        if problem is not None:
            self.loc.delete(rel)
            raise CorruptPart(self.display(rel), problem)
        return parse_table(data, columns)

    def remove_parts(self) -> None:
        """Every part (``--no-cache``: nothing is reused)."""
        self.loc.delete_dir(PARTS)

    def remove_parts_except(self, keep: set[str]) -> None:
        """Parts of other versions of the graph, and of older layouts."""
        for f in self.loc.list(PARTS):
            if f.name.startswith("part-") and f.name not in keep:
                self.loc.delete(f"{PARTS}/{f.name}")

    # -- results and manifest --------------------------------------------------------------------
    def write_results(self, parts: Iterable[str], each: Callable[[pa.Table], None]) -> dict:
        """Concatenate ``parts`` into results.parquet, streamed part by part so memory stays flat
        however many samples; ``each`` sees every part's table. Parts are gathered into row groups
        of about ``RESULTS_GROUP_ROWS`` rows (or ``RESULTS_GROUP_BYTES``): the writer keeps the
        metadata of every row group until it closes, so one per part would grow with the parts.
        Returns the manifest's record of the file (rows, bytes, sha256)."""
        rows = 0
        pending: list[pa.Table] = []
        with self.loc.atomic_writer(RESULTS, self.writer_id) as sink:
            writer = None
            for name in parts:
                table = self.read_part(name)
                if writer is None:
                    writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
                pending.append(table)
                rows += table.num_rows
                each(table)
                if sum(t.num_rows for t in pending) >= RESULTS_GROUP_ROWS \
                        or sum(t.nbytes for t in pending) >= RESULTS_GROUP_BYTES:
                    writer.write_table(pa.concat_tables(pending), row_group_size=RESULTS_GROUP_ROWS * 4)
                    pending = []
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=RESULTS_GROUP_ROWS * 4)
            writer.close()
        return {"file": RESULTS, "rows": rows, "bytes": sink.size, "sha256": sink.sha256.hexdigest()}

    def remove_results(self) -> None:
        """The last run's results: a run starting here takes them away, so that the folder never
        holds results that its manifest (now this run's) does not describe."""
        self.loc.delete(RESULTS)

    def write_manifest(self, data: bytes) -> None:
        self.loc.write_bytes_atomic(MANIFEST, data, self.writer_id)

    def read_manifest(self) -> dict:
        """The folder's manifest as written (``{}`` when there is none or it is not JSON)."""
        try:
            return json.loads(self.loc.read_bytes(MANIFEST))
        except (FileNotFoundError, ValueError):
            return {}

    def read_results(self) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.loc.read_bytes(RESULTS)))


def finished_manifest(folder: Path) -> dict:
    """The manifest of the run folder ``folder`` (``{}`` without one); ``UsageError`` when it
    says that its run did not finish: that run removed the results of the one before it, and
    has written none of its own yet."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    status = manifest.get("status", "finished")
    if status != "finished":
        raise UsageError(f"{folder}: its run is not finished ({MANIFEST} says '{status}', started "
                         f"{manifest.get('started', '?')}, graph {manifest.get('graph_file', '?')}): it is still "
                         "running or was stopped, and has no results yet; run its command again to finish it, "
                         "or wait for it")
    return manifest
