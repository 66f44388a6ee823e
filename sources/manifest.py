"""Your own data as a manifest: one row per (image, question) in a JSONL, CSV or Parquet file.

The manifest is a local file or an object in a bucket (``s3://bucket/data/questions.jsonl``,
read by the driver as a stream: a range of a JSONL or CSV object, or the row groups of a
Parquet one, at a time, never the whole object). Columns: ``question`` (required); ``image`` (a path or a URI; relative
paths are resolved against the manifest's folder or URI; images are read by the workers that
decode them) or ``image_bytes`` (encoded image: Parquet binary, base64 string in JSONL);
optional ``sample_id`` (default: the row number, from 0), ``image_id`` (default: the image
path as written, or the SHA-1 of the bytes), ``answers`` (a list; in CSV a JSON list or one
answer), ``question_type`` and ``answer_type`` (VQAv2's "yes/no", "number", "other": the
official report's per-answer-type table). Other columns are ignored.

Rows are streamed in file order and never reordered: put the questions of an image on
consecutive rows, or image-level work is repeated for every run of rows of that image.

A bad row is one error row naming file and line: a JSONL line that is not a JSON object (bad
JSON, a list, a number, ``null``) gets the sample id ``<file name>:<line>``. Only a file that
is no manifest at all stops the run: no ``question`` column, or a ``.jsonl`` that is not JSON
lines (a JSON document over several lines, no line a JSON object).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from artifacts.location import is_uri, object_file, object_stream, object_version
from sources.base import BASE_COLUMNS, ERROR, SOURCES, WHERE, Source, SourceColumn, SourceParams

Format = Literal["jsonl", "csv", "parquet"]
EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
}
MANIFEST_COLUMNS = ("question", "image", "image_bytes", "sample_id", "image_id", "answers", "question_type",
                    "answer_type")
PARQUET_BATCH_ROWS = 256
NEEDED_COLUMNS = "a manifest row needs 'question' and 'image' or 'image_bytes'"


class ManifestParams(SourceParams):
    path_params = ("path",)
    path: str = Field(..., description="manifest file (JSONL, CSV or Parquet)")
    format: Format | None = Field(
        None, description=f"file format; default: from the extension ({', '.join(EXTENSIONS)})")


@SOURCES.add
class ManifestSource(Source):
    """A JSONL, CSV or Parquet manifest of questions with image paths or embedded image bytes.

    Rows are kept in file order; group the questions of an image on consecutive rows.
    """

    name = "manifest"
    Params = ManifestParams
    params: ManifestParams

    def columns(self) -> dict[str, SourceColumn]:
        return {**BASE_COLUMNS, "answer_type": SourceColumn(
            pa.string(), 'VQAv2 answer type ("yes/no", "number", "other"); null if not given')}

    def problems(self) -> list[tuple[str, str]]:
        path = _located(self.params.path)
        found = []
        if not _is_file(path):
            found.append(("path", f"{path} does not exist or is not a file; expected a JSONL, CSV or "
                                  "Parquet manifest with a 'question' and an 'image' or 'image_bytes' "
                                  "column; set path to it"))
        if self._format() is None:
            found.append(("format", f"cannot tell the format of {path} from its extension; "
                                    "set format to jsonl, csv or parquet"))
        return found

    def count(self) -> int | None:
        """Rows of the file: Parquet metadata, or non-empty lines (CSV: minus the header)."""
        path = _located(self.params.path)
        fmt = self._format()
        try:
            if fmt == "parquet":
                return _parquet_file(path).metadata.num_rows
            with _open_bytes(path) as f:
                lines = sum(1 for line in f if line.strip())
            return max(0, lines - 1) if fmt == "csv" else lines
        except (OSError, ValueError):
            return None

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        path = _located(self.params.path)
        read_rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[self._format()]
        for number, (row, where) in enumerate(read_rows(path)):
            yield _sample(path, number, row, where)

    def _format(self) -> Format | None:
        return self.params.format or EXTENSIONS.get(Path(self.params.path).suffix.lower())


# The manifest is a local file (a Path) or an object in a bucket (its URI, a str: the driver
# reads the questions; the images it names are read by the workers).

def _located(text: str) -> Path | str:
    return text if is_uri(text) else Path(text).expanduser().absolute()


def _is_file(path: Path | str) -> bool:
    if isinstance(path, Path):
        return path.is_file()
    try:
        return object_version(path) is not None
    except (ValueError, OSError):
        return False


def _open_bytes(path: Path | str) -> BinaryIO:
    return io.BufferedReader(object_stream(path)) if isinstance(path, str) else open(path, "rb")


def _parquet_file(path: Path | str) -> pq.ParquetFile:
    return pq.ParquetFile(object_file(path) if isinstance(path, str) else path)


def _file_name(path: Path | str) -> str:
    return path.rsplit("/", 1)[-1] if isinstance(path, str) else path.name


def _beside(path: Path | str, image: str) -> str:
    """An image named in the manifest at ``path``: a URI or an absolute path as written, a
    relative path resolved against the manifest's folder (or its URI's)."""
    if is_uri(image):
        return image
    if isinstance(path, str):
        return image if image.startswith("/") else f"{path.rsplit('/', 1)[0]}/{image}"
    return str(path.parent / Path(image).expanduser())


def _sample(path: Path | str, number: int, row: dict[str, Any], where: str) -> dict[str, Any]:
    """One record of a manifest row; what is wrong with this row alone goes to the record's
    ``_error`` (the row becomes an error row, see ``runtime.records``)."""
    error = row.pop(ERROR, None)

    def value(column: str) -> Any:  # a missing column or an empty CSV cell is None
        v = row.get(column)
        return None if v == "" else v

    if "question" not in row:
        error = error or f"{where}: no 'question'; {NEEDED_COLUMNS}"
    image, image_bytes = value("image"), value("image_bytes")
    if image is None and image_bytes is None:
        error = error or f"{where}: no 'image' (path) or 'image_bytes', or both are empty"
    if isinstance(image_bytes, str):
        try:
            image_bytes = base64.b64decode(image_bytes, validate=True)
        except ValueError as exc:
            error, image_bytes = error or f"{where}: image_bytes is not valid base64 ({exc})", None
    image_path = None
    if image_bytes is None and isinstance(image, str):
        image_path = _beside(path, image)
    elif image_bytes is None and image is not None:
        error = error or f"{where}: image must be a path (text), got {type(image).__name__} {image!r:.40}"
    image_id = value("image_id")
    if image_id is None:
        if isinstance(image_bytes, (bytes, bytearray)):
            image_id = hashlib.sha1(image_bytes).hexdigest()
        else:
            image_id = image if isinstance(image, str) else f"(no image: row {number})"
    sample_id = value("sample_id")
    answers = value("answers")
    if isinstance(answers, str):
        try:
            answers = json.loads(answers) if answers.lstrip().startswith("[") else [answers]
        except json.JSONDecodeError as exc:
            error, answers = error or f"{where}: answers is not a valid JSON list ({exc})", None
    as_text = lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # noqa: E731
    record = {
        "sample_id": str(number) if sample_id is None else as_text(sample_id),
        "image_id": as_text(image_id),
        "question": row.get("question"),
        "image_path": image_path,
        "image_bytes": image_bytes,
        "answers": answers,
        "question_type": value("question_type"),
        "answer_type": value("answer_type"),
        WHERE: where,
    }
    if error:
        record[ERROR] = error
    return record


def _jsonl_rows(path: Path | str) -> Iterator[tuple[dict[str, Any], str]]:
    """The rows of a JSONL file. A line that is not a JSON object (bad JSON, a list, a number,
    ``null``) is a row holding only its error and a sample id made of the file name and line
    number, so it becomes one error row. The file as a whole is refused (``ValueError``) only
    when it is no manifest at all: a JSON document over several lines, no line a JSON object,
    or none with a question."""
    objects = questions = 0
    first_problem = None
    with _open_bytes(path) as f:
        for line_number, raw in enumerate(f, 1):
            where = f"{path}, line {line_number}"
            line, error = _decoded(raw, where)
            if not line.strip():
                continue
            first_line = objects == 0 and first_problem is None
            if first_line and line.strip() in ("[", "{"):
                raise ValueError(f"{where}: '{line.strip()}' alone opens a JSON document written over several lines; "
                                 "a JSONL manifest has one JSON object per line")
            row = _jsonl_object(line, error, where)
            if isinstance(row, str):
                first_problem = first_problem or row
                row = {"sample_id": f"{_file_name(path)}:{line_number}", ERROR: row}  # stable; unlike any row number
            else:
                objects += 1
                questions += "question" in row
            yield row, where
    if first_problem and not objects:
        raise ValueError(f"{path}: not JSON lines (one JSON object per line): no line is an object; "
                         f"first: {first_problem}")
    if objects and not questions:
        raise ValueError(f"{path}: no row has a 'question'; {NEEDED_COLUMNS}")


def _decoded(raw: bytes, where: str) -> tuple[str, str | None]:
    """A line as text, and what is wrong when it is not UTF-8 (its bad bytes then replaced)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return (raw.decode("utf-8", errors="replace"),
                f"{where}: not valid UTF-8 text (byte {raw[exc.start]:#04x} at position {exc.start})")


