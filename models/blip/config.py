"""The BLIP presets (``tiny``, ``shapes``, ``base``, ``large``): the family's one table of sizes
(shared by ITM and captioner), weights per model kind and tokenizer.

``base``: ViT-B/16 + BERT-base; ``large``: ViT-L/16 + BERT-base whose cross-attention reads
1024-wide image tokens; ``tiny``: the same architecture with small widths but the real grid (384 px,
24x24 patches) and the real 12 text layers, so graphs written for the real models (GradCAM
``block_num`` 7, 20 sampled patches) run unchanged; it uses the bundled tiny vocabulary.
``shapes``: the same grid, twice tiny's widths, a deeper ViT and 4 text layers (GradCAM at
layer 2: a 12-layer post-LayerNorm text encoder trained from scratch on a CPU budget stalled);
trained by the project on the ``shapes`` data (weights bundled in ``models/assets/shapes``).

Plain data, no torch: validation, cache keys and ``runtime stages`` read sizes from here
without importing the model code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

from models.family import Preset, Published, RandomInit, Shipped

# the bundled tiny vocabulary (built by models/assets/build_tiny_bert.py), used by tiny and shapes
TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_bert"

EMBED_DIM = 256  # ITC projection width (vision_proj / text_proj)


@dataclass(frozen=True)
class VitConfig:
    image_size: int
    width: int
    depth: int
    heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6  # LAVIS; transformers' BLIP ViT uses 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    encoder_width: int = 768
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class BlipConfig:
    vit: VitConfig
    bert: BertConfig
    embed_dim: int = EMBED_DIM
    gradcam_block: int = 7  # the text layer PNP-VQA reads GradCAM from (LAVIS: 7 of 12)

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=None)
def tiny_vocab_size() -> int:
    """Number of tokens of the bundled tiny tokenizer (``[DEC]`` and ``[ENC]`` included)."""
    with open(TINY_TOKENIZER_DIR / "vocab.txt", encoding="utf-8") as fh:
        return sum(1 for line in fh if line.rstrip("\n"))


def _sizes(vit: VitConfig, text: BertConfig, **kw) -> BlipConfig:
    """A BLIP config whose text model's cross-attention reads ``vit``-wide image tokens."""
    return BlipConfig(vit=vit, bert=replace(text, encoder_width=vit.width), **kw)


@dataclass(frozen=True)
class BlipPreset(Preset):
    """A BLIP preset: its weights per model kind (``itm`` / ``caption``; one random init for
    both) and its tokenizer folder (bundled, or ``bert-base-uncased`` in the weights folder)."""

    tokenizer: Path | Published = TINY_TOKENIZER_DIR


BERT_TOKENIZER = Published((("bert-base-uncased", "https://huggingface.co/google-bert/bert-base-uncased "
                             "(vocab.txt, tokenizer.json, tokenizer_config.json)"),))
_BLIP = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
_LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP/"


def _published(*names: str, site: str = _BLIP) -> Published:
    """``names`` as published under ``site`` (the first preferred)."""
    return Published(tuple((name, site + name) for name in names))


# standard file names (first = preferred; LAVIS configs blip_itm_{base,large}.yaml,
# blip_caption_{base,large}_coco.yaml; the *_train2014 files are PNP-VQA's own choice)
PRESETS: dict[str, BlipPreset] = {
    "tiny": BlipPreset(
        _sizes(VitConfig(image_size=384, width=64, depth=2, heads=4),  # 24x24 grid, as the real models
               BertConfig(vocab_size=tiny_vocab_size(), hidden_size=64, num_layers=12, num_heads=4,
                          intermediate_size=128, max_position=64)),
        RandomInit(), "random, tests"),
    "shapes": BlipPreset(
        _sizes(VitConfig(image_size=384, width=128, depth=4, heads=4),
               BertConfig(vocab_size=tiny_vocab_size(), hidden_size=128, num_layers=4, num_heads=4,
                          intermediate_size=512, max_position=64), gradcam_block=2),
        {"itm": Shipped("blip_itm.safetensors", "bin/train-shapes itm"),
         "caption": Shipped("blip_caption.safetensors", "bin/train-shapes caption")},
        "trained on the shapes data, bundled"),
    "base": BlipPreset(
        _sizes(VitConfig(image_size=384, width=768, depth=12, heads=12), BertConfig()),  # ViT-B/16
        {"itm": _published("model_base_retrieval_coco.pth"),
         "caption": Published((("blip_coco_caption_base.pth", _LAVIS + "blip_coco_caption_base.pth"),
                               ("model_base_capfilt_large.pth", _BLIP + "model_base_capfilt_large.pth")))},
        "LAVIS checkpoint from the --weights folder", tokenizer=BERT_TOKENIZER),
    "large": BlipPreset(
        _sizes(VitConfig(image_size=384, width=1024, depth=24, heads=16), BertConfig()),  # ViT-L/16
        {"itm": _published("model_large_retrieval_coco.pth", "model_large_retrieval_coco_train2014.pth"),
         "caption": _published("model_large_caption.pth", "model_large_caption_coco_train2014.pth")},
        "LAVIS checkpoint from the --weights folder", tokenizer=BERT_TOKENIZER),
}
