"""Your own data as a manifest: one row per (image, question) in a JSONL, CSV or Parquet file.

Columns: ``question`` (required); ``image`` (a path; relative paths are resolved against the
manifest's folder) or ``image_bytes`` (encoded image: Parquet binary, base64 string in JSONL);
optional ``sample_id`` (default: the row number, from 0), ``image_id`` (default: the image
path as written, or the SHA-1 of the bytes), ``answers`` (a list; in CSV a JSON list or one
answer) and ``question_type``. Other columns are ignored.

Rows are streamed in file order and never reordered: put the questions of an image on
consecutive rows, or image-level work is repeated for every run of rows of that image.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow.parquet as pq
from pydantic import Field

from sources.base import ERROR, SOURCES, WHERE, Source, SourceParams

Format = Literal["jsonl", "csv", "parquet"]
EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
}
MANIFEST_COLUMNS = ("question", "image", "image_bytes", "sample_id", "image_id", "answers", "question_type")
PARQUET_BATCH_ROWS = 256


class ManifestParams(SourceParams):
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

    def problems(self) -> list[tuple[str, str]]:
        path = Path(self.params.path).expanduser()
        found = []
        if not path.is_file():
            found.append(("path", f"{path} does not exist or is not a file; expected a JSONL, CSV or "
                                  "Parquet manifest with a 'question' and an 'image' or 'image_bytes' "
                                  "column; set path to it"))
        if self._format() is None:
            found.append(("format", f"cannot tell the format of {path} from its extension; "
                                    "set format to jsonl, csv or parquet"))
        return found

    def count(self) -> int | None:
        """Rows of the file: Parquet metadata, or non-empty lines (CSV: minus the header)."""
        path = Path(self.params.path).expanduser()
        fmt = self._format()
        try:
            if fmt == "parquet":
                return pq.ParquetFile(path).metadata.num_rows
            with open(path, "rb") as f:
                lines = sum(1 for line in f if line.strip())
            return max(0, lines - 1) if fmt == "csv" else lines
        except (OSError, ValueError):
            return None

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        path = Path(self.params.path).expanduser().absolute()
        read_rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[self._format()]
        for number, (row, where) in enumerate(read_rows(path)):
            yield _sample(path, number, row, where)

    def _format(self) -> Format | None:
        return self.params.format or EXTENSIONS.get(Path(self.params.path).suffix.lower())


def _sample(path: Path, number: int, row: dict[str, Any], where: str) -> dict[str, Any]:
    """One record of a manifest row. What is wrong with the file as a whole (no question column)
    raises ``ValueError``; what is wrong with this row alone goes to the record's ``_error``
    (the row becomes an error row, see ``runtime.records``)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object with 'question' and 'image' or 'image_bytes', "
                         f"got {type(row).__name__}")
    error = row.pop(ERROR, None)

    def value(column: str) -> Any:  # a missing column or an empty CSV cell is None
        v = row.get(column)
        return None if v == "" else v

    if "question" not in row:
        raise ValueError(
            f"{where}: no 'question' column; a manifest needs 'question' and 'image' or 'image_bytes'")
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
        image_path = str(path.parent / Path(image).expanduser())  # an absolute image path stays as is
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
        "question": row["question"],
        "image_path": image_path,
        "image_bytes": image_bytes,
        "answers": answers,
        "question_type": value("question_type"),
        WHERE: where,
    }
    if error:
        record[ERROR] = error
    return record


def _jsonl_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            where = f"{path}, line {line_number}"
            error = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw.decode("utf-8", errors="replace")
                error = f"{where}: not valid UTF-8 text (byte {raw[exc.start]:#04x} at position {exc.start})"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if error and isinstance(row, dict):
                row[ERROR] = error
            yield row, where


def _csv_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
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


def _parquet_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    file = pq.ParquetFile(path)
    columns = [c for c in MANIFEST_COLUMNS if c in file.schema_arrow.names]
    number = 0
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            yield row, f"{path}, row {number}"
            number += 1
