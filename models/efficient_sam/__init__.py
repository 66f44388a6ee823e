"""EfficientSAM (yformer/EfficientSAM) for point-prompted masks on question-guided heatmaps.

    common.py              LayerNorm2d, MLP
    image_encoder.py       ViT encoder + neck: pixels -> [B, 256, 64, 64]
    prompt_encoder.py      points + labels -> sparse tokens; dense positional encoding
    two_way_transformer.py the decoder's two-way transformer
    mask_decoder.py        tokens + embedding -> 3 mask logits + predicted IoU
    efficient_sam.py       EfficientSam (embed once, predict_masks many times), preprocess
    config.py              the presets table: tiny / shapes / vitt / vits sizes and weights sources
    checkpoint.py          the EFFICIENT_SAM family: presets -> models, published and bundled (shapes) checkpoints
"""

from models.lazy import lazy_exports

_EXPORTS = {
    "checkpoint": ["EFFICIENT_SAM", "build_model", "load_efficient_sam"],
    "config": ["PRESETS", "SamConfig"],
    "efficient_sam": ["MASK_THRESHOLD", "PIXEL_MEAN", "PIXEL_STD", "EfficientSam", "preprocess"],
    "image_encoder": ["ImageEncoderViT", "grid_pos_embed"],
    "mask_decoder": ["MaskDecoder"],
    "prompt_encoder": ["PromptEncoder"],
    "two_way_transformer": ["TwoWayTransformer"],
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
