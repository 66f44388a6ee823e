"""A folder on any filesystem pyarrow understands: a local path or a URI.

``Location("runs/x")``, ``Location("file:///data/cache")``, ``Location("s3://bucket/cache")``,
``gs://`` and ``hdfs://`` all work the same way. Local folders (plain paths and ``file://``)
use the operating system directly: ``fsync`` before an atomic rename, exclusive creation,
modification times as "last used". Other filesystems go through ``pyarrow.fs``: objects are
written under a temporary name and moved into place (on object stores a move is a copy, and
the destination still appears whole or not at all).

Temporary names start with a dot and carry the writer's id (``host-pid-random``), so listings
skip them and a cleaner can tell whose they are (:func:`writer_alive`).

Object stores have no exclusive creation and no atomic rename; :meth:`Location.claim` gives the
few writers that must not overlap (the run lock) a mutual exclusion built from what they do
have, strongly consistent writes and listings (docs/store.md, "Filesystems").
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")
HOST = socket.gethostname()
# A claim (Location.claim) lives for a few requests; one older than this was left by a process
# that died holding it.
CLAIM_STALE = 30.0
OBJECT_READ = 1 << 23  # bytes of an object streamed per request (object_stream)


def new_writer_id() -> str:
    """``host-pid-random``: unique per process, and says where and who wrote a temp file."""
    return f"{HOST.replace('-', '_')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def writer_alive(writer_id: str) -> bool | None:
    """True / False when the writer ran on this host (its pid is checked), None elsewhere."""
    host, _, rest = writer_id.partition("-")
    pid_text = rest.partition("-")[0]
    if host != HOST.replace("-", "_") or not pid_text.isdigit():
        return None
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def retried(read: Callable[[], T], attempts: int = 4, pause: float = 0.5) -> T:
    """``read()``, tried again after an I/O error other than a missing file.

    pyarrow's S3 client retries throttling and 5xx answers itself, except on a read smaller
    than the error's XML body (a lock file, a 4-byte footer check): it writes the body into the
    caller's buffer, overflows it and reports INTERNAL_FAILURE, which it does not retry."""
    for attempt in range(attempts):
        try:
            return read()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as exc:
            if attempt == attempts - 1:
                raise
            log.debug("retrying a read after %s", exc)
            time.sleep(pause * 2 ** attempt)
    raise AssertionError("unreachable")


