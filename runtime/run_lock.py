"""One run at a time per output folder: a lock file with a heartbeat.

``OUTPUT/.lock`` holds who runs there (host, pid, command, start) and a heartbeat that a
background thread refreshes every ``HEARTBEAT`` seconds. A second run into the folder stops
with a message naming the holder, or with ``wait`` waits for it. A lock left by a run that
died is taken over: its pid is gone on this host, or its heartbeat is older than ``TTL``
(whatever its pid: a pid can be reused), or it is empty or unreadable and older than
``HEARTBEAT`` (a run killed between creating and writing it; a live run's lock is whole within
that time). Creating the lock is exclusive on local folders (``O_EXCL``); on object stores,
which have neither exclusive creation nor an atomic rename, creating it and taking over a dead
holder's are each done under a claim (``Location.claim``, docs/store.md), so two runs started
in the same instant still cannot both get in.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time

from artifacts.location import HOST, Location, new_writer_id, writer_alive
from runtime.errors import UsageError

log = logging.getLogger(__name__)

LOCK = ".lock"
HEARTBEAT = 15.0
TTL = 120.0


class RunLocked(UsageError):
    """The output folder is held by another run."""


class FolderNotWritable(UsageError):
    """The output folder cannot be created, or its lock cannot be written."""


class RunLock:
    def __init__(self, folder: Location, command: str = ""):
        self.folder = folder
        self.owner = new_writer_id()
        self.command = command
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": HOST, "pid": os.getpid(), "command": self.command,
                           "started": self.started, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict | None:
        try:
            data = self.folder.read_bytes(LOCK)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
            float(holder["heartbeat"])
            return holder
        except (ValueError, TypeError, KeyError):  # empty or cut short: as old as the file
            return {"owner": "?", "unreadable": True, "heartbeat": self._lock_written()}

    def _lock_written(self) -> float:
        """When the lock file was last written (now, if it is gone meanwhile)."""
        return next((f.mtime for f in self.folder.list() if f.name == LOCK), time.time())

    @staticmethod
    def _dead(holder: dict) -> bool:
        age = time.time() - float(holder["heartbeat"])
        if holder.get("unreadable"):
            return age > HEARTBEAT
        if age > TTL:  # no heartbeat for so long: gone, even if its pid now names another process
            return True
        return writer_alive(str(holder.get("owner", ""))) is False

    def _create(self) -> bool:
        """Create the lock (and the folder); False when another run holds it."""
        try:
            self.folder.makedirs()
            return self.folder.create_exclusive(LOCK, self._record())
        except OSError as exc:
            raise FolderNotWritable(f"--output {self.folder.display()}: cannot write there ({exc.strerror or exc}"
                                    f"{': ' + str(exc.filename) if exc.filename else ''}); choose an output "
                                    "folder you can create and write") from None

    def acquire(self, wait: bool = False, poll: float = 2.0) -> None:
        announced = False
        while True:
            if self._create():
                break
            holder = self._holder()
            if holder is None:  # removed meanwhile, or another run was creating it too
                time.sleep(random.uniform(0.01, 0.2))
                continue
            if self._dead(holder):
                log.warning("warning: %s was locked by a run that is gone (pid %s on %s); taking it over",
                            self.folder.display(), holder.get("pid"), holder.get("host"))
                self._remove_if_still(holder)
                continue
            if not wait:
                raise RunLocked(describe_holder(self.folder, holder)
                                + "; wait for it to finish, choose another --output, or pass --wait to wait for it")
            if not announced:
                log.warning("waiting: %s", describe_holder(self.folder, holder))
                announced = True
            time.sleep(poll)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _remove_if_still(self, holder: dict) -> None:
        """Remove the lock if ``holder`` still holds it. On object stores the check and the
        removal are one claim, so a run that took the lock over meanwhile keeps it."""
        if self.folder.local:
            if self._holder() == holder:
                self.folder.delete(LOCK)
            return
        with self.folder.claim(LOCK) as sole:
            if sole and self._holder() == holder:
                self.folder.delete(LOCK)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                holder = self._holder()
            except OSError as exc:  # the store did not answer (after its retries): try next beat
                log.warning("warning: cannot read the lock of %s: %s", self.folder.display(), exc)
                continue
            if holder is None or holder.get("owner") != self.owner:
                self.lost = True
                log.warning("warning: the lock of %s was taken by another run", self.folder.display())
                return
            try:
                self.folder.write_bytes_atomic(LOCK, self._record(), self.owner)
            except OSError as exc:
                log.warning("warning: cannot refresh the lock of %s: %s", self.folder.display(), exc)

    def release(self) -> None:
        if self._thread is None:  # never acquired
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        holder = self._holder()
        if holder is not None and holder.get("owner") == self.owner:
            self.folder.delete(LOCK)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(folder: Location, holder: dict) -> str:
    if holder.get("unreadable"):
        return (f"{folder.display()} has an unreadable lock ({LOCK}, written "
                f"{time.strftime('%H:%M:%S', time.localtime(holder['heartbeat']))}): a run is starting there, or one "
                f"was killed as it started; it counts as stale {HEARTBEAT:.0f} s after it was written")
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    command = f", command: {holder['command']}" if holder.get("command") else ""
    return (f"{folder.display()} is in use by another run (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {when}{command})")
