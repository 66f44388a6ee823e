"""Read a finished run folder for reports: manifest, column roles, light per-sample columns,
heavy columns (tensors, captions) for chosen samples only, heatmap entropies, and the images
of the dataset rebuilt from the manifest (nothing is re-run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artifacts.columns import column_to_python, is_fixed_tensor, is_variable_tensor
from runtime.errors import UsageError
from runtime.run_folder import finished_manifest
from stages.base import Role
from stages.render import VIEWS

RESULTS = "results.parquet"
MANIFEST = "manifest.json"
BATCH_ROWS = 512


# the label of the first kept column of these roles; further heatmaps go by their node's name
HEATMAP_LABELS = {Role.HEATMAP.value: "heatmap", Role.ENHANCED_HEATMAP.value: "enhanced"}


@dataclass
class Roles:
    """Which kept column plays which part, from the roles the run's manifest records for its
    columns (``stages.base.Role``). ``None`` when the run did not keep such a column."""

    heatmap: str | None = None       # the first question-guided heatmap
    enhanced: str | None = None      # the first enhanced heatmap
    points: str | None = None
    scores: str | None = None
    labels: str | None = None
    mask: str | None = None
    patches: str | None = None
    attention: str | None = None     # [L, g, g] attention maps
    captions: str | None = None
    answer: str | None = None
    accuracy: str | None = None
    itm: str | None = None
    status_enhance: str | None = None
    pointing: dict[str, str] = field(default_factory=dict)   # heatmap label -> column
    energy: dict[str, str] = field(default_factory=dict)
    heatmaps: dict[str, str] = field(default_factory=dict)   # label -> heatmap column, every heatmap kept
    caption_sampling: dict[str, Any] | None = None            # to rebuild the caption patch draws


def column_roles(manifest: dict, schema: pa.Schema) -> dict[str, str]:
    """``{column: role}`` of the kept columns: the manifest's record, or for run folders written
    before it had one, what the stages of its graph declare."""
    kept = set(schema.names)
    if "roles" in manifest:
        return {c: role for c, role in manifest["roles"].items() if c in kept}
    from stages import STAGES

    roles: dict[str, str] = {}
    for name, node in ((manifest.get("graph") or {}).get("nodes") or {}).items():
        try:
            cls = STAGES[node.get("stage")]
            outputs = cls(cls.Params(**(node.get("params") or {}))).outputs()
        except Exception:  # noqa: BLE001 - a stage gone or changed since: its columns have no role
            continue
        roles.update({f"{name}.{c}": o.role.value for c, o in outputs.items() if o.role and f"{name}.{c}" in kept})
    return {c: roles[c] for c in schema.names if c in roles}


def find_roles(manifest: dict, schema: pa.Schema) -> Roles:
    roles = column_roles(manifest, schema)
    nodes: dict[str, dict] = (manifest.get("graph") or {}).get("nodes") or {}
    r = Roles()

    def first(role: Role) -> str | None:
        return next((c for c, kind in roles.items() if kind == role.value), None)

    r.heatmap, r.enhanced = first(Role.HEATMAP), first(Role.ENHANCED_HEATMAP)
    r.points, r.scores, r.labels = first(Role.POINTS), first(Role.POINT_SCORES), first(Role.POINT_LABELS)
    r.mask, r.patches, r.attention = first(Role.MASK), first(Role.PATCHES), first(Role.ATTENTION)
    r.captions, r.answer, r.accuracy = first(Role.CAPTIONS), first(Role.ANSWER), first(Role.ACCURACY)
    r.itm, r.status_enhance = first(Role.MATCH_SCORE), first(Role.STATUS)

    for column, kind in roles.items():
        if kind in HEATMAP_LABELS:
            label = HEATMAP_LABELS[kind] if column in (r.heatmap, r.enhanced) else column.split(".", 1)[0]
            taken = label in r.heatmaps or (label not in HEATMAP_LABELS.values() and label in VIEWS)
            r.heatmaps[column if taken else label] = column
    label_of = {column: label for label, column in r.heatmaps.items()}
    measured = {Role.POINTING_GAME.value: r.pointing, Role.ENERGY_IN_MASK.value: r.energy}
    for column, kind in roles.items():  # a heatmap metric goes by the label of the heatmap it measured
        if kind in measured:
            node = column.split(".", 1)[0]
            refs = ((nodes.get(node) or {}).get("inputs") or {}).values()
            measured[kind][next((label_of[ref] for ref in refs if ref in label_of), node)] = column

    # The caption stage draws its patch sets from the heatmap with per-sample seeds; when the
    # heatmap it read is kept, its first round of draws can be rebuilt exactly (its own algorithm:
    # the rebuild is of that stage's draws, so it is found by name).
    for node, nd in nodes.items():
        ref = (nd.get("inputs") or {}).get("heatmap")
        if nd.get("stage") == "caption" and str(nd.get("version", "1")) == "1" and ref in schema.names:
            p = nd.get("params") or {}
            if {"seed", "num_captions", "num_patches"} <= set(p):
                r.caption_sampling = {"heatmap": ref, "seed": int(p["seed"]),
                                      "num_captions": int(p["num_captions"]), "num_patches": int(p["num_patches"])}
            break
    return r


def normalised_entropy(heatmaps: np.ndarray) -> np.ndarray:
    """Entropy of each heatmap ``[N, g, g]`` as a distribution (negative cells count 0), divided
    by ``log(g * g)``: 0 = all mass in one cell, 1 = uniform (also for an all-zero map)."""
    h = np.asarray(heatmaps, dtype=np.float64).reshape(len(heatmaps), -1)
    h = np.where(np.isfinite(h) & (h > 0), h, 0.0)
    cells = h.shape[1]
    mass = h.sum(axis=1, keepdims=True)
    p = np.where(mass > 0, h / np.where(mass > 0, mass, 1.0), 1.0 / cells)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=1)
    return ent / np.log(cells) if cells > 1 else np.zeros(len(h))


def _is_heavy(t: pa.DataType) -> bool:
    return is_fixed_tensor(t) or is_variable_tensor(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def column_mean(table: pa.Table, column: str | None) -> float | None:
    """Mean of a numeric column over its non-null values; None when the table lacks it."""
    if column is None or column not in table.column_names:
        return None
    return pc.mean(table.column(column)).as_py()


def error_count(table: pa.Table) -> int:
    """Rows whose status is ``error``."""
    if "status" not in table.column_names:
        return 0
    return int(pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0)


class Run:
    """One run folder, read lazily: light columns for every sample, heavy ones on demand."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        results = self.dir / RESULTS
        if not self.dir.is_dir():
            raise UsageError(f"{folder}: no such run folder (a folder written by 'runtime run' with "
                             f"{RESULTS} and {MANIFEST})")
        self.manifest: dict = finished_manifest(self.dir)
        if not results.is_file():
            raise UsageError(f"{folder}: no {RESULTS} in it; is the run finished? ('runtime run' writes it at the end)")
        self.results = results
        self.file = pq.ParquetFile(results)
        self.schema: pa.Schema = self.file.schema_arrow
        self.roles = find_roles(self.manifest, self.schema)
        graph = self.manifest.get("graph") or {}
        self.graph_name: str = graph.get("name") or self.dir.name
        self.description: str = graph.get("description") or ""
        self.label = self.graph_name
        light = [c for c in self.schema.names if not _is_heavy(self.schema.field(c).type) and c != self.roles.captions]
        self.table: pa.Table = self.file.read(columns=light)
        self.sample_ids: list[str] = self.table.column("sample_id").to_pylist()
        self.index: dict[str, int] = {sid: i for i, sid in enumerate(self.sample_ids)}
        self._entropy: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    # -- light columns -----------------------------------------------------------------------
    def values(self, column: str | None) -> list[Any]:
        """A light column as a Python list (Nones when the run lacks it)."""
        if column is None or column not in self.table.column_names:
            return [None] * len(self)
        return self.table.column(column).to_pylist()

    def mean(self, column: str | None) -> float | None:
        return column_mean(self.table, column)

    def errors(self) -> int:
        return error_count(self.table)

    @property
    def dataset(self) -> dict:
        return (self.manifest.get("graph") or {}).get("dataset") or {}

    # -- heavy columns -----------------------------------------------------------------------
    def details(self, sample_ids: set[str] | list[str], columns: list[str]) -> dict[str, dict[str, Any]]:
        """``{sample_id: {column: value}}`` for the given samples: tensors as numpy arrays (None
        when null), other columns as Python values. Streams the file and stops once all are
        found, so asking for the first samples of a large run reads little."""
        want = set(sample_ids) & set(self.index)
        columns = [c for c in dict.fromkeys(columns) if c and c in self.schema.names]
        out: dict[str, dict[str, Any]] = {}
        if not want:
            return out
        for batch in self.file.iter_batches(batch_size=BATCH_ROWS, columns=["sample_id", *columns]):
            ids = batch.column(0).to_pylist()
            rows = [i for i, sid in enumerate(ids) if sid in want and sid not in out]
            if rows:
                sub = batch.take(pa.array(rows, pa.int64()))
                conv = {c: column_to_python(sub.column(c)) for c in columns}
                for k, i in enumerate(rows):
                    row = {}
                    for c, (values, valid) in conv.items():
                        row[c] = values[k] if valid[k] else None
                    out[ids[i]] = row
            if len(out) == len(want):
                break
        return out

    def entropy(self) -> dict[str, np.ndarray]:
        """``{heatmap label: normalised entropy per sample}`` (NaN for null heatmaps)."""
        if self._entropy is None:
            cols = list(self.roles.heatmaps.items())
            parts: dict[str, list[np.ndarray]] = {label: [] for label, _ in cols}
            if cols:
                for batch in self.file.iter_batches(batch_size=BATCH_ROWS * 8, columns=[c for _, c in cols]):
                    for label, c in cols:
                        values, valid = column_to_python(batch.column(c))
                        ent = normalised_entropy(values) if len(values) else np.zeros(0)
                        parts[label].append(np.where(valid, ent, np.nan))
            self._entropy = {label: (np.concatenate(p) if p else np.zeros(0)) for label, p in parts.items()}
        return self._entropy

    def caption_patches(self, sample_id: str, heatmap: np.ndarray) -> np.ndarray | None:
        """The caption stage's first round of patch draws for a sample, rebuilt from the heatmap
        it read and its seed (its own code path: ``row_rng(seed, id#0)`` then
        ``sample_patch_sets``); None when the run does not allow it."""
        cs = self.roles.caption_sampling
        if cs is None or heatmap is None:
            return None
        from grids import sample_patch_sets
        from stages.common import row_rng

        heat = np.asarray(heatmap, dtype=np.float32).reshape(1, -1)
        if cs["num_patches"] > heat.shape[1]:
            return None
        rng = row_rng(cs["seed"], f"{sample_id}#0")
        return sample_patch_sets(heat, [rng], cs["num_captions"], cs["num_patches"])[0]


