"""The QA-ViT presets (the family's one table: sizes, vision weights, question encoder), the
integration points and the CLIP preprocessing facts.

``l14_336``: the published QA-ViT configuration (amazon-science/QA-ViT, VisualT5 configs): CLIP
ViT-L/14 at 336 px (24 layers, width 1024, 16 heads, MLP 4096, quick-GELU, LayerNorm eps 1e-5,
24x24 patch grid + CLS = 577 tokens), instructions from the flan-t5-base encoder (width 768),
integration ``late`` (layers 12-23). ``tiny``: the same architecture with small widths (112 px,
patch 14 -> 8x8 grid, width 64, 4 layers, 4 heads) and the tiny T5 encoder (width 64), for tests
and for running without a checkpoint.

``shapes``: the same architecture at a size trained by the project from scratch on the synthetic
``shapes`` data (``runtime train qavit``; weights bundled as ``models/assets/shapes/qavit.safetensors``):
168 px, patch 14 -> 12x12 grid (half of l14_336's 336 px with the same patch, and exactly half of
the captioner's 24x24 grid), width 128, 6 layers (instructions in 3-5, ``late``), 4 heads, MLP
512, and a 2-layer T5 encoder of width 128 over the tiny T5 vocabulary
(:data:`SHAPES_QUESTION_ENCODER`), whose trained weights live in the same file
(``question_encoder.*``). Feed it ``preprocess_image`` family ``clip`` with ``image_size`` 168.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models.family import Preset, Published, RandomInit, Shipped
from models.fid_t5_family import PRESETS as FID_T5_PRESETS

INTEGRATION_POINTS = ("all", "early", "late", "late2", "late3", "sparse")

# CLIP's normalisation of [0, 1] RGB pixels (openai/clip-vit-large-patch14-336 preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# the shapes preset's question encoder: a T5 encoder (transformers ``T5Config`` fields) over the tiny
# T5 vocabulary (models/assets/tiny_t5); no dropout, so training is a deterministic function of the data
SHAPES_QUESTION_ENCODER = dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                               feed_forward_proj="relu", dropout_rate=0.0, tie_word_embeddings=True,
                               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def instruction_layers(num_layers: int, integration_point: str) -> list[int]:
    """Indices of the ViT layers that read the question, as the reference's ``InstructCLIPEncoder``
    chooses them for ``num_layers`` layers (``L``):

    - ``all``: every layer;
    - ``early``: the first half, ``i < L // 2`` (0-11 of 24);
    - ``late``: the second half, ``i >= L // 2`` (12-23 of 24; the published setting);
    - ``late2``: the last quarter, ``i >= 3 * L // 4`` (18-23 of 24);
    - ``late3``: all but the first quarter, ``i >= L // 4`` (6-23 of 24);
    - ``sparse``: every other layer from the first, ``i % 2 == 0`` (0, 2, ..., 22 of 24).
    """
    rules = {
        "all": lambda i: True,
        "early": lambda i: i < num_layers // 2,
        "late": lambda i: i >= num_layers // 2,
        "late2": lambda i: i >= 3 * num_layers // 4,
        "late3": lambda i: i >= num_layers // 4,
        "sparse": lambda i: i % 2 == 0,
    }
    if integration_point not in rules:
        raise ValueError(f"unknown integration_point {integration_point!r}; choose one of "
                         f"{', '.join(INTEGRATION_POINTS)}")
    return [i for i in range(num_layers) if rules[integration_point](i)]


def integration_point_of(num_layers: int, layers: list[int] | set[int]) -> str | None:
    """The integration point that puts instruction modules in exactly ``layers``, else ``None``
    (when two names give the same layers, e.g. for tiny depths, the first in
    ``INTEGRATION_POINTS`` order after ``late`` is preferred: ``late`` first, the published one)."""
    wanted = sorted(layers)
    for name in ("late", *[p for p in INTEGRATION_POINTS if p != "late"]):
        if instruction_layers(num_layers, name) == wanted:
            return name
    return None


@dataclass(frozen=True)
class QAViTConfig:
    image_size: int            # input side S in pixels (square)
    patch_size: int
    width: int                 # ViT hidden size
    depth: int                 # ViT layers
    heads: int
    mlp_dim: int
    text_dim: int              # width of the question encoder's states (instruction_dim)
    integration_point: str = "late"
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    initializer_factor: float = 1.0  # scales CLIP's random init (tiny: 2, so that attention is not flat)

    @property
    def grid(self) -> int:
        """Side of the patch grid (24 for ViT-L/14 at 336 px)."""
        return self.image_size // self.patch_size

    @property
    def instruction_layers(self) -> list[int]:
        return instruction_layers(self.depth, self.integration_point)

    def clip_config(self):
        """The transformers ``CLIPVisionConfig`` of the ViT part."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(hidden_size=self.width, intermediate_size=self.mlp_dim,
                                num_hidden_layers=self.depth, num_attention_heads=self.heads,
                                image_size=self.image_size, patch_size=self.patch_size,
                                layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act,
                                initializer_factor=self.initializer_factor)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QAViTPreset(Preset):
    """A QA-ViT preset: besides the vision weights, its question encoder (the ``T5Config`` fields
    of a built-in T5 encoder, seeded random or trained into the vision file, or a published T5
    folder) and the plain CLIP weights that can stand in for its checkpoint."""

    question_encoder: dict | Published | None = None  # every preset names one (after Preset's fields: a default)
    clip: Published | None = None


