"""VQAv2 / OK-VQA and GQA question files with an image folder.

The files and the folder are local paths or URIs (``s3://bucket/vqa/questions.json``,
``s3://bucket/vqa/val2014``). A question file is read once per version into an index
(``sources.question_index``: Arrow columns in a file, read a batch at a time), so a run holds a
batch of records, not the file; images stay where they are and are passed on as paths or URIs,
read by the workers that decode them. Samples are grouped by image, images in order of first
appearance in the question file.
A missing image file is not an error here: the image loading stage turns it into an error
row (a warning names the first one, to catch a wrong ``image_pattern`` early). So is an entry
without its image id or question, or (GQA) one that is not an object; a VQAv2 question without
``question_id`` stops the run (its row would have no id).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import string
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import Field, field_validator

from artifacts.location import is_uri, object_type, object_version
from sources.base import BASE_COLUMNS, ERROR, SOURCES, WHERE, Source, SourceColumn, SourceParams
from sources.json_stream import array_entries, object_items
from sources.question_index import QuestionIndex, grouped_order, mapped, open_index, write_in_order, write_rows

log = logging.getLogger(__name__)

VQA_IMAGE_PATTERNS = ("COCO_{data_subtype}_{image_id:012d}.jpg", "{image_id:012d}.jpg")


class VQAv2Params(SourceParams):
    path_params = ("questions", "annotations", "images")
    questions: str = Field(
        ..., description="VQAv2 / OK-VQA questions JSON (OpenEnded_mscoco_*_questions.json), a path or a URI")
    annotations: str | None = Field(
        None, description="annotations JSON with the human answers (optional), a path or a URI")
    images: str = Field(..., description="folder of the COCO images, or a URI prefix (s3://bucket/val2014)")
    image_pattern: str | None = Field(
        None, description="image file name with {image_id} and {data_subtype}; default: "
        "COCO_{data_subtype}_{image_id:012d}.jpg, else {image_id:012d}.jpg")

    @field_validator("image_pattern")
    @classmethod
    def _pattern_fits(cls, pattern: str | None) -> str | None:
        return pattern and checked_pattern(pattern, image_id=42, data_subtype="val2014")


class GQAParams(SourceParams):
    path_params = ("questions", "images")
    questions: str = Field(
        ..., description="GQA questions JSON (e.g. testdev_balanced_questions.json), a path or a URI")
    images: str = Field(..., description="folder of the GQA images, or a URI prefix (s3://bucket/gqa/images)")
    image_pattern: str = Field("{image_id}.jpg", description="image file name with {image_id}")

    @field_validator("image_pattern")
    @classmethod
    def _pattern_fits(cls, pattern: str) -> str:
        return checked_pattern(pattern, image_id="2354786")


def checked_pattern(pattern: str, **example: Any) -> str:
    """``pattern`` if it names ``{image_id}`` and formats with the fields of ``example`` (the
    values a dataset gives), else a ``ValueError`` saying why: found at validation, not by
    the first sample, and never every question mapped to one file."""
    try:
        pattern.format(**example)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{pattern!r} cannot name an image file ({type(exc).__name__}: {exc}); its fields can be "
                         f"{', '.join('{' + name + '}' for name in example)}") from None
    if "image_id" not in {field for _, field, _, _ in string.Formatter().parse(pattern) if field}:
        raise ValueError(f"{pattern!r} has no {{image_id}}: every question would read the same file")
    return pattern


@SOURCES.add
class VQAv2Source(Source):
    """VQAv2 or OK-VQA (same format): questions JSON, optional annotations, COCO image folder.

    ``answers`` are the ten human answers when annotations are given, else null.
    """

    name = "vqav2"
    Params = VQAv2Params
    params: VQAv2Params

    def columns(self) -> dict[str, SourceColumn]:
        return {
            **BASE_COLUMNS,
            "answer_type": SourceColumn(
                pa.string(), 'VQAv2 answer type ("yes/no", "number", "other"); null if unknown'),
        }

    def problems(self) -> list[tuple[str, str]]:
        p = self.params
        found = _missing_file("questions", p.questions, "the VQAv2 questions JSON")
        if p.annotations is not None:
            found += _missing_file(
                "annotations", p.annotations, "the VQAv2 annotations JSON (or leave it out)")
        return found + _missing_dir("images", p.images)

    @functools.cached_property
    def _index(self) -> QuestionIndex:
        p = self.params
        files = [p.questions] + ([p.annotations] if p.annotations is not None else [])
        return open_index("vqav2", files, self._build_index)

    def _build_index(self, scratch: Path, path: Path) -> None:
        """Questions and annotations streamed to columns, then joined in the order of the samples."""
        p = self.params
        head: dict[str, Any] = {}
        write_rows(scratch / "questions.arrow", VQA_QUESTION_ROWS, _vqa_question_rows(p.questions, head))
        questions = mapped(scratch / "questions.arrow")
        extra = None
        if p.annotations is not None:
            write_rows(scratch / "annotations.arrow", VQA_ANNOTATION_ROWS, _vqa_annotation_rows(p.annotations))
            annotations = mapped(scratch / "annotations.arrow")
            keys = annotations.column("key").combine_chunks()

            def extra(rows: pa.Table) -> dict[str, pa.Array]:
                found = pc.index_in(rows.column("qkey"), value_set=keys)
                return {name: annotations.column(name).take(found) for name in VQA_ANNOTATION_ROWS.names[1:]}
        write_in_order(path, questions, grouped_order(questions), extra,
                       {"data_subtype": json.dumps(head.get("data_subtype"))})

    def count(self) -> int:
        return self._index.rows

    def _patterns(self) -> tuple[Any, tuple[str, ...]]:
        """The file's data_subtype and the image file names to try."""
        p = self.params
        subtype = json.loads(self._index.metadata.get("data_subtype", "null"))
        if p.image_pattern:
            if subtype is None and "{data_subtype" in p.image_pattern:
                raise ValueError(
                    f"{p.questions} has no data_subtype, but image_pattern uses {{data_subtype}}")
            return subtype, (p.image_pattern,)
        return subtype, VQA_IMAGE_PATTERNS if subtype else VQA_IMAGE_PATTERNS[1:]

    def vouched(self, limit: int | None) -> int | None:
        self._patterns()  # its problem stops the run before work, as the dataset check would
        return self._index.vouched(limit)

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        p = self.params
        index = self._index
        subtype, patterns = self._patterns()
        images = _image_folder(p.images)
        group = None
        for row in index:
            q = json.loads(row["odd"]) if row["odd"] is not None else \
                {"question_id": row["sample_id"], "image_id": _untyped(row["group"]), "question": row["question"]}
            if row["group"] != group:
                group, image_id = row["group"], q.get("image_id")
                error = image_path = None
                number = int(image_id) if isinstance(image_id, str) and image_id.isdigit() else image_id
                if isinstance(number, int) and not isinstance(number, bool):
                    image_path = images.path([pat.format(image_id=number, data_subtype=subtype) for pat in patterns])
                else:
                    error = f"image_id must be a COCO image number, got {type(image_id).__name__} {image_id!r:.40}"
            where = f"{p.questions}, questions[{row['row']}]"
            ann = _vqa_annotation(row)
            human, answers_error = ann.get("answers"), None  # this question's alone: not the image's
            if human is not None and not (isinstance(human, list) and all(isinstance(a, dict) and "answer" in a
                                                                          for a in human)):
                human, answers_error = None, "its annotation's answers are not a list of {answer: ...}"
            record = {
                "sample_id": str(q["question_id"]),
                "image_id": str(image_id) if "image_id" in q else None,
                "question": q.get("question"),
                "image_path": image_path,
                "image_bytes": None,
                "answers": None if human is None else [a["answer"] for a in human],
                "question_type": ann.get("question_type"),
                "answer_type": ann.get("answer_type"),
                WHERE: where,
            }
            problem = entry_problem(q, ("image_id", "question")) or error or answers_error
            if problem:
                record[ERROR] = f"{where}: {problem}"
            yield record


