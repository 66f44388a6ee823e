"""Training data from any dataset source, and the frozen models' features of its images.

Samples are read once from the source (light records: question, answers, scene, the image as
bytes or a path); images are decoded only when their features are computed. Frozen features
(BLIP ViT tokens ``[1+P, C1]`` and the SAM embedding ``[Cs, S, S]`` per image) are computed in
fixed chunks of image indices (``chunk`` images at a time, always the same chunks), so a
feature's value never depends on which step first needed it: a resumed run sees bit-identical
features. At most ``max_cached`` images' features stay in memory (least recently used chunks
are dropped and recomputed when needed again). A model trained on the images themselves reads
their BLIP pixels from a :class:`PixelStore`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from sources import SOURCES
from stages.images import FAMILIES, RESAMPLE, decode_image, read_image
from stages.text import blip_question
from training.loop import LoopSettings, Options
from training.pairs import Sample, SceneFacts, majority_answer


# --- the settings of a run's data ---------------------------------------------------------------

@dataclass
class ShapesSettings(LoopSettings):
    """The data settings of a run on the synthetic ``shapes`` source (sam, caption, fid, qavit)."""

    num_images: int = 16
    source_params: dict[str, Any] = field(default_factory=dict)
    eval_images: int = 16
    # source parameters that have their own options
    own_options: ClassVar[tuple[str, ...]] = ("seed", "num_images")

    @classmethod
    def add_options(cls, o: Options, images: str) -> None:
        """``--num-images`` (``images``: its help), ``--source-param``."""
        o.add(o.data, "--num-images", type=int, help=images)
        o.add(o.data, "--source-param", action="append", default=[], metavar="KEY=VALUE",
              help="other shapes parameter (VALUE parsed as YAML); repeatable")

    def check_data(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {self.num_images}")
        if self.eval_images < 0:
            raise ValueError(f"--eval-images must be >= 0, got {self.eval_images}")
        taken = set(self.own_options) & set(self.source_params)
        if taken:
            raise ValueError(f"--source-param {', '.join(sorted(taken))}: set "
                             + " / ".join(f"--{k.replace('_', '-')}" for k in self.own_options) + " with their options")

    def shapes_params(self, held_out: bool = False) -> Any:
        """The shapes source's params of the training set, or of the held-out set (``held_out``)."""
        if held_out:
            return source_params("shapes", self.held_out_seed, self.eval_images, self.source_params)
        return source_params("shapes", self.seed, self.num_images, self.source_params)


@dataclass
class SourceSettings(LoopSettings):
    """The data settings of a run on any dataset source (itm, fusion): pairs of its samples."""

    source: str = "shapes"
    num_images: int | None = 16      # None: the source's own (shapes: 16)
    source_params: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    swap_fraction: float = 0.5
    eval_images: int | None = None   # None: --num-images

    def __post_init__(self) -> None:
        if self.num_images is None and self.source == "shapes" and "num_images" not in self.source_params:
            self.num_images = 16

    @classmethod
    def add_options(cls, o: Options) -> None:
        o.add(o.data, "--source", help="dataset source (runtime sources)")
        o.add(o.data, "--num-images", type=int, default=None,
              help="images of the source (sources with num_images; shapes default 16)")
        o.add(o.data, "--source-param", action="append", default=[], metavar="KEY=VALUE",
              help="other source parameter (VALUE parsed as YAML); repeatable")
        o.add(o.data, "--limit", type=int, help="use only the first N samples")
        o.add(o.data, "--swap-fraction", type=float,
              help="share of negatives made by a colour/shape word swap where the scene allows it")
        o.add(o.evaluation, "--eval-images", type=int, help="images of the held-out set (default: --num-images; "
              "0 = no evaluation)")

    def train_params(self) -> Any:
        """The source's params of the training set."""
        return source_params(self.source, self.seed, self.num_images, self.source_params)

    def held_out_data(self, mask_grid: int | None = None) -> HeldOut | None:
        """The held-out set: the same source with seed ``held_out_seed`` and ``--eval-images``
        images (default ``--num-images``); None for ``--eval-images 0``."""
        eval_images = self.num_images if self.eval_images is None else self.eval_images
        if eval_images == 0:
            return None
        fields = SOURCES[self.source].Params.model_fields
        extra = {k: v for k, v in self.source_params.items() if k not in ("seed", "num_images")}
        params = source_params(self.source, self.held_out_seed, eval_images if "num_images" in fields else None,
                               extra)
        return HeldOut(load_data(self.source, params, self.limit, mask_grid=mask_grid), params, "seed" in fields)

    def check_data(self) -> None:
        if self.eval_images is not None and self.eval_images < 0:
            raise ValueError(f"--eval-images must be >= 0, got {self.eval_images}")
        if not 0.0 <= self.swap_fraction <= 1.0:
            raise ValueError(f"--swap-fraction must be in [0, 1], got {self.swap_fraction}")