_QAVIT_URL = "https://awscv-public-data.s3.us-west-2.amazonaws.com/qavit/checkpoint/vit%2Bt5/"

PRESETS: dict[str, QAViTPreset] = {
    "tiny": QAViTPreset(QAViTConfig(image_size=112, patch_size=14, width=64, depth=4, heads=4, mlp_dim=256,
                                    text_dim=64, initializer_factor=2.0),
                        RandomInit(), "random, tests; pixels at 112 px",
                        question_encoder=FID_T5_PRESETS["tiny"].config),
    "shapes": QAViTPreset(QAViTConfig(image_size=168, patch_size=14, width=128, depth=6, heads=4, mlp_dim=512,
                                      text_dim=SHAPES_QUESTION_ENCODER["d_model"]),
                          Shipped("qavit.safetensors", "bin/train-shapes qavit"),
                          "trained on the shapes data, bundled; 168 px", question_encoder=SHAPES_QUESTION_ENCODER),
    "l14_336": QAViTPreset(QAViTConfig(image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096,
                                       text_dim=768),
                           Published((("qavit-base2.pth", _QAVIT_URL + "qavit-base2.pth"),)),  # ViT+T5-base QA-ViT
                           "CLIP ViT-L/14-336 + flan-t5-base question encoder, from the --weights folder; 336 px",
                           question_encoder=Published((("flan-t5-base", "https://huggingface.co/google/flan-t5-base"),)),
                           clip=Published((("clip-vit-large-patch14-336",
                                            "https://huggingface.co/openai/clip-vit-large-patch14-336"),))),
}


def with_integration_point(config: QAViTConfig, integration_point: str | None) -> QAViTConfig:
    """``config`` with its instruction layers at ``integration_point`` (``None``: unchanged)."""
    if integration_point is None:
        return config
    instruction_layers(config.depth, integration_point)  # validates the name
    return QAViTConfig(**{**config.to_dict(), "integration_point": integration_point})


def clip_preprocess(preset: str) -> dict:
    """The ``preprocess_image`` params that feed ``preset``: family ``clip`` (bicubic resize to
    S x S, CLIP mean / std) at the preset's image size.

    The reference's ``CLIPImageProcessor`` resizes the shorter side to S and centre-crops S x S;
    ``preprocess_image`` resizes the whole image to S x S (aspect ratio not kept), so the heatmap
    covers the whole image, as the BLIP grid it is resampled to does.
    """
    cfg = PRESETS[preset].config
    return {"family": "clip", "image_size": cfg.image_size, "interpolation": "bicubic",
            "mean": CLIP_MEAN, "std": CLIP_STD}
