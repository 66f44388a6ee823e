"""``runtime export``: a run's predicted answers in the official result formats.

- ``vqav2`` / ``okvqa``: ``[{"question_id": int, "answer": str}, ...]``, what the VQAv2
  evaluation server (EvalAI) and the official ``vqaEval.py`` read;
- ``gqa``: ``[{"questionId": str, "prediction": str}, ...]``, what GQA's evaluation reads.

The question ids are the runs' sample ids (the VQAv2 and GQA sources use the datasets' question
ids). A row that failed has no answer: it is written with an empty answer, and counted, since
the servers expect every question of the split. For the same reason a run of part of the
dataset (``--limit``, ``--ids``) is exported with a warning naming how many questions it covers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

RESULTS, MANIFEST = "results.parquet", "manifest.json"  # runtime.run's, not imported: the parser is built on every command
FORMATS = ("vqav2", "okvqa", "gqa")
# the formats that fit the runs of a dataset source; another source's (shapes, manifest, a
# plugin's) may be any dataset, so every format is let through for it
FORMATS_OF_SOURCE = {"vqav2": ("vqav2", "okvqa"), "gqa": ("gqa",)}


@dataclass(frozen=True)
class Exported:
    path: Path
    questions: int
    empty: int                 # rows without an answer, written as ""
    partial: str | None = None  # a warning when the run covers only part of its dataset


def answer_column(schema: pa.Schema, roles: dict[str, str], wanted: str | None) -> str:
    """``wanted``, else the one kept column whose role (``roles``, the manifest's) is the answer;
    refused unless it holds strings (a list of captions would be written as its Python text)."""
    from stages.base import Role

    columns = schema.names
    answers = [c for c, role in roles.items() if role == Role.ANSWER.value and c in columns]
    if wanted is not None and wanted not in columns:
        raise UsageError(f"--answer {wanted}: no such column in {RESULTS}; columns: {', '.join(columns)}")
    if wanted is None and len(answers) != 1:
        what = f"several answer columns ({', '.join(answers)})" if answers else f"no answer column (by {MANIFEST})"
        raise UsageError(f"the results have {what}; choose one with --answer NODE.COLUMN")
    column = wanted or answers[0]
    if not _is_text(schema.field(column).type):
        fitting = [c for c in answers if _is_text(schema.field(c).type)] \
            or [c for c in columns if "." in c and _is_text(schema.field(c).type)]
        raise UsageError(f"--answer {column}: its values are {schema.field(column).type}, not answers (strings); "
                         f"columns that fit: {', '.join(fitting) or 'none'}")
    return column


def _is_text(arrow_type: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def check_format_fits(fmt: str, dataset: dict) -> None:
    """Refuse a format meant for another dataset than the run's (a GQA file of a VQAv2 run)."""
    source = dataset.get("source")
    fitting = FORMATS_OF_SOURCE.get(source)
    if fitting is not None and fmt not in fitting:
        raise UsageError(f"--format {fmt} does not fit this run: its dataset is a '{source}' source; "
                         f"use --format {' or '.join(fitting)}")


def partial_run_warning(manifest: dict, questions: int) -> str | None:
    """A warning when the run was of part of its dataset (``--limit`` / ``--ids``), naming how
    many of the dataset's questions it covers."""
    arguments = manifest.get("arguments") or {}
    limit, ids = arguments.get("limit"), arguments.get("ids")
    if not limit and not ids:
        return None
    total = dataset_size((manifest.get("graph") or {}).get("dataset") or {})
    if total is not None and questions >= total:  # a --limit above the dataset's size
        return None
    how = f"--limit {limit}" if limit else f"--ids, {len(ids)} ids"
    of = f"{questions} of the {total} questions" if total else f"{questions} questions, part"
    return (f"warning: the run covers {of} of its dataset ({how}); an evaluation server scores the questions "
            "left out as wrong")


def dataset_size(dataset: dict) -> int | None:
    """Questions of the run's dataset, from its source rebuilt with the manifest's params;
    None when the source cannot tell (or is gone: files moved, a plugin uninstalled)."""
    from sources import SOURCES

    try:
        cls = SOURCES[dataset.get("source")]
        source = cls(cls.Params(**(dataset.get("params") or {})))
        return None if source.problems() else source.count()
    except Exception:  # noqa: BLE001 - the count only adds to a warning: without it the warning stays
        return None


def export_predictions(run: str | Path, fmt: str, answer: str | None = None,
                       out: str | Path | None = None) -> Exported:
    """Write the predictions of ``run`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    from runtime.run import read_results
    from runtime.run_folder import finished_manifest

    run = Path(run)
    manifest = finished_manifest(run)
    if not (run / RESULTS).is_file():
        raise UsageError(f"{run}: no {RESULTS} in it (is it a finished run folder?)")
    check_format_fits(fmt, (manifest.get("graph") or {}).get("dataset") or {})
    table = read_results(run)
    column = answer_column(table.schema, manifest.get("roles") or {}, answer)
    ids = table.column("sample_id").to_pylist()
    predicted = table.column(column).to_pylist()
    answers = ["" if a is None else a for a in predicted]
    if fmt == "gqa":
        records = [{"questionId": str(i), "prediction": a} for i, a in zip(ids, answers)]
    else:
        bad = [i for i in ids if not str(i).isdigit()]
        if bad:
            raise UsageError(f"{fmt} results need integer question ids, but sample ids such as {bad[0]!r} are not "
                             "(runs of the vqav2 source use the question ids)")
        records = [{"question_id": int(i), "answer": a} for i, a in zip(ids, answers)]
    path = Path(out) if out else run / f"predictions_{fmt}.json"
    write_predictions(path, records)
    return Exported(path, len(records), predicted.count(None), partial_run_warning(manifest, len(records)))


def write_predictions(path: Path, records: list[dict]) -> None:
    """``records`` as JSON at ``path`` (its folders created); ``UsageError`` naming the path
    when it cannot be written there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records))
    except OSError as exc:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else (exc.strerror or str(exc))
        raise UsageError(f"{path}: cannot write the predictions there ({reason}); choose with --out a file in a "
                         "folder you can write to") from None


def add_export_parser(sub) -> None:
    e = sub.add_parser(
        "export", help="a run's answers in the official result format (VQAv2, OK-VQA, GQA)",
        description="Write a run's predicted answers as the official evaluation servers read them. "
                    "vqav2 / okvqa: [{question_id, answer}] (runs of the vqav2 source); gqa: [{questionId, "
                    "prediction}] (runs of the gqa source); runs of other sources may use any format. A failed "
                    "row is written with an empty answer; a run of part of the dataset (--limit, --ids) is "
                    "exported with a warning.")
    e.add_argument("run", metavar="RUN", help="a finished run folder")
    e.add_argument("--format", required=True, choices=FORMATS, help="result format")
    e.add_argument("--answer", metavar="NODE.COLUMN",
                   help="the answer column, of strings (default: the one column whose role is answer)")
    e.add_argument("--out", metavar="FILE", help="output JSON (default: RUN/predictions_FORMAT.json)")


def export_main(a) -> int:
    import sys

    done = export_predictions(a.run, a.format, a.answer, a.out)
    print(f"{done.path}: {done.questions} predictions"
          + (f" ({done.empty} rows without an answer written as '')" if done.empty else ""))
    if done.partial:
        print(done.partial, file=sys.stderr)
    return 0