def unique_labels(runs: list[Run]) -> None:
    """Give runs distinct labels: the graph name, then the folder name, then a number."""
    names = [r.graph_name for r in runs]
    for i, r in enumerate(runs):
        label = r.graph_name
        if names.count(label) > 1:
            label = f"{r.graph_name} ({r.dir.name})"
        r.label = label
    labels = [r.label for r in runs]
    for i, r in enumerate(runs):
        if labels.count(r.label) > 1:
            r.label = f"{r.label} #{i}"


# --- images of the dataset ------------------------------------------------------------------

_SHAPES_ID = re.compile(r"^shapes-(\d+)-(\d+)$")


class SourceImages:
    """The images of a run's dataset, from ``manifest["graph"]["dataset"]``: the source is
    rebuilt with the same params and its records are looked up by ``image_id`` (the
    ``shapes`` scenes are drawn straight from their id). Relative paths in the params are
    tried against the working directory, then against the run folder and its parents."""

    def __init__(self, dataset: dict, run_dir: Path | None = None):
        self.dataset = dataset or {}
        self.run_dir = run_dir
        self.cache: dict[str, np.ndarray | None] = {}
        self.problem: str | None = None
        self._source = None

    def _build(self):
        from sources import SOURCES

        if self._source is not None or self.problem is not None:
            return self._source
        name = self.dataset.get("source")
        params = dict(self.dataset.get("params") or {})
        if name not in SOURCES:
            self.problem = f"unknown dataset source '{name}'"
            return None
        cls = SOURCES[name]
        candidates = [params]
        bases = [self.run_dir, *self.run_dir.resolve().parents] if self.run_dir else []
        for base in bases:
            moved = {k: (str(base / v) if isinstance(v, str) and v and not Path(v).expanduser().is_absolute()
                         and (base / v).exists() else v) for k, v in params.items()}
            if moved != params:
                candidates.append(moved)
        last = None
        for p in candidates:
            try:
                source = cls(cls.Params(**p))
            except Exception as exc:  # noqa: BLE001 - bad params: report, show no images
                last = f"dataset params: {exc}"
                continue
            problems = source.problems()
            if not problems:
                self._source = source
                return source
            last = "; ".join(f"{k}: {m}" for k, m in problems)
        self.problem = last or "cannot rebuild the dataset source"
        return None

    def get_many(self, image_ids: list[str] | set[str]) -> dict[str, np.ndarray | None]:
        """``{image_id: RGB uint8[H, W, 3] or None}``; None when the image cannot be had
        (``self.problem`` says why when the whole source is unusable)."""
        todo = [i for i in dict.fromkeys(image_ids) if i not in self.cache]
        if todo:
            self._fetch(todo)
        return {i: self.cache.get(i) for i in image_ids}

    def _fetch(self, image_ids: list[str]) -> None:
        from stages.images import decode_image, read_image

        if self.dataset.get("source") == "shapes":
            left = self._fetch_shapes(image_ids)
            if not left:
                return
            image_ids = left
        source = self._build()
        if source is None:
            for i in image_ids:
                self.cache[i] = None
            return
        want = set(image_ids)
        found: dict[str, np.ndarray | None] = {}
        try:
            for rec in source.iter_samples():
                iid = rec.get("image_id")
                if iid in want and iid not in found:
                    try:
                        if rec.get("image_bytes"):
                            found[iid] = decode_image(rec["image_bytes"], f"image {iid}")
                        elif rec.get("image_path"):
                            found[iid] = read_image(rec["image_path"])
                        else:
                            found[iid] = None
                    except ValueError:
                        found[iid] = None
                    if len(found) == len(want):
                        break
        except Exception as exc:  # noqa: BLE001 - a broken source shows no images, not a crash
            self.problem = f"reading the dataset: {type(exc).__name__}: {exc}"
        for i in image_ids:
            self.cache[i] = found.get(i)

    def _fetch_shapes(self, image_ids: list[str]) -> list[str]:
        """Draw shapes scenes straight from their ids; returns the ids that did not parse."""
        from shapes.dataset import ShapesParams, render_scene

        try:
            params = ShapesParams(**(self.dataset.get("params") or {}))
        except Exception:  # noqa: BLE001
            return image_ids
        left = []
        for iid in image_ids:
            m = _SHAPES_ID.match(iid)
            if not m or int(m.group(1)) != params.seed or int(m.group(2)) >= params.num_images:
                left.append(iid)
                continue
            self.cache[iid] = render_scene(params.seed, int(m.group(2)), params).image
        return left
