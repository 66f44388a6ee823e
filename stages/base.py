"""The stage contract: typed params, declared columns, setup once per worker, batch processing.

A stage never imports the runtime. The runtime builds a stage from validated params, calls
``setup(device)`` once per worker and then ``process(batch)`` for batches of rows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict

from artifacts.columns import ColumnSpec
from plugins import Registry


class StageParams(BaseModel):
    """Base of every stage's params: unknown keys are rejected, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Granularity(str, enum.Enum):
    IMAGE = "image"    # one row per image; results are shared by every question of the image
    SAMPLE = "sample"  # one row per (image, question)


@dataclass(frozen=True)
class Input:
    """A declared input column.

    ``per_image``: the value is the same for every question of an image (e.g. pixels) and is
    handed over once per distinct image of the batch, ``batch.image_rows`` mapping rows to it,
    so a per-sample stage encodes each image once however many questions share it.
    """

    spec: ColumnSpec
    doc: str
    optional: bool = False
    per_image: bool = False


class Role(str, enum.Enum):
    """What an output is, for the readers of a run (report, comparison, export, summary): they
    pick columns by role, so a plugin's outputs are shown exactly like the project's own. The run
    manifest records the role of each kept column (``roles``)."""

    HEATMAP = "heatmap"                    # question-guided heatmap on a grid [g, g], drawn over the image
    ENHANCED_HEATMAP = "enhanced_heatmap"  # a heatmap refined by a segmentation mask [g, g]
    ATTENTION = "attention"                # attention maps per layer [L, g, g]
    POINTS = "points"                      # (x, y) prompt points in image pixels [K, 2]
    POINT_LABELS = "point_labels"          # 1 foreground, 0 background, -1 padding per point [K]
    POINT_SCORES = "point_scores"          # strength of each point [K]
    MASK = "mask"                          # segmentation mask over the image (1 = on)
    PATCHES = "patches"                    # flat grid cells sampled per caption [C, P]
    CAPTIONS = "captions"                  # captions of the image
    ANSWER = "answer"                      # the predicted answer
    MATCH_SCORE = "match_score"            # how well the question matches the image (ITM)
    ACCURACY = "accuracy"                  # VQA accuracy of the answer in [0, 1]
    STATUS = "status"                      # what the stage did for the row (e.g. a fallback)
    POINTING_GAME = "pointing_game"        # 1 if a heatmap's hottest cell hits the ground truth
    ENERGY_IN_MASK = "energy_in_mask"      # share of a heatmap's mass inside the ground truth
    # heatmap faithfulness without masks (heatmap_faithfulness): areas under the ITM match
    # curve as a heatmap's highest cells are deleted / inserted / ROAD-imputed first (deletion,
    # road: lower is better; insertion: higher), and the same for a random and a centre order
    DELETION_AUC = "deletion_auc"
    INSERTION_AUC = "insertion_auc"
    ROAD_AUC = "road_auc"
    RANDOM_DELETION_AUC = "random_deletion_auc"
    RANDOM_INSERTION_AUC = "random_insertion_auc"
    RANDOM_ROAD_AUC = "random_road_auc"
    CENTRE_DELETION_AUC = "centre_deletion_auc"
    CENTRE_INSERTION_AUC = "centre_insertion_auc"
    CENTRE_ROAD_AUC = "centre_road_auc"
    DELETION_CURVE = "deletion_curve"      # the heatmap order's curves [steps + 1]
    INSERTION_CURVE = "insertion_curve"
    ROAD_CURVE = "road_curve"


@dataclass(frozen=True)
class Output:
    """A declared output column; ``role`` (a ``Role`` or its value, e.g. ``"heatmap"``) says what
    it is, None for a column no reader looks for by what it is."""

    spec: ColumnSpec
    doc: str
    role: Role | None = None

    def __post_init__(self):
        if self.role is not None:  # "heatmap" -> Role.HEATMAP; an unknown role is an error here
            object.__setattr__(self, "role", Role(self.role))