# the index's columns: plain entries as values; any other entry (a wrong type somewhere, a field
# missing) as its JSON in ``odd``, read back as it was (it becomes an error row, or its own case)
VQA_QUESTION_ROWS = pa.schema([("row", pa.int64()), ("sample_id", pa.string()), ("qkey", pa.string()),
                               ("group", pa.string()), ("question", pa.string()), ("odd", pa.string())])
VQA_ANNOTATION_ROWS = pa.schema([("key", pa.string()), ("has_annotation", pa.bool_()),
                                 ("answers", pa.list_(pa.string())), ("question_type", pa.string()),
                                 ("answer_type", pa.string()), ("ann_odd", pa.string())])


def _typed(value: Any) -> str | None:
    """A JSON id as text that keeps its type (``12`` and ``"12"`` name different images)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return f"i{value}" if isinstance(value, int) else f"s{value}"


def _untyped(key: str) -> int | str:
    return int(key[1:]) if key[0] == "i" else key[1:]


def _group(image_id: Any) -> str:
    """The group key of an image id as the source groups them (``True`` with ``1``, like a dict)."""
    if isinstance(image_id, bool):
        return f"i{int(image_id)}"
    return _typed(image_id) or f"r{image_id!r}"


def _vqa_question_rows(path: str, head: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for i, q in enumerate(_entries(path, "questions", head)):
        if not isinstance(q, dict) or "question_id" not in q:  # no sample id: the row could not be named
            raise ValueError(f"{path}, questions[{i}]: no question_id; every question is an "
                             "object with question_id, image_id and question")
        qid, image_id, question = q["question_id"], q.get("image_id"), q.get("question")
        plain = (_typed(qid) is not None and isinstance(question, str) and _typed(image_id) is not None
                 and (isinstance(image_id, int) or image_id.isdigit()))
        yield i, str(qid), _typed(qid), _group(image_id), question if plain else None, None if plain else json.dumps(q)
    if not isinstance(head.get("questions"), list):
        top = head.get("_top", head)
        hint = " (this looks like an annotations file)" if isinstance(top, dict) and "annotations" in top else ""
        raise ValueError(f"{path}: no 'questions' list{hint}; questions must be a VQAv2 "
                         "questions file (OpenEnded_mscoco_*_questions.json)")


def _vqa_annotation_rows(path: str) -> Iterator[dict[str, Any]]:
    head: dict[str, Any] = {}
    for i, a in enumerate(_entries(path, "annotations", head)):
        if not isinstance(a, dict) or "question_id" not in a:
            raise ValueError(f"{path}, annotations[{i}]: no question_id")
        human, qtype, atype = a.get("answers"), a.get("question_type"), a.get("answer_type")
        answers = _plain_answers(human)
        if answers is not None and isinstance(qtype, (str, type(None))) and isinstance(atype, (str, type(None))):
            yield _typed(a["question_id"]), True, answers, qtype, atype, None
        else:
            yield _typed(a["question_id"]), True, None, None, None, json.dumps(a)
    if not isinstance(head.get("annotations"), list):
        top = head.get("_top", head)
        hint = " (this looks like a questions file)" if isinstance(top, dict) and "questions" in top else ""
        raise ValueError(f"{path}: no 'annotations' list{hint}; annotations must be a VQAv2 annotations file "
                         "(mscoco_*_annotations.json)")


def _plain_answers(human: Any) -> list[str] | None:
    """The answer texts of a list of ``{answer: text, ...}``; None for anything else."""
    try:
        answers = [h["answer"] for h in human] if isinstance(human, list) else None
    except (TypeError, KeyError):
        return None
    return answers if answers is not None and all(type(a) is str for a in answers) else None


def _vqa_annotation(row: dict[str, Any]) -> dict[str, Any]:
    """A question's annotation as the file has it (only what the record takes of a plain one)."""
    if row.get("ann_odd") is not None:
        return json.loads(row["ann_odd"])
    if not row.get("has_annotation"):
        return {}
    return {"answers": [{"answer": a} for a in row["answers"]], "question_type": row["question_type"],
            "answer_type": row["answer_type"]}


