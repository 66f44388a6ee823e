"""The EfficientSAM presets: sizes and weights source of each (the family's one table).

``vitt`` / ``vits``: the published EfficientSAM-Ti / -S (yformer/EfficientSAM
``build_efficient_sam``): ViT width 192 / 384 with 3 / 6 heads, 12 blocks, 16-px patches on
1024x1024 inputs (64x64 grid), neck and decoder width 256, two-way transformer of depth 2 with
8 heads and MLP 2048, upscaling 256 -> 64 -> 32 channels, 3 multimask outputs, at most 6
prompt points. ``tiny``: the same architecture with small widths and 256x256 inputs (16x16
grid, 64x64 low-res masks), for tests and for running without a checkpoint. ``shapes``: the
same architecture at 256x256 inputs (16x16 grid, 64x64 low-res masks), wide enough to segment
the synthetic ``shapes`` scenes and cheap on a CPU (ViT width 64, 4 blocks of 4 heads, neck
and decoder width 64, decoder MLP 256, upscaling 64 -> 32 -> 16 channels; under 1 M
parameters), trained by the project (``runtime train sam``) and shipped with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models.family import Preset, Published, RandomInit, Shipped


@dataclass(frozen=True)
class SamConfig:
    image_size: int                  # encoder input side (inputs are resized to a square)
    encoder_width: int
    encoder_depth: int
    encoder_heads: int
    embed_dim: int = 256             # neck output = prompt/decoder width
    patch_size: int = 16
    mlp_ratio: float = 4.0
    pretrain_grid: int = 14          # pos_embed is stored at this grid (+ a CLS slot)
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    upscaling_dims: tuple[int, ...] = (64, 32)
    num_multimask_outputs: int = 3
    iou_head_layers: int = 2         # hidden layers of the IoU MLP (the reference's iou_head_depth 3 - 1)
    iou_head_hidden: int = 256
    max_points: int = 6              # prompts are padded (label -1) to this many points

    @property
    def embed_grid(self) -> int:
        """Side of the image-embedding grid (64 for 1024-px inputs)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's mask logits (4x the grid: 256 for the real presets)."""
        return self.embed_grid * 2 ** len(self.upscaling_dims)

    def to_dict(self) -> dict:
        return {**asdict(self), "upscaling_dims": list(self.upscaling_dims)}


REPO = "https://github.com/yformer/EfficientSAM"

PRESETS: dict[str, Preset] = {
    "tiny": Preset(SamConfig(image_size=256, encoder_width=32, encoder_depth=2, encoder_heads=2, embed_dim=32,
                             decoder_heads=4, decoder_mlp_dim=64, upscaling_dims=(16, 8), iou_head_hidden=32),
                   RandomInit(), "random, tests"),
    "shapes": Preset(SamConfig(image_size=256, encoder_width=64, encoder_depth=4, encoder_heads=4, embed_dim=64,
                               decoder_heads=4, decoder_mlp_dim=256, upscaling_dims=(32, 16), iou_head_hidden=64),
                     Shipped("efficient_sam.safetensors", "bin/train-shapes sam"),
                     "trained by the project on the synthetic shapes data, shipped in models/assets/shapes"),
    "vitt": Preset(SamConfig(image_size=1024, encoder_width=192, encoder_depth=12, encoder_heads=3),
                   Published((("efficient_sam_vitt.pt", f"{REPO} (weights/efficient_sam_vitt.pt)"),)),
                   "ViT-T, efficient_sam_vitt.pt from the --weights folder"),
    "vits": Preset(SamConfig(image_size=1024, encoder_width=384, encoder_depth=12, encoder_heads=6),
                   Published((("efficient_sam_vits.pt", f"{REPO} (weights/efficient_sam_vits.pt.zip: "
                                      "distributed zipped, unzip it to efficient_sam_vits.pt)"),)),
                   "ViT-S, efficient_sam_vits.pt from the --weights folder"),
}
