"""Next-token choice for the caption decoder: Hugging Face logits processors + inverse-CDF draws.

The processors are transformers' own (repetition penalty, minimum length, top-k, top-p), in
the order Hugging Face ``generate`` applies them when sampling. The draw itself takes one
uniform number per row and step and inverts that row's cumulative distribution (over token ids
in vocabulary order), so a row's tokens depend only on its own logits and uniforms, never on
the other rows of the batch or on a global random generator.
"""

from __future__ import annotations

import torch
from transformers import (LogitsProcessorList, MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TopKLogitsWarper, TopPLogitsWarper)


def build_processors(*, min_length: int, eos_token_id: int, top_k: int, top_p: float,
                     repetition_penalty: float, device: torch.device | str = "cpu") -> LogitsProcessorList:
    """Processors as ``generate(do_sample=True, ...)`` builds them; identities are left out
    (penalty 1, min_length 0, top_k 0, top_p 1). Lengths count the prompt's tokens."""
    if top_k < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
        raise ValueError(f"invalid sampling settings: top_k={top_k}, top_p={top_p}, "
                         f"repetition_penalty={repetition_penalty}")
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if min_length > 0:
        processors.append(MinLengthLogitsProcessor(min_length, eos_token_id, device=str(device)))
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


def pick_tokens(scores: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """``scores [N, V]`` (processed logits, ``-inf`` = forbidden), ``uniforms [N]`` in [0, 1)
    -> token ids ``[N]``: the smallest id whose cumulative probability exceeds ``u`` times the
    total; ``uniforms=None``: argmax (greedy)."""
    if uniforms is None:
        return scores.argmax(dim=-1)
    probs = scores.float().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf.device, cdf.dtype).clamp(0, 1)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    # rounding can land on a zero-probability id at the very top: take the last allowed one
    allowed = probs > 0
    last_allowed = probs.shape[-1] - 1 - allowed.flip(-1).int().argmax(dim=-1)
    ok = allowed.gather(1, ids[:, None]).squeeze(1)
    return torch.where(ok, ids, last_allowed)