@SOURCES.add
class GQASource(Source):
    """GQA: questions JSON keyed by question id, and the image folder.

    ``answers`` is the one given answer (null for test questions); ``question_type`` is the
    detailed type, else the structural one.
    """

    name = "gqa"
    Params = GQAParams
    params: GQAParams

    def problems(self) -> list[tuple[str, str]]:
        p = self.params
        return (_missing_file("questions", p.questions, "a GQA questions JSON")
                + _missing_dir("images", p.images))

    @functools.cached_property
    def _index(self) -> QuestionIndex:
        return open_index("gqa", [self.params.questions], self._build_index)

    def _build_index(self, scratch: Path, path: Path) -> None:
        write_rows(scratch / "questions.arrow", GQA_QUESTION_ROWS, _gqa_question_rows(self.params.questions))
        questions = mapped(scratch / "questions.arrow")
        write_in_order(path, questions, grouped_order(questions))

    def count(self) -> int:
        return self._index.rows

    def vouched(self, limit: int | None) -> int | None:
        return self._index.vouched(limit)

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        p = self.params
        images = _image_folder(p.images)
        group = image_path = None  # found for the group's first usable entry (broken ones name no image)
        for row in self._index:
            qid = row["sample_id"]
            q = json.loads(row["odd"]) if row["odd"] is not None else \
                {"imageId": _untyped(row["group"]), "question": row["question"], "answer": row["answer"],
                 "types": {"detailed": row["question_type"]}}
            if row["group"] != group:
                group, image_path = row["group"], None
            image_id = q.get("imageId") if isinstance(q, dict) else None
            where = f"{p.questions}, question {qid!r}"
            problem = entry_problem(q, ("imageId", "question"))
            if problem is None and image_path is None:
                image_path = images.path([p.image_pattern.format(image_id=image_id)])
            yield _gqa_record(qid, q, None if problem else image_id, image_path, where, problem)


