"""VQAv2 / OK-VQA and GQA question files with an image folder.

Question metadata is read into memory; images stay on disk and are passed on as paths.
Samples are grouped by image, images in order of first appearance in the question file.
A missing image file is not an error here: the image loading stage turns it into an error
row (a warning names the first one, to catch a wrong ``image_pattern`` early). So is an entry
without its image id or question, or (GQA) one that is not an object; a VQAv2 question without
``question_id`` stops the run (its row would have no id).
"""

from __future__ import annotations

import functools
import json
import logging
import string
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
from pydantic import Field, field_validator

from sources.base import BASE_COLUMNS, ERROR, SOURCES, WHERE, Source, SourceColumn, SourceParams

log = logging.getLogger(__name__)

VQA_IMAGE_PATTERNS = ("COCO_{data_subtype}_{image_id:012d}.jpg", "{image_id:012d}.jpg")


class VQAv2Params(SourceParams):
    path_params = ("questions", "annotations", "images")
    questions: str = Field(
        ..., description="VQAv2 / OK-VQA questions JSON (OpenEnded_mscoco_*_questions.json)")
    annotations: str | None = Field(None, description="annotations JSON with the human answers (optional)")
    images: str = Field(..., description="folder of the COCO images")
    image_pattern: str | None = Field(
        None, description="image file name with {image_id} and {data_subtype}; default: "
        "COCO_{data_subtype}_{image_id:012d}.jpg, else {image_id:012d}.jpg")

    @field_validator("image_pattern")
    @classmethod
    def _pattern_fits(cls, pattern: str | None) -> str | None:
        return pattern and checked_pattern(pattern, image_id=42, data_subtype="val2014")


class GQAParams(SourceParams):
    path_params = ("questions", "images")
    questions: str = Field(..., description="GQA questions JSON (e.g. testdev_balanced_questions.json)")
    images: str = Field(..., description="folder of the GQA images")
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
    def _data(self) -> dict:
        data = _read_json(self.params.questions)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            hint = " (this looks like an annotations file)" if isinstance(data, dict) and "annotations" in data else ""
            raise ValueError(f"{self.params.questions}: no 'questions' list{hint}; questions must be a VQAv2 "
                             "questions file (OpenEnded_mscoco_*_questions.json)")
        for i, q in enumerate(data["questions"]):
            if not isinstance(q, dict) or "question_id" not in q:  # no sample id: the row could not be named
                raise ValueError(f"{self.params.questions}, questions[{i}]: no question_id; every question is an "
                                 "object with question_id, image_id and question")
        return data

    def _annotations(self) -> dict:
        path = self.params.annotations
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            hint = " (this looks like a questions file)" if isinstance(data, dict) and "questions" in data else ""
            raise ValueError(f"{path}: no 'annotations' list{hint}; annotations must be a VQAv2 annotations file "
                             "(mscoco_*_annotations.json)")
        out = {}
        for i, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or "question_id" not in a:
                raise ValueError(f"{path}, annotations[{i}]: no question_id")
            out[a["question_id"]] = a
        return out

    def count(self) -> int:
        return len(self._data["questions"])

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        p = self.params
        data = self._data
        subtype = data.get("data_subtype")
        answers_by_qid = {}
        if p.annotations is not None:
            answers_by_qid = self._annotations()
        if p.image_pattern:
            if subtype is None and "{data_subtype" in p.image_pattern:
                raise ValueError(
                    f"{p.questions} has no data_subtype, but image_pattern uses {{data_subtype}}")
            patterns = (p.image_pattern,)
        else:
            patterns = VQA_IMAGE_PATTERNS if subtype else VQA_IMAGE_PATTERNS[1:]
        images = _ImageFolder(p.images)
        for image_id, group in _by_image(data["questions"], lambda q: q.get("image_id")):
            error = image_path = None
            number = int(image_id) if isinstance(image_id, str) and image_id.isdigit() else image_id
            if isinstance(number, int) and not isinstance(number, bool):
                image_path = images.path([pat.format(image_id=number, data_subtype=subtype) for pat in patterns])
            else:
                error = f"image_id must be a COCO image number, got {type(image_id).__name__} {image_id!r:.40}"
            for index, q in group:
                where = f"{p.questions}, questions[{index}]"
                ann = answers_by_qid.get(q["question_id"], {})
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
    def _questions(self) -> dict:
        data = _read_json(self.params.questions)
        if not isinstance(data, dict):
            raise ValueError(f"{self.params.questions}: a GQA questions file is an object keyed by question id")
        return data

    def count(self) -> int:
        return len(self._questions)

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        p = self.params
        images = _ImageFolder(p.images)
        entries = list(self._questions.items())
        for image_id, group in _by_image(entries, lambda e: e[1].get("imageId") if isinstance(e[1], dict) else None):
            image_path = None  # found for the group's first usable entry (broken ones name no image)
            for _, (qid, q) in group:
                where = f"{p.questions}, question {qid!r}"
                problem = entry_problem(q, ("imageId", "question"))
                if problem is None and image_path is None:
                    image_path = images.path([p.image_pattern.format(image_id=image_id)])
                yield _gqa_record(qid, q, None if problem else image_id, image_path, where, problem)


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


class _ImageFolder:
    """Resolves image file names in a folder to absolute paths."""

    def __init__(self, folder: str):
        self.folder = Path(folder).expanduser().absolute()
        self.warned = False

    def path(self, names: list[str]) -> str:
        """The first of ``names`` that exists, else the first (and warn once)."""
        paths = [self.folder / n for n in names]
        found = next((p for p in paths if p.is_file()), None)
        if found is None and not self.warned:
            self.warned = True
            log.warning("image not found: %s (tried %s); such samples will become error rows; "
                        "check images and image_pattern", paths[0], ", ".join(names))
        return str(found or paths[0])


def _by_image(items: Iterable[Any], image_of: Callable[[Any], Any]) -> Iterator[tuple[Any, list[tuple[int, Any]]]]:
    """``(image id, [(index, item)])`` in order of first appearance of the image."""
    groups: dict[Any, list[tuple[int, Any]]] = {}
    for index, item in enumerate(items):
        image = image_of(item)
        groups.setdefault(image if isinstance(image, (str, int)) else repr(image), []).append((index, item))
    yield from groups.items()


def _read_json(path: str) -> Any:
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _missing_file(param: str, path: str, expected: str) -> list[tuple[str, str]]:
    if Path(path).expanduser().is_file():
        return []
    return [(param, f"{path} does not exist or is not a file; expected {expected}; "
                    f"set {param} to its path (download it from the dataset's site)")]


def _missing_dir(param: str, path: str) -> list[tuple[str, str]]:
    if Path(path).expanduser().is_dir():
        return []
    return [(param, f"{path} does not exist or is not a folder; expected the folder of the "
                    f"dataset's images; set {param} to it")]
