"""Hugging Face BLIP folders (``save_pretrained`` of ``BlipForImageTextRetrieval`` or
``BlipForConditionalGeneration``: ``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, possibly sharded) read into this project's BLIP models.

The text side of transformers' BLIP has LAVIS's key names (``text_encoder.*``,
``text_decoder.bert.*`` / ``text_decoder.cls.*``, ``itm_head``, ``vision_proj``, ``text_proj``);
only the ViT is renamed (``vision_model.*`` -> timm / LAVIS ``visual_encoder.*``). Sizes come from
``config.json`` (transformers' ViT uses LayerNorm eps 1e-5 where LAVIS uses 1e-6, so the eps
is read too). No torch: validation reads the sizes without loading a tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from models.blip.config import EMBED_DIM, BertConfig, BlipConfig, VitConfig
from models.weights import WeightsError

ARCHITECTURES = {"itm": "BlipForImageTextRetrieval", "caption": "BlipForConditionalGeneration"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

_VISION_RENAMES = (  # transformers BLIP ViT -> timm / LAVIS, applied in order
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
)
_COMPILED = [(re.compile(p), r) for p, r in _VISION_RENAMES]


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{folder / 'config.json'}: not a readable JSON config ({exc})") from None
    if config.get("model_type") != "blip":
        raise WeightsError(f"{folder} holds a '{config.get('model_type')}' model, not BLIP (config.json model_type)")
    return config


def check_architecture(folder: Path, kind: str) -> None:
    """A retrieval folder for the ITM, a captioning folder for the captioner."""
    have = read_config(folder).get("architectures") or []
    if have and ARCHITECTURES[kind] not in have:
        other = next((k for k, v in ARCHITECTURES.items() if v in have), None)
        hint = {"itm": "the ITM needs a retrieval model such as Salesforce/blip-itm-large-coco",
                "caption": "the captioner needs a captioning model such as Salesforce/blip-image-captioning-large"}
        raise WeightsError(f"{folder} is a {', '.join(have)}" + (f" (a {other} model)" if other else "")
                           + f": {hint[kind]}")


def blip_config_of(folder: Path) -> BlipConfig:
    """This project's ``BlipConfig`` for the model in ``folder``; GradCAM at text layer 7 (LAVIS)
    when the text encoder is deep enough."""
    config = read_config(folder)
    v, t = config.get("vision_config", {}), config.get("text_config", {})
    for part, act in (("vision_config", v.get("hidden_act", "gelu")), ("text_config", t.get("hidden_act", "gelu"))):
        if act != "gelu":
            raise WeightsError(f"{folder / 'config.json'}: {part}.hidden_act is '{act}'; BLIP uses gelu")
    width = v.get("hidden_size", 768)
    vit = VitConfig(image_size=v.get("image_size", 384), width=width, depth=v.get("num_hidden_layers", 12),
                    heads=v.get("num_attention_heads", 12), patch_size=v.get("patch_size", 16),
                    mlp_ratio=v.get("intermediate_size", 3072) / width, layer_norm_eps=v.get("layer_norm_eps", 1e-5))
    layers = t.get("num_hidden_layers", 12)
    bert = BertConfig(vocab_size=t.get("vocab_size", 30524), hidden_size=t.get("hidden_size", 768),
                      num_layers=layers, num_heads=t.get("num_attention_heads", 12),
                      intermediate_size=t.get("intermediate_size", 3072),
                      max_position=t.get("max_position_embeddings", 512), encoder_width=width,
                      layer_norm_eps=t.get("layer_norm_eps", 1e-12), pad_token_id=t.get("pad_token_id", 0))
    return BlipConfig(vit=vit, bert=bert, embed_dim=config.get("image_text_hidden_size", EMBED_DIM),
                      gradcam_block=min(7, max(0, layers - 2)))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of ``folder``: one file, or the shards an index names."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
                return [folder / s for s in shards]
            return [path]
    raise WeightsError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def has_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()


def rename_key(key: str) -> str:
    """A transformers BLIP key under this project's (LAVIS's) name."""
    for pattern, repl in _COMPILED:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key