GQA_QUESTION_ROWS = pa.schema([("row", pa.int64()), ("sample_id", pa.string()), ("group", pa.string()),
                               ("question", pa.string()), ("answer", pa.string()), ("question_type", pa.string()),
                               ("odd", pa.string())])


def _gqa_question_rows(path: str) -> Iterator[dict[str, Any]]:
    try:
        for i, (qid, q) in enumerate(object_items(path, "a GQA questions file is an object keyed by question id")):
            image_id = q.get("imageId") if isinstance(q, dict) else None
            types = q.get("types") if isinstance(q, dict) else None
            qtype = (types.get("detailed") or types.get("structural")) if isinstance(types, dict) else None
            plain = (isinstance(q, dict) and _typed(image_id) is not None and isinstance(q.get("question"), str)
                     and isinstance(q.get("answer"), (str, type(None))) and (types is None or isinstance(types, dict))
                     and isinstance(qtype, (str, type(None))))
            yield (i, qid, _group(image_id), q["question"] if plain else None, q.get("answer") if plain else None,
                   qtype if plain else None, None if plain else json.dumps(q))
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _gqa_record(qid: str, q: Any, image_id: Any, image_path: str | None, where: str,
                problem: str | None) -> dict[str, Any]:
    """The record of GQA entry ``qid``; an entry with a ``problem`` becomes an error row."""
    q = q if isinstance(q, dict) else {}
    types = q.get("types") or {}
    record = {
        "sample_id": str(qid),
        "image_id": None if image_id is None else str(image_id),
        "question": q.get("question"),
        "image_path": None if problem else image_path,
        "image_bytes": None,
        "answers": [q["answer"]] if q.get("answer") is not None else None,
        "question_type": types.get("detailed") or types.get("structural"),
        WHERE: where,
    }
    if problem:
        record[ERROR] = f"{where}: {problem}"
    return record


def entry_problem(entry: Any, needed: tuple[str, ...]) -> str | None:
    """What keeps a question file's entry from being a sample (not an object, a field missing)."""
    if not isinstance(entry, dict):
        return f"must be an object with {' and '.join(needed)}, got {type(entry).__name__} {entry!r:.40}"
    missing = [k for k in needed if k not in entry]
    return f"no {missing[0]}; every question needs {' and '.join(needed)}" if missing else None


