"""Question text as LAVIS's BLIP question processor prepares it."""

from __future__ import annotations

import re

_BLIP_PUNCT = re.compile(r"([.!\"()*#:;~])")


def blip_question(text: str, max_words: int = 50) -> str:
    """LAVIS ``blip_question``: lowercase, drop ``.!"()*#:;~``, strip trailing spaces, keep
    the first ``max_words`` words. (PNP-VQA then strips '?' before tokenising.)"""
    question = _BLIP_PUNCT.sub("", text.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question