def _jsonl_object(line: str, error: str | None, where: str) -> dict[str, Any] | str:
    """A JSONL line as a row (carrying ``error`` as its ``_error``), or what keeps it from being
    a JSON object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return error or f"{where}: not valid JSON ({exc})"
    if not isinstance(row, dict):
        return error or f"{where}: a row must be a JSON object, got {line.strip()[:40]}; {NEEDED_COLUMNS}"
    if error:
        row[ERROR] = error
    return row


def _csv_rows(path: Path | str) -> Iterator[tuple[dict[str, Any], str]]:
    with io.TextIOWrapper(_open_bytes(path), encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and "question" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'question' column; {NEEDED_COLUMNS}")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            bad = [k for k, v in row.items() if isinstance(v, str) and _has_surrogates(v)]
            if bad:
                row = {k: (v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v)
                       for k, v in row.items()}
                row[ERROR] = f"{where}: column {bad[0]} is not valid UTF-8 text"
            yield row, where


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parquet_rows(path: Path | str) -> Iterator[tuple[dict[str, Any], str]]:
    file = _parquet_file(path)
    if "question" not in file.schema_arrow.names:
        raise ValueError(f"{path}: no 'question' column; {NEEDED_COLUMNS}")
    columns = [c for c in MANIFEST_COLUMNS if c in file.schema_arrow.names]
    number = 0
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            yield row, f"{path}, row {number}"
            number += 1
