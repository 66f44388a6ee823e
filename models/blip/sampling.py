"""Next-token choice for the caption decoder: Hugging Face logits processors + inverse-CDF draws.

The processors are transformers' own (repetition penalty, minimum length, top-k, top-p), in
the order Hugging Face ``generate`` applies them when sampling. The draw itself takes one
uniform number per row and step and inverts that row's cumulative distribution (over token ids
in vocabulary order), so a row's tokens depend only on its own logits and uniforms, never on
the other rows of the batch or on a global random generator.

The distribution is kept unnormalised: weights ``exp(score - max)`` in float64, summed in
token-id order, the target ``u`` times their total. Adding the zero weight of a removed token
changes no partial sum, so ``TopKSampler`` (the top-k tokens alone, what decoding uses) and
``pick_tokens`` over the whole vocabulary (the specification, and the Hugging Face-shaped work
the reference loop does) choose the same token from the same uniform.
"""

from __future__ import annotations

import torch
from transformers import (LogitsProcessorList, MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TopKLogitsWarper, TopPLogitsWarper)


def build_processors(*, min_length: int, eos_token_id: int, top_k: int, top_p: float,
                     repetition_penalty: float, device: torch.device | str = "cpu") -> LogitsProcessorList:
    """Processors as ``generate(do_sample=True, ...)`` builds them; identities are left out
    (penalty 1, min_length 0, top_k 0, top_p 1). Lengths count the prompt's tokens."""
    check_settings(top_k, top_p, repetition_penalty)
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


def check_settings(top_k: int, top_p: float, repetition_penalty: float) -> None:
    if top_k < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
        raise ValueError(f"invalid sampling settings: top_k={top_k}, top_p={top_p}, "
                         f"repetition_penalty={repetition_penalty}")


def draw(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``scores [N, C]`` (candidates in token-id order, ``-inf`` = forbidden), ``uniforms [N]``
    in [0, 1) -> candidate positions ``[N]``: the first whose cumulative weight exceeds ``u``
    times the total (weights ``exp(score - max)`` in float64, module doc)."""
    top = scores.amax(dim=-1, keepdim=True)
    weights = (scores - top).double().exp()
    cdf = weights.cumsum(dim=-1)
    target = uniforms.to(cdf.device, torch.float64).clamp(0, 1)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=scores.shape[-1] - 1)
    # rounding can land on a zero-weight candidate at the very top: take the last allowed one
    allowed = weights > 0
    last_allowed = scores.shape[-1] - 1 - allowed.flip(-1).int().argmax(dim=-1)
    ok = allowed.gather(1, picked[:, None]).squeeze(1)
    return torch.where(ok, picked, last_allowed)


def pick_tokens(scores: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """``scores [N, V]`` (processed logits over the whole vocabulary, ``-inf`` = forbidden),
    ``uniforms [N]`` in [0, 1) -> token ids ``[N]`` (``draw``); ``uniforms=None``: argmax (greedy)."""
    if uniforms is None:
        return scores.argmax(dim=-1)
    return draw(scores.float(), uniforms)


class TopKSampler:
    """The next tokens as ``build_processors`` + ``pick_tokens`` choose them, computed on the
    ``top_k`` best tokens instead of the whole vocabulary: the processors' full-vocabulary
    copies, the softmax and the cumulative sum over 30k tokens were a third of a BLIP
    captioner's decoding time. Falls back to the full path where the shortcut does not hold:
    no top-k, nucleus sampling, greedy choice, or a row whose k-th best score is tied (top-k
    keeps every tied token).
    """

    def __init__(self, *, min_length: int, eos_token_id: int, top_k: int, top_p: float,
                 repetition_penalty: float, device: torch.device | str = "cpu"):
        self.processors = build_processors(min_length=min_length, eos_token_id=eos_token_id, top_k=top_k,
                                           top_p=top_p, repetition_penalty=repetition_penalty, device=device)
        penalised = repetition_penalty != 1.0
        self.penalty = LogitsProcessorList(self.processors[:1] if penalised else [])
        self.after_penalty = LogitsProcessorList(self.processors[1:] if penalised else self.processors)
        self.min_length, self.eos_token_id = min_length, eos_token_id
        self.top_k = top_k if top_p == 1.0 else 0

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        """``ids [N, T]`` so far, ``logits [N, V]`` of the next position (float32; may be
        overwritten), ``uniforms [N]`` or None -> token ids ``[N]``."""
        if uniforms is None or self.top_k == 0:
            return pick_tokens(self.processors(ids, logits), uniforms)
        scores = self.penalty(ids, logits)
        if ids.shape[1] < self.min_length:
            scores[:, self.eos_token_id] = float("-inf")
        vocab = scores.shape[-1]
        k = min(self.top_k, vocab)
        # one more than k: the k-th best score is tied beyond k exactly when the (k+1)-th equals it
        best, index = scores.topk(min(k + 1, vocab), dim=-1)
        tied = best[:, k] == best[:, k - 1] if k < vocab else torch.zeros_like(best[:, 0], dtype=torch.bool)
        order = index[:, :k].sort(dim=-1).values                           # token-id order
        chosen = order.gather(1, draw(scores.gather(1, order), uniforms)[:, None]).squeeze(1)
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            chosen[rows] = pick_tokens(self.after_penalty(ids[rows], scores[rows]), uniforms[rows])
        return chosen
