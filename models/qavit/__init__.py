"""QA-ViT (amazon-science/QA-ViT, "Question Aware Vision Transformer for Multimodal Reasoning",
CVPR 2024): a CLIP ViT whose chosen layers attend to the encoded question.

    config.py     the presets table (tiny / shapes / l14_336: sizes, weights, question encoder), integration
                  points -> instruction layers, CLIP preprocessing
    attention.py  instruction-aware self-attention (reference and gated formulations), projector
    model.py      InstructCLIPVisionModel (published key layout), QAViT (+ T5 question encoder)
    maps.py       CLS-to-patch attention, attention rollout
    checkpoint.py the QAVIT family: presets -> models, QA-ViT / plain CLIP weights, question encoder
"""

from models.lazy import lazy_exports

_EXPORTS = {
    "attention": ["FORMULATIONS", "InstructCLIPEncoderLayer", "InstructionAttention", "instruction_projector",
                  "qavit_attention"],
    "checkpoint": ["QAVIT", "QAViTReport", "build_vision", "load_qavit", "load_question_encoder", "read_vision_state",
                   "to_vision_layout"],
    "config": ["CLIP_MEAN", "CLIP_STD", "INTEGRATION_POINTS", "PRESETS", "QAViTConfig", "clip_preprocess",
               "instruction_layers", "integration_point_of", "with_integration_point"],
    "maps": ["attention_rollout", "cls_to_patches", "rollout_row", "with_residual"],
    "model": ["InstructCLIPVisionModel", "QAViT", "QAViTOutput"],
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
