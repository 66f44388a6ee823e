"""Where the UnifiedQA / FiD T5 weights are and what identifies them: preset sizes as data,
the lookup of files and folders, fingerprints. No torch or transformers: validation and cache
keys use this without importing the model (``models.fid_t5``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from models.hf_hub import local_path
from models.weights import (WeightsError, file_fingerprint, find_weights, random_weights, shapes_weights,
                            tree_fingerprint)

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_t5"
TINY_SEED = 0
TINY_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="relu", tie_word_embeddings=True,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   initializer_factor=3.0)  # a random model whose answers vary with the input
# ``shapes``: sized to learn the shapes QA task from captions on a CPU (1.45 M parameters, 5.8 MB
# float32): 3 + 3 layers, width 128, 4 heads of 32, ReLU feed-forward 512, tied embeddings, no dropout
SHAPES_CONFIG = dict(d_model=128, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=3, num_heads=4,
                     feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
BUILTIN_CONFIGS = {"tiny": TINY_CONFIG, "shapes": SHAPES_CONFIG}
# the published UnifiedQA-v2 sizes (T5 v1.0: ReLU feed-forward, tied embeddings), for --random-weights
_T5_V1 = dict(feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
RANDOM_CONFIGS = {  # every preset built without a file
    **BUILTIN_CONFIGS,
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, **_T5_V1),
    "large": dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_decoder_layers=24, num_heads=16, **_T5_V1),
    "3b": dict(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_decoder_layers=24, num_heads=32, **_T5_V1),
}
SHAPES_FILE = "fid_t5.safetensors"
SHAPES_TRAIN_COMMAND = "bin/train-shapes fid"
WEIGHTS_FORMAT = "pnpvqa-fid-t5"  # the "format" metadata of a built-in preset's safetensors file
REAL_PRESETS = {
    "base": "unifiedqa-v2-t5-base-1363200",
    "large": "unifiedqa-v2-t5-large-1363200",
    "3b": "unifiedqa-v2-t5-3b-1363200",
}
PRESETS = ("tiny", "shapes", *REAL_PRESETS)
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
FINGERPRINT_FILES = ("config.json", "generation_config.json", *WEIGHT_FILES, *TOKENIZER_FILES,
                     "tokenizer_config.json", "special_tokens_map.json")


def find_fid_t5(preset: str, path: str | Path | None = None) -> Path | None:
    """What a preset loads, checked without loading it: ``path`` if given (for any preset, ``tiny``
    included: a Hugging Face folder; for ``tiny`` / ``shapes`` also a weights file such as the
    ``fid_t5.safetensors`` of ``runtime train fid``), else the bundled
    ``models/assets/shapes/fid_t5.safetensors`` for ``shapes``, else
    ``<weights folder>/unifiedqa-v2-t5-<size>-1363200``; ``None`` for the built-in ``tiny``.
    ``WeightsError`` naming what is missing (config, weights, tokenizer) and where it is published
    (for ``shapes``: how to train it); ``ValueError`` for an unknown preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown FiD T5 preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if path is not None:
        path = local_path(path)  # hf:allenai/unifiedqa-v2-t5-large-1363200 from the local cache
    if path is None and (preset == "tiny" or random_weights()):
        return None
    if preset == "shapes" and path is None:
        return shapes_weights(SHAPES_FILE, SHAPES_TRAIN_COMMAND)
    if preset in BUILTIN_CONFIGS and path is not None and (Path(path).is_file() or Path(path).suffix in
                                                           (".safetensors", ".pt", ".pth")):
        if not Path(path).is_file():
            raise WeightsError(f"FiD T5 weights file {path} not found (a '{preset}' state dict, e.g. the "
                               f"{SHAPES_FILE} written by `runtime train fid --preset {preset}`)")
        return Path(path)
    name = REAL_PRESETS.get(preset, "a T5ForConditionalGeneration folder")
    published = (f"https://huggingface.co/allenai/{name}" if preset in REAL_PRESETS
                 else "save_pretrained() of a T5ForConditionalGeneration and its tokenizer")
    if path is None:
        folder = find_weights(name, published)
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise WeightsError(f"UnifiedQA folder '{name}' not found: {folder} is not a folder. "
                               f"Published at: {published}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(p.is_file() for pattern in WEIGHT_FILES for p in folder.glob(pattern)):
        missing.append("model weights (model.safetensors or pytorch_model.bin)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer (spiece.model or tokenizer.json)")
    if missing:
        raise WeightsError(f"UnifiedQA folder {folder} ('{name}') lacks {', '.join(missing)}. "
                           f"Published at: {published}")
    if not (folder / "tokenizer.json").is_file() and not _has_sentencepiece():
        raise WeightsError(f"the UnifiedQA folder {folder} has its tokenizer as spiece.model only, which "
                           "needs the 'sentencepiece' package (pip install sentencepiece); or add the "
                           "tokenizer.json of the same T5 tokenizer to the folder")
    return folder


def weights_fingerprint(preset: str, path: str | Path | None = None) -> str:
    """What identifies the weights: for the built-in ``tiny`` a hash of its config, seed and
    tokenizer; for a weights file (``shapes``) its ``file_fingerprint``; for a folder
    ``tree_fingerprint`` of its config, weight and tokenizer files."""
    folder = find_fid_t5(preset, path)
    if folder is not None and folder.is_file():
        return file_fingerprint(folder)
    if folder is not None:
        return tree_fingerprint(folder, FINGERPRINT_FILES)
    tokenizer_json = (TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()
    vocab_size = len(json.loads(tokenizer_json)["model"]["vocab"])
    h = hashlib.sha256(json.dumps({"config": RANDOM_CONFIGS[preset], "vocab_size": vocab_size}, sort_keys=True).encode())
    h.update(f"seed={TINY_SEED}".encode())
    h.update(hashlib.sha256(tokenizer_json).digest())
    return h.hexdigest()[:32]


def _has_sentencepiece() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None
