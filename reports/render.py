"""Post-run rendering: the pictures of chosen samples of a run, drawn from ``results.parquet``
and the dataset's images, cached as JPEG (or PNG) files in ``RUN/render/``.

Each heatmap is drawn scaled to its own [min, max]; given ``shared`` ranges (the same sample's
heatmaps across the runs of a report), a second picture scaled to that range, whose file name
carries the range, so a report with other runs draws its own.

``RUN/render/index.json`` records what was drawn under which key (the drawing code + options
+ the results file's size and time + the dataset config); a later call draws only what is
missing, and a changed key (new results, other options, new drawing code) starts the folder
afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from artifacts.fingerprint import fingerprint
from reports.data import Run, SourceImages
from stages.render import encode_image, fit_image, heatmap_overlay, render_views, scale_heatmap

RENDER_VERSION = "1"
INDEX = "index.json"


@dataclass(frozen=True)
class RenderOptions:
    alpha: float = 0.6           # overlay opacity at a map's maximum
    min_alpha: float = 0.3       # ... and at its minimum: the cold colour covers the image, so a map
                                 # whose heat sits in 1% of the cells is still seen as a map
    colormap: str = "turbo"
    interpolation: str = "bilinear"
    max_side: int = 384
    format: str = "jpeg"         # about a tenth of PNG's size on photos; "png" keeps them lossless

    @property
    def ext(self) -> str:
        return "jpg" if self.format in ("jpeg", "jpg") else "png"


def safe_name(text: str, limit: int = 80) -> str:
    """A file-name-safe form of an id: other characters become '_', and a short hash of the
    id is appended whenever anything was changed, so distinct ids never collide."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit]
    if clean != text or not clean:
        clean = f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return clean


def _code_fingerprint() -> str:
    """The drawing code itself, so pictures cached by an older version are redrawn."""
    import stages.render as drawing

    return fingerprint(Path(drawing.__file__).read_bytes(), Path(__file__).read_bytes(), length=16)


def render_key(run: Run, options: RenderOptions) -> str:
    st = run.results.stat()
    return fingerprint(RENDER_VERSION, _code_fingerprint(), asdict(options), st.st_size, st.st_mtime_ns,
                       run.dataset, length=16)