@dataclass(frozen=True)
class TrainData:
    """``samples`` (each naming an image by index) and ``images[i]``: ``("bytes", b)`` or
    ``("path", p)``; ``scenes[i]``: the image's ``scene`` JSON (shapes) or None."""

    samples: list[Sample]
    images: list[tuple[str, Any]]
    image_ids: list[str]
    scenes: list[str | None] = field(default_factory=list)


def source_params(name: str, seed: int, num_images: int | None, extra: dict[str, Any]) -> Any:
    """The ``Params`` of source ``name``: ``extra``, plus ``seed`` / ``num_images`` where the
    source has such a field and ``extra`` does not set it."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of {', '.join(sorted(SOURCES))}")
    params_cls = SOURCES[name].Params
    fields = params_cls.model_fields
    values = dict(extra)
    if "seed" in fields:
        values.setdefault("seed", seed)
    if num_images is not None:
        if "num_images" not in fields:
            raise ValueError(f"source {name!r} has no num_images parameter; use --limit to cap the samples")
        values.setdefault("num_images", num_images)
    return params_cls(**values)


class HeldOut(NamedTuple):
    """A run's held-out set: ``data``, its source ``params``, and ``held_out``: False when the
    source has no seed, so the set is the training data itself."""

    data: TrainData
    params: Any
    held_out: bool


def load_data(name: str, params: Any, limit: int | None = None, mask_grid: int | None = None) -> TrainData:
    """Read the samples of source ``name`` (at most ``limit``), questions as BLIP sees them;
    with ``mask_grid``, each sample's ground-truth mask (``gt_mask``) pooled to that grid."""
    from grids import pool_to_grid

    source = SOURCES[name](params)
    problems = source.problems()
    if problems:
        raise ValueError(f"source {name!r} is not usable: " + "; ".join(f"{k}: {m}" for k, m in problems))
    samples: list[Sample] = []
    images: list[tuple[str, Any]] = []
    image_ids: list[str] = []
    scenes: list[str | None] = []
    index: dict[str, int] = {}
    for record in source.iter_samples():
        if limit is not None and len(samples) >= limit:
            break
        image_id = str(record["image_id"])
        if image_id not in index:
            index[image_id] = len(images)
            image_ids.append(image_id)
            scenes.append(record.get("scene"))
            if record.get("image_bytes") is not None:
                images.append(("bytes", record["image_bytes"]))
            elif record.get("image_path"):
                images.append(("path", record["image_path"]))
            else:
                raise ValueError(f"sample {record['sample_id']} has neither image bytes nor an image path")
        cells = None
        if mask_grid is not None and record.get("gt_mask") is not None:
            cells = pool_to_grid(np.asarray(record["gt_mask"])[None], mask_grid).reshape(-1)
        samples.append(Sample(image=index[image_id], question=blip_question(record["question"]),
                              answer=majority_answer(record.get("answers")),
                              scene=SceneFacts.from_json(record.get("scene")), cells=cells))
    if len(images) < 2:
        raise ValueError(f"source {name!r} gave {len(images)} image(s); training needs at least two "
                         "(negatives are questions of other images)")
    return TrainData(samples=samples, images=images, image_ids=image_ids, scenes=scenes)


