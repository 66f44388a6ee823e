"""BLIP for PNP-VQA: ViT image encoder, ITM model with question-guided GradCAM, captioner with
reproducible sampling, tokenizer helpers and LAVIS checkpoint loading.

    vit.py        timm ViT builder, pos_embed resizing
    med.py        BLIP's BERT (bidirectional / causal, cross-attention, KV cache, LM head)
    config.py     the presets table: tiny / shapes / base / large sizes, weights, tokenizer (plain data)
    family.py     the BLIP_ITM / BLIP_CAPTION families: Hugging Face folders, tokenizer folder (no torch)
    itm.py        BlipITM: ITM logits, ITC similarity, GradCAM
    caption.py    BlipCaption: caption generation
    sampling.py   logits processors + inverse-CDF token draws
    tokenizer.py  tokenizer loading, question tokenization, caption prompt
    checkpoint.py presets -> models, LAVIS checkpoints and Hugging Face folders

Names are imported on first use: ``models.blip.config`` and ``models.blip.family`` import no torch.
"""

from models.lazy import lazy_exports

_EXPORTS = {
    "caption": ["BlipCaption"],
    "checkpoint": ["build_model", "load_blip_caption", "load_blip_itm"],
    "family": ["BLIP", "BLIP_CAPTION", "BLIP_ITM", "blip_tokenizer_dir"],
    "config": ["PRESETS", "BlipConfig", "BertConfig", "VitConfig", "TINY_TOKENIZER_DIR"],
    "itm": ["BlipITM"],
    "med": ["BertLMHeadModel", "BertModel"],
    "tokenizer": ["caption_prompt_ids", "load_blip_tokenizer", "load_blip_tokenizer_for", "tokenize_questions"],
    "vit": ["build_vit", "resize_pos_embed"],
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
