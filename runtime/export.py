"""``runtime export``: a run's predicted answers in the official result formats.

- ``vqav2`` / ``okvqa``: ``[{"question_id": int, "answer": str}, ...]``, what the VQAv2
  evaluation server (EvalAI) and the official ``vqaEval.py`` read;
- ``gqa``: ``[{"questionId": str, "prediction": str}, ...]``, what GQA's evaluation reads.

The question ids are the runs' sample ids (the VQAv2 and GQA sources use the datasets' question
ids). A row that failed has no answer: it is written with an empty answer, and counted, since
the servers expect every question of the split.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import UsageError

RESULTS, MANIFEST = "results.parquet", "manifest.json"  # runtime.run's, not imported: the parser is built on every command
FORMATS = ("vqav2", "okvqa", "gqa")


def answer_column(columns: list[str], roles: dict[str, str], wanted: str | None) -> str:
    """``wanted``, else the one kept column whose role (``roles``, the manifest's) is the answer."""
    from stages.base import Role

    if wanted is not None:
        if wanted not in columns:
            raise UsageError(f"--answer {wanted}: no such column in {RESULTS}; columns: {', '.join(columns)}")
        return wanted
    found = [c for c, role in roles.items() if role == Role.ANSWER.value and c in columns]
    if len(found) != 1:
        what = f"several answer columns ({', '.join(found)})" if found else f"no answer column (by {MANIFEST})"
        raise UsageError(f"the results have {what}; choose one with --answer NODE.COLUMN")
    return found[0]


def export_predictions(run: str | Path, fmt: str, answer: str | None = None,
                       out: str | Path | None = None) -> tuple[Path, int, int]:
    """Write the predictions of ``run`` in format ``fmt``; returns (file, questions, empty answers)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    from runtime.run import read_results
    from runtime.run_folder import finished_manifest

    run = Path(run)
    manifest = finished_manifest(run)
    if not (run / RESULTS).is_file():
        raise UsageError(f"{run}: no {RESULTS} in it (is it a finished run folder?)")
    table = read_results(run)
    roles = manifest.get("roles") or {}
    column = answer_column(table.column_names, roles, answer)
    ids = table.column("sample_id").to_pylist()
    answers = ["" if a is None else str(a) for a in table.column(column).to_pylist()]
    empty = sum(1 for a in table.column(column).to_pylist() if a is None)
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
    return path, len(records), empty


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
    e = sub.add_parser("export", help="a run's answers in the official result format (VQAv2, OK-VQA, GQA)",
                       description=__doc__.split("\n\n")[0] + " VQAv2 / OK-VQA: [{question_id, answer}]; "
                       "GQA: [{questionId, prediction}].")
    e.add_argument("run", metavar="RUN", help="a finished run folder")
    e.add_argument("--format", required=True, choices=FORMATS, help="result format")
    e.add_argument("--answer", metavar="NODE.COLUMN", help="the answer column (default: the only NODE.answer column)")
    e.add_argument("--out", metavar="FILE", help="output JSON (default: RUN/predictions_FORMAT.json)")


def export_main(a) -> int:
    path, count, empty = export_predictions(a.run, a.format, a.answer, a.out)
    print(f"{path}: {count} predictions" + (f" ({empty} rows without an answer written as '')" if empty else ""))
    return 0