def decode(entry: tuple[str, Any]) -> np.ndarray:
    kind, value = entry
    return decode_image(value, "image bytes") if kind == "bytes" else read_image(value)


def blip_pixels(images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """LAVIS BLIP preprocessing (as ``preprocess_image`` family blip): PIL bicubic resize to a
    square, [0, 1], CLIP mean / std -> ``[B, 3, S, S]`` float32."""
    return blip_normalised(np.stack([blip_resized(im, image_size) for im in images]))


def blip_resized(image: np.ndarray, image_size: int) -> np.ndarray:
    """The first half of :func:`blip_pixels`: ``uint8 [H, W, 3]`` -> ``uint8 [S, S, 3]``."""
    return np.asarray(Image.fromarray(image).resize((image_size, image_size),
                                                     RESAMPLE[FAMILIES["blip"]["interpolation"]]))


def blip_normalised(resized: np.ndarray) -> torch.Tensor:
    """The second half of :func:`blip_pixels`: ``uint8 [B, S, S, 3]`` -> ``float32 [B, 3, S, S]``."""
    family = FAMILIES["blip"]
    x = resized.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(family["mean"], np.float32)) / np.asarray(family["std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


class PixelStore:
    """BLIP pixels of the dataset's images (LAVIS preprocessing, as :func:`blip_pixels`), the
    resized uint8 images of the ``max_cached`` most recently used ones kept in memory. Each image
    is preprocessed alone, so a value never depends on the batch it first appeared in."""

    def __init__(self, data, image_size: int, max_cached: int) -> None:
        self.data, self.size, self.max_cached = data, image_size, max(1, max_cached)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _resized(self, i: int) -> np.ndarray:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        resized = blip_resized(decode(self.data.images[i]), self.size)
        self._cache[i] = resized
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return resized

    def get(self, indices: Sequence[int]):
        """``[U, 3, S, S]`` float32 (normalised) of the images ``indices``."""
        return blip_normalised(np.stack([self._resized(int(i)) for i in indices]))


class FeatureStore:
    """Frozen BLIP ViT tokens and SAM embeddings of the dataset's images, by image index."""

    def __init__(self, data: TrainData, itm, sam, device: torch.device, chunk: int = 16,
                 max_cached: int = 4096) -> None:
        self.data, self.itm, self.sam, self.device = data, itm, sam, device
        self.chunk = max(1, chunk)
        self.max_chunks = max(1, max_cached // self.chunk)
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _compute(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        entries = self.data.images[c * self.chunk:(c + 1) * self.chunk]
        images = [decode(e) for e in entries]
        with torch.no_grad():
            pixels = blip_pixels(images, self.itm.config.vit.image_size).to(self.device)
            tokens = self.itm.encode_image(pixels).float()
            embed = self.sam.embed(self.sam.preprocess(images, device=self.device)).float()
        return tokens, embed

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``blip_tokens [U, 1+P, C1]``, ``sam_embed [U, Cs, S, S]`` of the images ``indices``."""
        tokens, embeds = [], []
        for i in indices:
            c = int(i) // self.chunk
            if c in self._cache:
                self._cache.move_to_end(c)
            else:
                self._cache[c] = self._compute(c)
                while len(self._cache) > self.max_chunks:
                    self._cache.popitem(last=False)
            t, e = self._cache[c]
            tokens.append(t[int(i) - c * self.chunk])
            embeds.append(e[int(i) - c * self.chunk])
        return torch.stack(tokens), torch.stack(embeds)