@dataclass(frozen=True)
class Resources:
    """What one worker of the stage asks for.

    ``gpu`` is the GPU fraction per worker when the cluster has GPUs (0 = CPU stage);
    ``batch_size`` the preferred number of rows per ``process`` call on a CPU, and
    ``cuda_batch_size`` on a GPU (None: the same). Model stages' values come from
    ``bench/run.py --only batch`` (bench/results/bench.md).
    """

    gpu: float = 0.0
    batch_size: int = 256
    cuda_batch_size: int | None = None

    def batch_size_on(self, device: str) -> int:
        if device.startswith("cuda") and self.cuda_batch_size is not None:
            return self.cuda_batch_size
        return self.batch_size


@dataclass
class Batch(Mapping[str, Any]):
    """The rows handed to ``Stage.process``.

    ``batch[name]`` is the input column: fixed-shape tensors as ``np.ndarray [N, *shape]``,
    numeric scalars as ``np.ndarray [N]``, other types as lists. Null entries (only in
    optional inputs) are zero / None; ``valid(name)`` says which rows hold a value.
    ``row_ids`` are the sample ids (or image ids for per-image stages), for per-row seeding.
    Inputs declared ``per_image`` hold one entry per distinct image of the batch;
    ``image_rows[i]`` is the entry of row ``i``.
    """

    columns: dict[str, Any]
    validity: dict[str, np.ndarray]
    row_ids: list[str]
    image_rows: np.ndarray | None = None
    failures: dict[int, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.columns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.row_ids)

    def valid(self, name: str) -> np.ndarray:
        return self.validity[name]

    def fail(self, row: int, message: str) -> None:
        """Mark one row as failed; its outputs become null and the run goes on."""
        self.failures[row] = message


class Stage:
    """Base class of every operator. Subclasses set the class attributes and ``process``."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[StageParams]] = StageParams
    granularity: ClassVar[Granularity] = Granularity.SAMPLE
    cacheable: ClassVar[bool] = True
    resources: ClassVar[Resources] = Resources()
    INPUTS: ClassVar[dict[str, Input]] = {}
    OUTPUTS: ClassVar[dict[str, Output]] = {}

    def __init__(self, params: StageParams):
        self.params = params
        self.device = "cpu"

    # --- declared schema (override when it depends on params) -----------------------------
    def inputs(self) -> dict[str, Input]:
        return dict(self.INPUTS)

    def outputs(self) -> dict[str, Output]:
        return dict(self.OUTPUTS)

    # --- checks the runtime runs before any work ------------------------------------------
    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for anything that would make the run fail (missing files)."""
        return []

    def wiring_problems(self, wired: set[str]) -> list[tuple[str, str]]:
        """``(field, message)`` for input combinations the stage cannot work with (e.g. two
        alternative inputs both wired); ``wired`` holds the names of the wired inputs."""
        return []

    def binding_problems(self, dims: dict[str, int]) -> list[tuple[str, str]]:
        """``(field, message)`` when the tensor sizes bound from the wired inputs (the symbols of
        the input specs, e.g. ``{"g": 24}``) do not suit the stage (e.g. trained weights)."""
        return []

    def weights_fingerprint(self) -> str | None:
        """A fingerprint of the model weights this stage will load (part of the cache key)."""
        return None

    def trained_on(self) -> str | None:
        """The data (a ``Source.data`` value) the weights this stage will load were trained on,
        where known: a run on other data warns that its answers mean little."""
        return None

    def compute_dtype(self) -> str:
        """The floating-point type the stage computes in (part of the cache key): its ``dtype``
        param when it has one, else float32."""
        return str(getattr(self.params, "dtype", None) or "float32")

    # --- work ----------------------------------------------------------------------------
    def setup(self, device: str) -> None:
        """Load models once per worker."""
        self.device = device

    def process(self, batch: Batch) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


# Every stage by name, for graph files: this project's stages add themselves (``@STAGES.add``),
# other packages' through the ``pnpvqa.stages`` entry points (plugins/__init__.py).
STAGES: Registry[type[Stage]] = Registry("stage", "pnpvqa.stages", lambda cls: cls.name)
