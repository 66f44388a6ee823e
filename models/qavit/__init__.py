"""QA-ViT (amazon-science/QA-ViT, "Question Aware Vision Transformer for Multimodal Reasoning",
CVPR 2024): a CLIP ViT whose chosen layers attend to the encoded question.

    config.py     tiny / l14_336 sizes, integration points -> instruction layers, CLIP preprocessing
    attention.py  instruction-aware self-attention (reference and gated formulations), projector
    model.py      InstructCLIPVisionModel (published key layout), QAViT (+ T5 question encoder)
    maps.py       CLS-to-patch attention, attention rollout
    checkpoint.py presets -> models, QA-ViT / plain CLIP weights, question encoder, fingerprints
"""

from models.lazy import lazy_exports

_EXPORTS = {
    "attention": ["FORMULATIONS", "InstructCLIPEncoderLayer", "InstructionAttention", "instruction_projector",
                  "qavit_attention"],
    "checkpoint": ["QAViTReport", "build_vision", "find_question_encoder", "find_vision_weights", "load_qavit",
                   "load_question_encoder", "read_vision_state", "to_vision_layout", "weights_fingerprint"],
    "config": ["CLIP_MEAN", "CLIP_STD", "INTEGRATION_POINTS", "PRESETS", "QAViTConfig", "clip_preprocess",
               "instruction_layers", "integration_point_of", "qavit_config"],
    "maps": ["attention_rollout", "cls_to_patches", "rollout_row", "with_residual"],
    "model": ["InstructCLIPVisionModel", "QAViT", "QAViTOutput"],
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
