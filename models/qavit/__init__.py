"""QA-ViT (amazon-science/QA-ViT, "Question Aware Vision Transformer for Multimodal Reasoning",
CVPR 2024): a CLIP ViT whose chosen layers attend to the encoded question.

    config.py     tiny / l14_336 sizes, integration points -> instruction layers, CLIP preprocessing
    attention.py  instruction-aware self-attention (reference and gated formulations), projector
    model.py      InstructCLIPVisionModel (published key layout), QAViT (+ T5 question encoder)
    maps.py       CLS-to-patch attention, attention rollout
    checkpoint.py presets -> models, QA-ViT / plain CLIP weights, question encoder, fingerprints
"""

from models.qavit.attention import (FORMULATIONS, InstructCLIPEncoderLayer, InstructionAttention,
                                    instruction_projector, qavit_attention)
from models.qavit.checkpoint import (QAViTReport, build_vision, find_question_encoder, find_vision_weights,
                                     load_qavit, load_question_encoder, read_vision_state, to_vision_layout,
                                     weights_fingerprint)
from models.qavit.config import (CLIP_MEAN, CLIP_STD, INTEGRATION_POINTS, PRESETS, QAViTConfig, clip_preprocess,
                                 instruction_layers, integration_point_of, qavit_config)
from models.qavit.maps import attention_rollout, cls_to_patches, rollout_row, with_residual
from models.qavit.model import InstructCLIPVisionModel, QAViT, QAViTOutput

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "FORMULATIONS", "INTEGRATION_POINTS", "InstructCLIPEncoderLayer",
    "InstructCLIPVisionModel", "InstructionAttention", "PRESETS", "QAViT", "QAViTConfig", "QAViTOutput",
    "QAViTReport", "attention_rollout", "build_vision", "clip_preprocess", "cls_to_patches",
    "find_question_encoder", "find_vision_weights", "instruction_layers", "instruction_projector",
    "integration_point_of", "load_qavit", "load_question_encoder", "qavit_attention", "qavit_config",
    "read_vision_state", "rollout_row", "to_vision_layout", "weights_fingerprint", "with_residual",
]