def writable_folder(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


@dataclass
class Rendered:
    folder: Path
    samples: dict[str, dict[str, str]]   # sample id -> view -> file name in folder
    images: dict[str, str]               # image id -> file name of the plain image
    shared: dict[str, dict[str, str]] = field(default_factory=dict)  # sample id -> heatmap label -> file
                                         # name of the heatmap drawn on the shared range
    patches_rebuilt: bool = False
    problem: str | None = None           # why images are missing, when they are


def shared_name(sid: str, label: str, lo: float, hi: float, ext: str) -> str:
    """File name of a heatmap drawn on the range ``[lo, hi]``: another range, another file."""
    return f"{safe_name(sid)}_{safe_name(label)}_shared-{fingerprint(repr(lo), repr(hi), length=8)}.{ext}"


def render_run(run: Run, sample_ids: list[str], images: SourceImages, options: RenderOptions = RenderOptions(),
               folder: Path | None = None, shared: dict[str, dict[str, list[float]]] | None = None) -> Rendered:
    """Draw the views of ``sample_ids`` (those the run has) into ``folder`` (default
    ``RUN/render``), reusing what an earlier call drew with the same key. ``shared``: ``{sample
    id: {heatmap label: [lo, hi]}}``, those heatmaps drawn once more on that range."""
    folder = Path(folder) if folder is not None else run.dir / "render"
    folder.mkdir(parents=True, exist_ok=True)
    key = render_key(run, options)
    index_path = folder / INDEX
    index = {"key": key, "samples": {}, "images": {}}
    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text())
        except ValueError:
            old = {}
        if old.get("key") == key:
            index = old
        else:
            for f in [*folder.glob("*.png"), *folder.glob("*.jpg")]:
                f.unlink()
    done_s: dict[str, dict[str, str]] = index["samples"]
    done_i: dict[str, str] = index["images"]

    def present(files) -> bool:
        return all((folder / f).is_file() for f in files)

    r = run.roles
    wanted = [s for s in dict.fromkeys(sample_ids) if s in run.index]
    todo = [s for s in wanted if not (s in done_s and present(done_s[s].values()))]
    wanted_h = {sid: {label: shared_name(sid, label, *shared[sid][label], options.ext)
                      for label in shared.get(sid, {}) if label in r.heatmaps}
                for sid in wanted if shared and shared.get(sid)}
    todo_h = {sid: {label: name for label, name in names.items() if not (folder / name).is_file()}
              for sid, names in wanted_h.items()}
    todo_h = {sid: names for sid, names in todo_h.items() if names}
    image_of = dict(zip(run.sample_ids, run.values("image_id")))
    need_images = {image_of[s] for s in wanted if not (image_of[s] in done_i and present([done_i[image_of[s]]]))}
    need_images |= {image_of[s] for s in [*todo, *todo_h]}

    patches_rebuilt = r.patches is None and r.caption_sampling is not None
    if todo or todo_h or need_images:
        pics = images.get_many(sorted(need_images))
        further = {label: c for label, c in r.heatmaps.items() if c not in (r.heatmap, r.enhanced)}
        cols = [r.heatmap, r.enhanced, r.points, r.scores, r.labels, r.mask, r.patches, r.attention, *further.values()]
        if patches_rebuilt:
            cols.append(r.caption_sampling["heatmap"])
        details = run.details(list(dict.fromkeys([*todo, *todo_h])), [c for c in cols if c])
        for iid in sorted(need_images):
            img = pics.get(iid)
            if img is None:
                continue
            name = f"image_{safe_name(iid)}.{options.ext}"
            (folder / name).write_bytes(encode_image(fit_image(img, options.max_side)[0], options.format))
            done_i[iid] = name
        overlay = dict(alpha=options.alpha, colormap=options.colormap, interpolation=options.interpolation,
                       min_alpha=options.min_alpha)
        for sid in todo:
            img = pics.get(image_of[sid])
            row = details.get(sid)
            if img is None or row is None:
                continue
            get = lambda c: None if c is None else row.get(c)  # noqa: E731
            patches = get(r.patches)
            if patches_rebuilt:
                patches = run.caption_patches(sid, get(r.caption_sampling["heatmap"]))
            views = render_views(img, heatmap=get(r.heatmap), enhanced=get(r.enhanced), points=get(r.points),
                                 scores=get(r.scores), labels=get(r.labels), mask=get(r.mask), patches=patches,
                                 attention=get(r.attention), max_side=options.max_side, **overlay)
            for label, column in further.items():  # drawn as the first heatmap is, under their own label
                heat = get(column)
                if heat is not None:
                    views[label] = render_views(img, heatmap=heat, max_side=options.max_side, views=("heatmap",),
                                                **overlay)["heatmap"]
            files = {}
            for view, pic in views.items():
                name = f"{safe_name(sid)}_{view}.{options.ext}"
                (folder / name).write_bytes(encode_image(pic, options.format))
                files[view] = name
            done_s[sid] = files
        for sid, names in todo_h.items():
            img = pics.get(image_of[sid])
            row = details.get(sid)
            if img is None or row is None:
                continue
            small = fit_image(img, options.max_side)[0]
            for label, name in names.items():
                heat = row.get(r.heatmaps[label])
                if heat is not None:
                    grid = scale_heatmap(heat, *shared[sid][label])
                    (folder / name).write_bytes(encode_image(heatmap_overlay(small, grid, normalise=False, **overlay),
                                                             options.format))
        tmp = folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index))
        tmp.replace(index_path)
    drawn_h = {sid: {label: name for label, name in names.items() if (folder / name).is_file()}
               for sid, names in wanted_h.items()}
    return Rendered(folder, {s: done_s[s] for s in wanted if s in done_s},
                    {image_of[s]: done_i[image_of[s]] for s in wanted if image_of[s] in done_i},
                    {sid: names for sid, names in drawn_h.items() if names}, patches_rebuilt, images.problem)
