"""Full content hashes of files (weights, images), computed once per file version.

A file's sha256 is remembered in a small SQLite table keyed by its real path, size,
modification time, inode and change time (ns), so a multi-GB checkpoint or a folder of 40k
images is read once per machine, and any change to the file hashes it again. The change time
is what makes that hold: a program can put the modification time back after rewriting a file
in place (``os.utime``, ``touch -d``, ``cp -p``, ``rsync -t``), but every write or metadata
change sets the change time to the clock's now, and no user call can set it. The memo lives
in ``$PNPVQA_HASH_MEMO`` (default ``~/.cache/pnpvqa-runtime/file-hashes.sqlite3``; ``off``
keeps it in memory only). A memo that cannot be opened is not an error: hashes are then
computed every time.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

MEMO_ENV = "PNPVQA_HASH_MEMO"
CHUNK = 1 << 22
LOCAL_ENTRIES = 1 << 12  # versions remembered in memory beside SQLite
TABLES = ("hashes", "syntax")
# the tables' names in SQLite: version 2 keys by the change time too; a memo file written before
# keeps its version-1 tables, which nothing reads
SCHEMA = "_v2"


def _memo_path() -> Path | None:
    value = os.environ.get(MEMO_ENV)
    if value == "off":
        return None
    if value:
        return Path(value)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pnpvqa-runtime" / "file-hashes.sqlite3"


class _Memo:
    """(real path, size, mtime_ns, inode, ctime_ns) -> a text value (a file's sha256; in ``runtime.code_identity``
    the hash and imports of a module's syntax tree), per table, in SQLite when possible, else in
    memory."""

    def __init__(self) -> None:
        self.local: dict[tuple, str] = {}
        self.lock = threading.Lock()
        self.db: sqlite3.Connection | None = None
        self.opened_for: Path | None = None

    def _connect(self) -> sqlite3.Connection | None:
        path = _memo_path()
        if path != self.opened_for:
            self.opened_for, self.db = path, None
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    db = sqlite3.connect(str(path), timeout=10, check_same_thread=False)
                    for table in TABLES:
                        db.execute(f"CREATE TABLE IF NOT EXISTS {table}{SCHEMA} (path TEXT, size INTEGER, "
                                   "mtime_ns INTEGER, inode INTEGER, ctime_ns INTEGER, sha256 TEXT, "
                                   "PRIMARY KEY (path, size, mtime_ns, inode, ctime_ns))")
                    db.commit()
                    self.db = db
                except (OSError, sqlite3.Error):
                    self.db = None
        return self.db

    def get(self, ident: tuple, table: str = "hashes") -> str | None:
        with self.lock:
            if (table, ident) in self.local:
                return self.local[(table, ident)]
            db = self._connect()
            if db is None:
                return None
            try:
                row = db.execute(f"SELECT sha256 FROM {table}{SCHEMA} WHERE path=? AND size=? AND mtime_ns=? "
                                 "AND inode=? AND ctime_ns=?", ident).fetchone()
            except sqlite3.Error:
                return None
            if row:
                self.local[(table, ident)] = row[0]
            return row[0] if row else None

    def put(self, items: list[tuple[tuple, str]], table: str = "hashes") -> None:
        with self.lock:
            if self.db is not None and len(self.local) > LOCAL_ENTRIES:
                self.local.clear()  # SQLite keeps them: memory stays flat over millions of images
            for ident, value in items:
                self.local[(table, ident)] = value
            db = self._connect()
            if db is None or not items:
                return
            try:
                db.executemany(f"INSERT OR REPLACE INTO {table}{SCHEMA} VALUES (?, ?, ?, ?, ?, ?)",
                               [(*ident, value) for ident, value in items])
                db.commit()
            except sqlite3.Error:
                pass


_MEMO = _Memo()


def file_version(path: str | os.PathLike) -> tuple:
    """What the memo knows a version of the file by: (real path, size, mtime_ns, inode, ctime_ns)."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def remembered(path: str | os.PathLike, table: str, compute) -> str:
    """``compute(path)`` (a text), remembered per file version in ``table`` of the memo."""
    ident = file_version(Path(path))
    value = _MEMO.get(ident, table)
    if value is None:
        value = compute(path)
        _MEMO.put([(ident, value)], table)
    return value


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the whole file (remembered per file version, see the module doc)."""
    return hash_files([path])[0]  # type: ignore[return-value]


def hash_files(paths: Iterable[str | os.PathLike], threads: int = 4, missing_ok: bool = False) -> list[str | None]:
    """sha256 of each file, reading only files whose version is not in the memo (in threads:
    hashlib releases the GIL). A file that cannot be read raises ``OSError``, or gives ``None``
    with ``missing_ok``."""
    paths = [os.fspath(p) for p in paths]  # not Path: pathlib interns every file name for good
    idents: list[tuple | None] = []
    for p in paths:
        try:
            idents.append(file_version(p))
        except OSError:
            if not missing_ok:
                raise
            idents.append(None)
    digests: list[str | None] = [None if i is None else _MEMO.get(i) for i in idents]
    todo = [k for k, d in enumerate(digests) if d is None and idents[k] is not None]

    def compute(k: int) -> str | None:
        try:
            return _hash_file(paths[k])
        except OSError:
            if not missing_ok:
                raise
            return None

    if todo:
        if len(todo) == 1:
            computed = [compute(todo[0])]
        else:
            with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
                computed = list(pool.map(compute, todo))
        for k, digest in zip(todo, computed):
            digests[k] = digest
        _MEMO.put([(idents[k], digests[k]) for k in todo if digests[k] is not None])
    return digests
