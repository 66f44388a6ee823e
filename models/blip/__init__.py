"""BLIP for PNP-VQA: ViT image encoder, ITM model with question-guided GradCAM, captioner with
reproducible sampling, tokenizer helpers and LAVIS checkpoint loading.

    vit.py        timm ViT builder, pos_embed resizing
    med.py        BLIP's BERT (bidirectional / causal, cross-attention, KV cache, LM head)
    config.py     tiny / base / large sizes
    itm.py        BlipITM: ITM logits, ITC similarity, GradCAM
    caption.py    BlipCaption: caption generation
    sampling.py   logits processors + inverse-CDF token draws
    tokenizer.py  tokenizer loading, question tokenization, caption prompt
    checkpoint.py presets -> models, LAVIS checkpoints, fingerprints
"""

from models.blip.caption import BlipCaption
from models.blip.checkpoint import (build_model, caption_fingerprint, checkpoint_path, find_checkpoint,
                                    itm_fingerprint, load_blip_caption, load_blip_itm, weights_fingerprint)
from models.blip.config import PRESETS, BlipConfig, blip_config
from models.blip.itm import BlipITM
from models.blip.med import BertConfig, BertLMHeadModel, BertModel
from models.blip.tokenizer import (TINY_TOKENIZER_DIR, blip_tokenizer_dir, caption_prompt_ids,
                                   load_blip_tokenizer, load_blip_tokenizer_for, tokenize_questions)
from models.blip.vit import VitConfig, build_vit, resize_pos_embed

__all__ = [
    "BertConfig", "BertLMHeadModel", "BertModel", "BlipCaption", "BlipConfig", "BlipITM", "PRESETS",
    "TINY_TOKENIZER_DIR", "VitConfig", "blip_config", "blip_tokenizer_dir", "build_model", "build_vit",
    "caption_fingerprint", "caption_prompt_ids", "checkpoint_path", "find_checkpoint", "itm_fingerprint", "load_blip_caption", "load_blip_itm", "load_blip_tokenizer",
    "load_blip_tokenizer_for", "resize_pos_embed", "tokenize_questions", "weights_fingerprint",
]