def _image_folder(folder: str) -> _ImageFolder | _ObjectFolder:
    return _ObjectFolder(folder) if is_uri(folder) else _ImageFolder(folder)


class _ImageFolder:
    """Resolves image file names in a folder to absolute paths (``os.path``: pathlib would intern
    every file name for the life of the process, memory that grows with the images)."""

    def __init__(self, folder: str):
        self.folder = str(Path(folder).expanduser().absolute())
        self.warned = False

    def path(self, names: list[str]) -> str:
        """The first of ``names`` that exists, else the first (and warn once)."""
        paths = [os.path.join(self.folder, n) for n in names]
        found = next((p for p in paths if os.path.isfile(p)), None)
        if found is None and not self.warned:
            self.warned = True
            _warn_missing(paths[0], names)
        return found or paths[0]


class _ObjectFolder:
    """Names image objects under a URI prefix (``s3://bucket/val2014/NAME``).

    The driver does not look every image up, as it does in a local folder: that would be a
    request or more per image, on top of the version a shard's fingerprint asks of each. Nor
    does it list the prefix: a request per thousand objects (of other splits too) before the
    first sample, and every name held. Instead the first images decide which of the candidate
    names the folder uses (the first that exists; at most ``PROBES`` images are looked up, a few
    requests each, however big the dataset), and every image is named that way; a missing one
    fails its row where the loading stage reads it. So, unlike a local folder, one prefix
    cannot mix the candidate names (VQAv2's ``COCO_val2014_...`` and bare ``000000000042.jpg``).
    """

    PROBES = 8

    def __init__(self, folder: str):
        self.folder = folder.rstrip("/")
        self.chosen: int | None = None  # which of the candidate names the folder uses, once seen
        self.probes = 0

    def path(self, names: list[str]) -> str:
        """The URI of the candidate name the folder uses (the first until one is found; warn once)."""
        uris = [f"{self.folder}/{n}" for n in names]
        if self.chosen is None and self.probes < self.PROBES:
            self.probes += 1
            self.chosen = next((k for k, uri in enumerate(uris) if object_version(uri) is not None), None)
            if self.chosen is None and self.probes == 1:
                _warn_missing(uris[0], names)
        return uris[self.chosen or 0]


def _warn_missing(path: str, names: list[str]) -> None:
    log.warning("image not found: %s (tried %s); such samples will become error rows; "
                "check images and image_pattern", path, ", ".join(names))


def _entries(path: str, key: str, head: dict[str, Any]) -> Iterator[Any]:
    try:
        yield from array_entries(path, key, head)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


def _not_utf8(path: str, exc: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x})")


def _missing_file(param: str, path: str, expected: str) -> list[tuple[str, str]]:
    problem = _not_a(path, pafs.FileType.File, "a file")
    return [(param, f"{path} {problem}; expected {expected}; set {param} to its path or URI "
                    "(download it from the dataset's site)")] if problem else []


def _missing_dir(param: str, path: str) -> list[tuple[str, str]]:
    problem = _not_a(path, pafs.FileType.Directory, "a folder")
    return [(param, f"{path} {problem}; expected the folder (or URI prefix) of the dataset's images; "
                    f"set {param} to it")] if problem else []


def _not_a(path: str, kind: pafs.FileType, what: str) -> str | None:
    """Why ``path`` (local, or a URI looked up in its store: metadata only) is not ``what``."""
    try:
        found = object_type(path) if is_uri(path) else _local_type(Path(path).expanduser())
    except (ValueError, OSError) as exc:  # a URI pyarrow cannot open, a store that does not answer
        return f"cannot be looked up ({exc})"
    return None if found == kind else f"does not exist or is not {what}"


def _local_type(path: Path) -> pafs.FileType:
    if path.is_file():
        return pafs.FileType.File
    return pafs.FileType.Directory if path.is_dir() else pafs.FileType.NotFound
