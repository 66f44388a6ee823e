"""Dataset records as the runtime takes them: field types checked one record at a time, and
the whole selection checked before a run.

A record with a bad value (a question that is a number, answers that are not a list, an
image reference of the wrong type, or what its source flagged: undecodable base64, bad JSON in
a CSV cell, bytes that are not UTF-8, a JSONL line that is no JSON object, a missing question)
becomes an error row with a message naming where it
came from and the field; the run goes on. What makes the selection as a whole wrong stops the
run before any work (exit 2), naming the ids: duplicate sample ids, an image id that names two
different images, ``--ids`` that match nothing, a file a source cannot read at all.

Sources put ``_where`` (e.g. ``"m.jsonl, line 7"``) and, for problems only they can see,
``_error`` into a record; both are private keys, not columns.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from runtime.errors import UsageError
from sources.base import ERROR, WHERE

log = logging.getLogger(__name__)

TEXT_FIELDS = ("question", "question_type", "answer_type", "image_path")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """Normalise the types of one record in place (ids that are numbers become text, answers
    become strings); a value that cannot be taken is set to None and the first such problem is
    recorded in ``record["_error"]``. A ``sample_id`` that is neither text nor a number raises
    ``UsageError`` (a row needs an id)."""
    where = record.get(WHERE) or "a record"

    def fail(name: str, value: Any, expected: str) -> None:
        record[name] = None
        record.setdefault(ERROR, f"{where}: {name} must be {expected}, got {_describe(value)}")

    sid = record.get("sample_id")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise UsageError(f"{where}: sample_id must be text or a whole number, got {_describe(sid)}; every record "
                         "needs an id (fix the dataset file)")
    record["sample_id"] = str(sid)
    image_id = record.get("image_id")
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        record["image_id"] = str(image_id)
    elif not isinstance(image_id, str) or not image_id:
        record["image_id"] = f"(no valid image_id: sample {record['sample_id']})"
        record.setdefault(ERROR, f"{where}: image_id must be text or a whole number, got {_describe(image_id)}")
    for name in TEXT_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            fail(name, value, "text")
    blob = record.get("image_bytes")
    if blob is not None and not isinstance(blob, (bytes, bytearray, memoryview)):
        fail("image_bytes", blob, "bytes")
    answers = record.get("answers")
    if answers is not None:
        if isinstance(answers, (list, tuple)) and all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                      for a in answers):
            record["answers"] = [a if isinstance(a, str) else str(a) for a in answers]
        else:
            fail("answers", answers, "a list of answers (text)")
    return record


def clean_records(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for record in records:
        yield clean_record(record)


@dataclass
class DatasetCheck:
    """What a pass over the selected records found."""

    samples: int = 0
    images: int = 0
    record_errors: int = 0
    missing_ids: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] | None = None  # the records themselves, when they fit in ``keep_bytes``


def _image_token(record: dict[str, Any]) -> Any:
    blob = record.get("image_bytes")
    if blob:
        return ("bytes", hashlib.sha1(bytes(blob)).hexdigest())
    return ("path", record.get("image_path"))


def _record_bytes(record: dict[str, Any]) -> int:
    size = 512
    for value in record.values():
        if isinstance(value, (bytes, bytearray, str)):
            size += len(value)
        elif hasattr(value, "nbytes"):
            size += int(value.nbytes)
    return size


def check_dataset(read: Callable[[], Iterable[dict[str, Any]]], ids: set[str] | None = None,
                  source: str = "the dataset", max_listed: int = 5, keep_bytes: int = 0) -> DatasetCheck:
    """One pass over the selected records (``read()``) before a run: every record's types (bad
    ones are counted; they become error rows), then the selection as a whole (``UsageError`` for
    duplicate sample ids, an image id naming two images, ``ids`` that match nothing). The
    records are kept (``check.records``) while they hold less than ``keep_bytes``, so a small
    dataset is not read (or rendered) twice.

    What the pass holds is 24 bytes per sample (hashes of ids and images, in arrays), whatever
    the records weigh; only when two hashes meet is the selection read again, to name them."""
    check = DatasetCheck()
    kept: list[dict[str, Any]] | None = [] if keep_bytes > 0 else None
    kept_bytes = 0
    sample_hashes, image_hashes, token_hashes = array("q"), array("q"), array("q")
    previous_image: tuple | None = None
    wanted = set(ids) if ids is not None else None
    for record in _readable(read(), source):
        check.samples += 1
        if kept is not None:
            kept_bytes += _record_bytes(record)
            kept = kept if kept_bytes <= keep_bytes else None
            if kept is not None:
                kept.append(record)
        check.record_errors += ERROR in record
        sample_hashes.append(hash(record["sample_id"]))
        if wanted is not None:
            wanted.discard(record["sample_id"])
        if ERROR in record:
            continue
        image = (record["image_id"], _image_token(record))
        if image != previous_image:  # an image's questions come together: one entry per image, mostly
            previous_image = image
            image_hashes.append(hash(image[0]))
            token_hashes.append(hash(image[1]))
    problems = []
    if _repeated(np.frombuffer(sample_hashes, dtype=np.int64)).size:
        duplicates = _duplicates(_readable(read(), source), max_listed)
        if duplicates:
            problems.append(duplicates)
    images = np.frombuffer(image_hashes, dtype=np.int64)
    tokens = np.frombuffer(token_hashes, dtype=np.int64)
    if _conflicting(images, tokens):
        conflicts = _conflicts(_readable(read(), source), max_listed)
        if conflicts:
            problems.append(conflicts)
    if ids is not None:
        check.missing_ids = sorted(wanted)
        if len(check.missing_ids) == len(ids):
            shown = ", ".join(sorted(ids)[:max_listed])
            problems.append(f"--ids: none of the {len(ids)} ids ({shown}{', ...' if len(ids) > max_listed else ''}) "
                            "is a sample id of the dataset")
        elif check.missing_ids:
            log.warning("warning: --ids: %d of %d ids are not in the dataset (%s%s)", len(check.missing_ids),
                        len(ids), ", ".join(check.missing_ids[:max_listed]),
                        ", ..." if len(check.missing_ids) > max_listed else "")
    if problems:
        raise UsageError(f"{source}: " + "; ".join(problems))
    check.images = np.unique(images).size
    check.records = kept
    return check


def _readable(records: Iterable[dict[str, Any]], source: str) -> Iterator[dict[str, Any]]:
    """``records`` cleaned (``clean_record``); a source that cannot be read is a ``UsageError``."""
    try:
        for record in records:
            yield clean_record(record)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{source} cannot be read: {type(exc).__name__}: {exc}") from None


def _repeated(values: np.ndarray) -> np.ndarray:
    """The values found more than once."""
    ordered = np.sort(values)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _conflicting(images: np.ndarray, tokens: np.ndarray) -> bool:
    """Whether an image hash comes with two token hashes."""
    pairs = np.unique(np.stack([images, tokens], axis=1), axis=0) if images.size else images.reshape(0, 2)
    return _repeated(pairs[:, 0]).size > 0


def _duplicates(records: Iterable[dict[str, Any]], max_listed: int) -> str | None:
    """The message naming duplicate sample ids (second pass: only when hashes repeated)."""
    first_seen: dict[str, str] = {}
    duplicates: list[str] = []
    for n, record in enumerate(records):
        sid, where = record["sample_id"], record.get(WHERE) or f"record {n}"
        if sid not in first_seen:
            first_seen[sid] = where
        else:
            duplicates.append(f"{sid!r} ({first_seen[sid]} and {where})" if len(duplicates) < max_listed else "")
    if not duplicates:
        return None  # hashes of different ids met
    listed = ", ".join(d for d in duplicates if d)
    return (f"{len(duplicates)} duplicate sample ids: {listed}{', ...' if len(duplicates) > max_listed else ''}; "
            "a sample id must name one (image, question) pair")


def _conflicts(records: Iterable[dict[str, Any]], max_listed: int) -> str | None:
    """The message naming image ids of more than one image (second pass, as ``_duplicates``)."""
    images: dict[str, tuple[Any, str]] = {}
    conflicts: list[str] = []
    for n, record in enumerate(records):
        if ERROR in record:
            continue
        where, token = record.get(WHERE) or f"record {n}", _image_token(record)
        known = images.setdefault(record["image_id"], (token, where))
        if known[0] != token:
            conflicts.append(f"{record['image_id']!r} ({known[1]}: {_image_text(known[0])}; "
                             f"{where}: {_image_text(token)})" if len(conflicts) < max_listed else "")
    if not conflicts:
        return None
    listed = "; ".join(c for c in conflicts if c)
    return (f"{len(conflicts)} image ids name more than one image: {listed}{'; ...' if len(conflicts) > max_listed else ''}; "
            "an image id must name one image (its results are computed once and shared by its questions)")


def _image_text(token: tuple) -> str:
    kind, value = token
    return f"image bytes sha1 {value[:12]}" if kind == "bytes" else f"file {value}"
