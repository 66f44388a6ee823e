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

from runtime.sources.base import Source, SourceParams

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
        for number, row in enumerate(read_rows(path)):
            yield _sample(path, number, row)

    def _format(self) -> Format | None:
        return self.params.format or EXTENSIONS.get(Path(self.params.path).suffix.lower())


def _sample(path: Path, number: int, row: dict[str, Any]) -> dict[str, Any]:
    def value(column: str) -> Any:  # a missing column or an empty CSV cell is None
        v = row.get(column)
        return None if v == "" else v

    where = f"{path}, row {number} (counting from 0)"
    if "question" not in row:
        raise ValueError(
            f"{where}: no 'question' column; a manifest needs 'question' and 'image' or 'image_bytes'")
    image, image_bytes = value("image"), value("image_bytes")
    if image is None and image_bytes is None:
        raise ValueError(f"{where}: no 'image' (path) or 'image_bytes' column, or both are empty")
    if isinstance(image_bytes, str):
        image_bytes = base64.b64decode(image_bytes)
    image_path = None
    if image_bytes is None:
        image_path = str(path.parent / Path(image).expanduser())  # an absolute image path stays as is
    image_id = value("image_id")
    if image_id is None:
        image_id = image if image_bytes is None else hashlib.sha1(image_bytes).hexdigest()
    sample_id = value("sample_id")
    return {
        "sample_id": str(number) if sample_id is None else str(sample_id),
        "image_id": str(image_id),
        "question": row["question"],
        "image_path": image_path,
        "image_bytes": image_bytes,
        "answers": _answers(value("answers")),
        "question_type": value("question_type"),
    }


def _answers(raw: Any) -> list[str] | None:
    """A list, a JSON list string, or one answer string."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.lstrip().startswith("[") else [raw]
    return [str(a) for a in raw]


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({e})") from None


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    file = pq.ParquetFile(path)
    columns = [c for c in MANIFEST_COLUMNS if c in file.schema_arrow.names]
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()
