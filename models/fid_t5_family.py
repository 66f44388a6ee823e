"""The UnifiedQA / FiD T5 family: its presets table (T5 sizes and weights sources) and what its
files must hold. No torch or transformers: validation and cache keys use this without importing
the model (``models.fid_t5``).

The built-in presets (``tiny``, ``shapes``) read the bundled tiny T5 tokenizer and their weights
from a safetensors file of the T5 state dict (``shapes``: shipped; any preset of them: the
``fid_t5.safetensors`` of ``runtime train fid``); the published sizes are Hugging Face
``T5ForConditionalGeneration`` folders.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from models.family import Loaded, ModelFamily, Preset, Published, RandomInit, Shipped
from models.hf_hub import local_path
from models.weights import WeightsError, tree_fingerprint

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_t5"
WEIGHTS_FORMAT = "pnpvqa-fid-t5"  # the "format" metadata of a built-in preset's safetensors file
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
FINGERPRINT_FILES = ("config.json", "generation_config.json", *WEIGHT_FILES, *TOKENIZER_FILES,
                     "tokenizer_config.json", "special_tokens_map.json")
# T5 v1.0 as UnifiedQA-v2: ReLU feed-forward, tied embeddings
_T5_V1 = dict(feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)


def _unifiedqa(size: str) -> Published:
    name = f"unifiedqa-v2-t5-{size}-1363200"
    return Published(((name, f"https://huggingface.co/allenai/{name}"),))


# config: transformers ``T5Config`` fields (the vocabulary size is the tokenizer's); the published
# sizes' configs are what --random-weights builds
PRESETS: dict[str, Preset] = {
    "tiny": Preset(dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, **_T5_V1,
                        initializer_factor=3.0),  # a random model whose answers vary with the input
                   RandomInit(), "random, tests"),
    # sized to learn the shapes QA task from captions on a CPU (1.45 M parameters, 5.8 MB float32)
    "shapes": Preset(dict(d_model=128, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=3, num_heads=4, **_T5_V1,
                          dropout_rate=0.0),
                     Shipped("fid_t5.safetensors", "bin/train-shapes fid"),
                     "a small T5 trained on shapes captions, bundled"),
    "base": Preset(dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
                        **_T5_V1), _unifiedqa("base"), "unifiedqa-v2-t5-base-1363200/ in the --weights folder"),
    "large": Preset(dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_decoder_layers=24, num_heads=16,
                         **_T5_V1), _unifiedqa("large"), "unifiedqa-v2-t5-large-1363200/ in the --weights folder"),
    "3b": Preset(dict(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_decoder_layers=24, num_heads=32,
                      **_T5_V1), _unifiedqa("3b"), "unifiedqa-v2-t5-3b-1363200/ in the --weights folder"),
}


class FidT5Family(ModelFamily):
    """A built-in preset's weights file, or a Hugging Face folder with config, weights and tokenizer."""

    def check_path(self, preset: str, path: str | Path) -> Path:
        """A Hugging Face folder (``hf:allenai/unifiedqa-v2-t5-large-1363200`` from the local
        cache), or for a built-in preset also a weights file such as ``runtime train fid``'s."""
        path = local_path(path)
        if preset in self.built_in and (path.is_file() or path.suffix in (".safetensors", ".pt", ".pth")):
            if not path.is_file():
                raise WeightsError(f"FiD T5 weights file {path} not found (a '{preset}' state dict, e.g. the "
                                   f"fid_t5.safetensors written by `runtime train fid --preset {preset}`)")
            return path
        return self._check_folder(preset, path)

    def check_found(self, preset: str, found: Path) -> Path:
        return found if isinstance(self.source(preset), Shipped) else self._check_folder(preset, found)

    def _check_folder(self, preset: str, folder: Path) -> Path:
        """``folder`` if it holds a config, weights and a usable tokenizer."""
        source = self.source(preset)
        name, published = source.files[0] if isinstance(source, Published) else (
            "a T5ForConditionalGeneration folder", "save_pretrained() of a T5ForConditionalGeneration and its tokenizer")
        if not folder.is_dir():
            raise WeightsError(f"UnifiedQA folder '{name}' not found: {folder} is not a folder. Published at: {published}")
        missing = t5_folder_lacks(folder)
        if missing:
            raise WeightsError(f"UnifiedQA folder {folder} ('{name}') lacks {', '.join(missing)}. "
                               f"Published at: {published}")
        if not (folder / "tokenizer.json").is_file() and not _has_sentencepiece():
            raise WeightsError(f"the UnifiedQA folder {folder} has its tokenizer as spiece.model only, which "
                               "needs the 'sentencepiece' package (pip install sentencepiece); or add the "
                               "tokenizer.json of the same T5 tokenizer to the folder")
        return folder

    def found_fingerprint(self, found: Path) -> str:
        return tree_fingerprint(found, FINGERPRINT_FILES) if found.is_dir() else super().found_fingerprint(found)

    def random_fingerprint(self, preset: str) -> str:
        """A hash of the preset's T5 config, the vocabulary size, the seed and the tiny tokenizer."""
        tokenizer_json = (TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()
        vocab_size = len(json.loads(tokenizer_json)["model"]["vocab"])
        spec = {"config": self.config(preset), "vocab_size": vocab_size}
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        h.update(f"seed={self.random_init(preset).seed}".encode())
        h.update(hashlib.sha256(tokenizer_json).digest())
        return h.hexdigest()[:32]

    def build_random(self, preset: str, device) -> Loaded:
        from models.fid_t5 import build_fid_t5
        from models.weights import LoadReport

        model, tokenizer = build_fid_t5(preset)
        return Loaded(model.to(device), LoadReport(), tokenizer)

    def load_found(self, preset: str, found: Path, device) -> Loaded:
        from models.fid_t5 import load_builtin_file, load_folder

        model, report, tokenizer = (load_folder(found) if found.is_dir() else load_builtin_file(preset, found))
        return Loaded(model.to(device), report, tokenizer)


FID_T5 = FidT5Family("FiD T5", PRESETS, random_tag={})


def t5_folder_lacks(folder: Path) -> list[str]:
    """What a Hugging Face T5 folder lacks of its config, weights and tokenizer (UnifiedQA, and
    QA-ViT's question encoder)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(p.is_file() for pattern in WEIGHT_FILES for p in folder.glob(pattern)):
        missing.append("model weights (model.safetensors or pytorch_model.bin)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer (spiece.model or tokenizer.json)")
    return missing


def _has_sentencepiece() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None