class HashingWriter(io.RawIOBase):
    """A write-only file that passes bytes on and keeps their sha256 and count."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.target.write(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


@dataclass(frozen=True)
class FileStat:
    name: str       # relative to the listed folder
    size: int
    mtime: float    # seconds since the epoch


class Location:
    """A folder given as a path or URI; every method takes paths relative to it ('a/b.txt')."""

    def __init__(self, where: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
        text = os.fspath(where)
        self.text = text
        if filesystem is not None:  # an explicit pyarrow filesystem (tests use the mock one)
            self.fs, self.root = filesystem, text.rstrip("/")
        elif "://" in text:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(text)
            except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"{text}: not a filesystem URI pyarrow can open ({exc})") from None
            self.root = self.root.rstrip("/")
        else:
            self.fs, self.root = None, str(Path(text).absolute())
        self.local = self.fs is None or (isinstance(self.fs, pafs.LocalFileSystem) and filesystem is None)
        if self.local:
            self.fs = None

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Location({self.text!r})"

    # -- paths -------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The full path of ``rel`` (an OS path for local folders, the filesystem's otherwise)."""
        if not rel:
            return self.root
        return os.path.join(self.root, *rel.split("/")) if self.local else f"{self.root}/{rel}"

    def local_path(self, rel: str = "") -> Path | None:
        return Path(self.path(rel)) if self.local else None

    def display(self, rel: str = "") -> str:
        """A name for messages: the path or the URI of ``rel``."""
        if self.local or "://" not in self.text:
            return self.path(rel)
        return self.text.rstrip("/") + ("/" + rel if rel else "")

    # -- reading -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        if self.local:
            return os.path.exists(self.path(rel))
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes; ``FileNotFoundError`` when it is not there."""
        if self.local:
            with open(self.path(rel), "rb") as fh:
                return fh.read()

        def read() -> bytes:
            info = self.fs.get_file_info(self.path(rel))
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(errno.ENOENT, "no such file", self.display(rel))
            with self.fs.open_input_stream(self.path(rel)) as fh:
                return fh.read()

        return retried(read)

    def read_tail(self, rel: str, n: int) -> bytes:
        if self.local:
            with open(self.path(rel), "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.seek(max(0, size - n))
                return fh.read()

        def read() -> bytes:
            with self.fs.open_input_file(self.path(rel)) as fh:
                size = fh.size()
                fh.seek(max(0, size - n))
                return fh.read()

        return retried(read)

    def list(self, rel: str = "") -> list[FileStat]:
        """Plain files directly in folder ``rel`` (none when it does not exist)."""
        out = []
        if self.local:
            try:
                with os.scandir(self.path(rel)) as it:
                    for e in it:
                        try:
                            if e.is_file():
                                st = e.stat()
                                out.append(FileStat(e.name, st.st_size, st.st_mtime))
                        except FileNotFoundError:
                            continue
            except (FileNotFoundError, NotADirectoryError):
                return []
            return out
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                out.append(FileStat(PurePosixPath(info.path).name, info.size or 0, mtime))
        return out

    def list_dirs(self, rel: str = "") -> list[str]:
        if self.local:
            try:
                with os.scandir(self.path(rel)) as it:
                    return sorted(e.name for e in it if e.is_dir())
            except (FileNotFoundError, NotADirectoryError):
                return []
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(PurePosixPath(i.path).name for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.Directory)

    def is_file(self) -> bool:
        if self.local:
            return os.path.isfile(self.root)
        return self.fs.get_file_info(self.root).type == pafs.FileType.File

    # -- writing -----------------------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)
        else:
            self.fs.create_dir(self.path(rel), recursive=True)

    def temp_name(self, rel: str, writer_id: str) -> str:
        head, _, name = rel.rpartition("/")
        temp = f".{name}.tmp-{writer_id}-{uuid.uuid4().hex[:6]}"
        return f"{head}/{temp}" if head else temp

    def write_bytes_atomic(self, rel: str, data: bytes, writer_id: str) -> None:
        """Write ``data`` to ``rel`` so that readers see the old file or the whole new one."""
        head = rel.rpartition("/")[0]
        self.makedirs(head)
        temp = self.temp_name(rel, writer_id)
        try:
            if self.local:
                with open(self.path(temp), "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(self.path(temp), self.path(rel))
            else:
                with self.fs.open_output_stream(self.path(temp)) as fh:
                    fh.write(data)
                self.fs.move(self.path(temp), self.path(rel))
        finally:
            self.delete(temp)

    @contextmanager
    def atomic_writer(self, rel: str, writer_id: str) -> Iterator[HashingWriter]:
        """A file to stream into; it appears at ``rel`` whole when the block ends without an
        error (and not at all otherwise). The writer holds the bytes' sha256 and size."""
        self.makedirs(rel.rpartition("/")[0])
        temp = self.temp_name(rel, writer_id)
        fh = open(self.path(temp), "wb") if self.local else self.fs.open_output_stream(self.path(temp))
        try:
            writer = HashingWriter(fh)
            yield writer
            fh.flush()
            if self.local:
                os.fsync(fh.fileno())
            fh.close()
            if self.local:
                os.replace(self.path(temp), self.path(rel))
            else:
                self.fs.move(self.path(temp), self.path(rel))
        finally:
            if not fh.closed:
                fh.close()
            self.delete(temp)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data`` unless it exists; True when this call created it (False
        also when another process was creating it at the same moment: try again). Exclusive
        creation on local folders; elsewhere a check and a write under :meth:`claim`."""
        if self.local:
            self.makedirs(rel.rpartition("/")[0])
            try:
                fd = os.open(self.path(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        with self.claim(rel) as sole:
            if not sole or self.exists(rel):
                return False
            self.write_bytes_atomic(rel, data, "lock")
            return True

    @contextmanager
    def claim(self, rel: str) -> Iterator[bool]:
        """A short mutual exclusion among processes that contend for ``rel`` on a filesystem
        without exclusive creation; yields whether this process is the only claimant.

        Each contender writes its own claim object (``<rel>.claim-<writer id>``) and then lists
        the claims. Writes and listings are strongly consistent (S3 since December 2020, GCS),
        so of two contenders the later lister always sees the earlier one's claim: at most one
        of them sees none but its own (both may see both, and both back off: the caller
        retries after a random pause). A claim is
        removed when the block ends; one older than ``CLAIM_STALE`` s, or whose writer is
        gone from this host, was left by a dead process and does not count."""
        head, _, name = rel.rpartition("/")
        prefix = f"{name}.claim-"
        mine = f"{prefix}{new_writer_id()}"
        own = f"{head}/{mine}" if head else mine
        self.makedirs(head)
        with (open(self.path(own), "wb") if self.local else self.fs.open_output_stream(self.path(own))):
            pass  # an empty object: whole or absent, no temporary name needed
        try:
            now = time.time()
            others = [f for f in self.list(head) if f.name.startswith(prefix) and f.name != mine
                      and now - f.mtime < CLAIM_STALE and writer_alive(f.name[len(prefix):]) is not False]
            yield not others
        finally:
            self.delete(own)

    def delete(self, rel: str) -> bool:
        """Remove a file; False when it was not there."""
        try:
            if self.local:
                os.unlink(self.path(rel))
            else:
                if self.fs.get_file_info(self.path(rel)).type == pafs.FileType.NotFound:
                    return False
                self.fs.delete_file(self.path(rel))
            return True
        except FileNotFoundError:
            return False

    def delete_dir(self, rel: str) -> None:
        if self.local:
            import shutil

            shutil.rmtree(self.path(rel), ignore_errors=True)
        elif self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))

    def touch(self, rel: str) -> None:
        """Mark as used now (local folders only: objects in a store keep their creation time)."""
        if self.local:
            try:
                os.utime(self.path(rel), None)
            except OSError:
                pass


@dataclass(frozen=True)
class Probe:
    """A small file written in a folder for other processes (Ray workers on other nodes) to look
    for: one that cannot see it cannot see the folder, and would write where nobody looks."""

    loc: Location
    rel: str

    @classmethod
    def place(cls, loc: Location, writer_id: str) -> "Probe":
        rel = f".probe-{writer_id}"
        loc.write_bytes_atomic(rel, b"can you see me?", writer_id)
        return cls(loc, rel)

    def seen(self) -> bool:
        return self.loc.exists(self.rel)

    def remove(self) -> None:
        self.loc.delete(self.rel)


# -- single objects given by URI (dataset files in a bucket) -----------------------------------

def is_uri(path: str) -> bool:
    """Whether ``path`` names a file by URI (``s3://bucket/key``) rather than a local path."""
    return "://" in path and not path.startswith("file://")


def _open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of ``uri``. Opening an ``s3://`` URI without a region asks the
    store for the bucket's: an OSError then means the store did not answer, not a bad URI, and
    passes on as one (an image's row then fails as transient, to be retried)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as exc:  # pyarrow's ArrowInvalid: a scheme or option it does not know
        raise ValueError(f"{uri}: not a URI pyarrow can open ({exc})") from None


def object_bytes(uri: str) -> bytes:
    """The bytes of the file at ``uri``; ``FileNotFoundError`` when there is none."""
    fs, path = _open_uri(uri)

    def read() -> bytes:
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(errno.ENOENT, "no such object", uri)
        with fs.open_input_stream(path) as fh:
            return fh.read()

    return retried(read)


def object_stream(uri: str):
    """A stream of the bytes of the object at ``uri``, read ``OBJECT_READ`` bytes (one ranged
    GET) at a time, so a big file (a question file) is never held whole;
    ``FileNotFoundError`` when there is none."""
    fs, path = _open_uri(uri)
    return retried(lambda: fs.open_input_stream(path, buffer_size=OBJECT_READ))


def object_file(uri: str):
    """The object at ``uri`` as a random-access file (each read a ranged GET): what a Parquet
    reader needs to fetch the footer and the row groups it reads, not the whole object;
    ``FileNotFoundError`` when there is none."""
    fs, path = _open_uri(uri)
    return retried(lambda: fs.open_input_file(path))


def object_type(uri: str) -> pafs.FileType:
    """What ``uri`` names, from metadata alone: an object (``File``), a prefix with objects
    under it (``Directory``, as a folder of images is) or nothing (``NotFound``)."""
    fs, path = _open_uri(uri)
    return retried(lambda: fs.get_file_info(path.rstrip("/"))).type


def object_version(uri: str) -> tuple[int, float] | None:
    """(size, modification time) of the object at ``uri`` from its metadata alone (no
    download), or None when there is none. An object is rewritten whole, never in place, so a
    new version has a new modification time."""
    fs, path = _open_uri(uri)
    info = retried(lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        return None
    return info.size or 0, info.mtime.timestamp() if info.mtime is not None else 0.0
