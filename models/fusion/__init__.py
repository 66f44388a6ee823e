"""Fusion of BLIP image tokens with an EfficientSAM embedding (DESIGN section 8, "Feature fusion").

Every module maps ``blip_tokens [B, 1+P, C1]`` and ``sam_embed [B, Cs, S, S]`` to fused tokens
``[B, 1+P, C1]`` (same shape as BLIP's, so ITM / GradCAM / captioning read them unchanged):

    module(blip_tokens, sam_embed, blip_mask=None, sam_mask=None) -> fused

and is built so that, untrained, ``fused == blip_tokens`` exactly (zero-initialised output
projection added residually): a graph with fusion works with pretrained BLIP before any fusion
is trained.

    config.py          FusionConfig (mode, widths, grid, heads, Lf / T / N, ...)
    common.py          input checks, SAM resampling, masks, attention
    concat_conv.py     1x1 conv over [BLIP grid ; SAM resized], learned CLS
    cross_attention.py BLIP tokens query (resized) SAM tokens
    difnet.py          DIFNet two-stream multi-level encoder (formulation "gated")
    difnet_reference.py  the published DIFNet encoder, layer for layer (formulation "reference")
    checkpoint.py      build / save / load (safetensors + config metadata), fingerprints, the
                       published DIFNet encoder's key layout (load_reference_encoder)

There are no pretrained BLIP + SAM fusion weights; ``runtime train fusion`` (``training.fusion``) trains
them with frozen BLIP ITM and SAM. GradCAM on fused tokens has a weaker spatial meaning than on
the original ViT tokens (attention and convolutions mix positions).
"""

from models.lazy import lazy_exports

_EXPORTS = {
    "checkpoint": ["FORMAT", "build_fusion", "fusion_fingerprint", "import_difnet_encoder", "load_fusion",
                   "load_reference_encoder", "read_fusion_config", "save_fusion"],
    "concat_conv": ["ConcatConvFusion"],
    "config": ["MODES", "FusionConfig"],
    "cross_attention": ["CrossAttentionFusion"],
    "difnet": ["DifnetFusion", "DifnetLayer", "DifnetTrace"],
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
