"""EfficientSAM (yformer/EfficientSAM) for point-prompted masks on question-guided heatmaps.

    common.py              LayerNorm2d, MLP
    image_encoder.py       ViT encoder + neck: pixels -> [B, 256, 64, 64]
    prompt_encoder.py      points + labels -> sparse tokens; dense positional encoding
    two_way_transformer.py the decoder's two-way transformer
    mask_decoder.py        tokens + embedding -> 3 mask logits + predicted IoU
    efficient_sam.py       EfficientSam (embed once, predict_masks many times), preprocess
    config.py              tiny / shapes / vitt / vits sizes
    checkpoint.py          presets -> models, published and bundled (shapes) checkpoints, fingerprints
"""

from models.efficient_sam.checkpoint import (build_model, find_efficient_sam, load_efficient_sam,
                                             weights_fingerprint)
from models.efficient_sam.config import PRESETS, SamConfig, sam_config
from models.efficient_sam.efficient_sam import MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD, EfficientSam, preprocess
from models.efficient_sam.image_encoder import ImageEncoderViT, grid_pos_embed
from models.efficient_sam.mask_decoder import MaskDecoder
from models.efficient_sam.prompt_encoder import PromptEncoder
from models.efficient_sam.two_way_transformer import TwoWayTransformer

__all__ = [
    "EfficientSam", "ImageEncoderViT", "MASK_THRESHOLD", "MaskDecoder", "PIXEL_MEAN", "PIXEL_STD", "PRESETS",
    "PromptEncoder", "SamConfig", "TwoWayTransformer", "build_model", "find_efficient_sam", "grid_pos_embed",
    "load_efficient_sam", "preprocess", "sam_config", "weights_fingerprint",
]
