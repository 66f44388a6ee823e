"""BLIP's tokenizer (bert-base-uncased + ``[DEC]`` + ``[ENC]``), questions and caption prompts.

Read from a local folder only (``vocab.txt`` and the tokenizer config of bert-base-uncased);
nothing is downloaded. LAVIS adds ``[DEC]`` as the bos token (the caption decoder's first
token) and ``[ENC]`` as an extra special token (the ITM encoder's first token): with the real
vocabulary (30522 tokens) they get ids 30522 and 30523, vocab 30524. The bundled tiny vocabulary
(``TINY_TOKENIZER_DIR``, built by ``models/assets/build_tiny_bert.py``) already holds both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from models.blip.family import blip_tokenizer_dir

if TYPE_CHECKING:
    import torch

DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
QUESTION_MAX_LENGTH = 35  # LAVIS BlipITM.max_txt_len
CAPTION_PROMPT = "a picture of "


def load_blip_tokenizer(path: str | Path):
    """A ``BertTokenizerFast`` from the local folder ``path`` with ``[DEC]`` as bos token and
    ``[ENC]`` as an additional special token; ``tokenizer.enc_token_id`` is set."""
    from transformers import BertTokenizerFast

    path = Path(path)
    if not (path / "vocab.txt").exists() and not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} is not a BERT tokenizer folder (no vocab.txt or tokenizer.json)")
    tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    return tokenizer


def load_blip_tokenizer_for(preset: str, path: str | Path | None = None):
    """The BLIP tokenizer that goes with ``preset`` (``path`` overrides the folder)."""
    return load_blip_tokenizer(path if path is not None else blip_tokenizer_dir(preset))


def clean_question(question: str) -> str:
    """LAVIS PNP-VQA passes ``question.strip('?')`` to the tokenizer (it strips '?' at both
    ends). We strip surrounding whitespace first, so ``"... circle? "`` loses its '?' too;
    for ordinary questions the result is the same. (LAVIS's dataset-side ``blip_question``
    processor, lower-casing and removing ``.!"()*#:;~``, is not applied here; the uncased
    tokenizer lower-cases anyway.)"""
    return question.strip().strip("?")


def tokenize_questions(tokenizer, questions: Sequence[str], max_length: int = QUESTION_MAX_LENGTH,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Questions -> ``input_ids [B, T]``, ``attention_mask [B, T]`` (long) for the ITM encoder.

    '?' stripped (:func:`clean_question`), padded to the longest, truncated to ``max_length``
    tokens (LAVIS's ITM forward truncates at 35), first token (``[CLS]``) replaced by ``[ENC]``.
    """
    texts = [clean_question(q) for q in questions]
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    input_ids = enc["input_ids"].clone()
    input_ids[:, 0] = tokenizer.enc_token_id
    return input_ids, enc["attention_mask"]


def caption_prompt_ids(tokenizer, prompt: str = CAPTION_PROMPT) -> torch.Tensor:
    """The decoder prompt ``[T0]``: ``[DEC]`` then the prompt's tokens, no trailing ``[SEP]``
    (``"a picture of "`` -> ``[DEC] a picture of``, 4 tokens)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    ids = ids[:-1].clone()
    ids[0] = tokenizer.bos_token_id
    return ids
