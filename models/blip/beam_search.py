"""Beam search for the BLIP caption decoder, with Hugging Face ``generate``'s semantics.

LAVIS's ``BlipCaption.generate(use_nucleus_sampling=False)`` calls transformers'
``generate(num_beams=...)`` on its decoder. Our decoder is not a transformers model (it
keeps LAVIS's parameter names and caches cross-attention keys/values once per image), so
this module runs transformers' beam search algorithm on it; what it reproduces, step by step:

- scores are ``log_softmax`` of the logits, then the logits processors (repetition penalty,
  minimum length) applied to those log-probabilities, plus the beam's running score;
- each step keeps the top ``2 * num_beams`` continuations over ``beams x vocabulary``; those
  ending in ``eos`` among the first ``num_beams`` become finished hypotheses, scored
  ``sum of log-probs / length ** length_penalty``; the best ``num_beams`` others run on;
- ``early_stopping=False``: a sentence stops when a bound on what its candidates could still
  score cannot beat its worst finished hypothesis; all stop at ``max_length``;
- the result is each sentence's best hypothesis, padded with ``pad_token_id`` to the longest.

Two versions of transformers disagree on the ``length`` and the bound (``LENGTH_RULES``):
``lavis`` is transformers 4.25 / 4.26, which LAVIS pins; ``generated`` is the installed
transformers. ``tests/test_models_blip.py`` checks ``generated`` against the installed
``generate`` on ``BlipTextLMHeadModel`` holding the same weights, and ``tests/test_beam_rules.py``
both rules against hand-computed beams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from models.blip.sampling import build_processors
from models.compute_clock import counted

NEG = -1.0e9


@dataclass(frozen=True)
class LengthRule:
    """How a finished hypothesis is normalised and when a sentence is done."""

    prompt_counts: bool  # the length dividing a finished score includes the prompt's tokens
    eos_counts: bool     # ... and the eos that closed the caption
    # done when the worst finished score >= bound / (length of a caption ending at this step):
    # candidates = the best of the step's 2K candidates; running = the best beam that runs on
    bound: Literal["candidates", "running"]
    # at max_length: stop = every top-K candidate finishes as with an eos; finalize = the eos
    # candidates finish, then (if the done check did not stop the sentence) the K running beams
    at_limit: Literal["stop", "finalize"]
    score_dtype: torch.dtype  # 4.25 divides Python floats (float64); today's transformers float32


LENGTH_RULES = {
    # transformers 4.25 / 4.26 (BeamHypotheses.add divides by the hypothesis' full length, the
    # prompt included and the eos not yet appended; is_done bounds by the best of all candidates
    # at the length before the step; finalize adds the running beams at max_length)
    "lavis": LengthRule(prompt_counts=True, eos_counts=False, bound="candidates", at_limit="finalize",
                        score_dtype=torch.float64),
    # current transformers (the installed 5.x `_beam_search`): new tokens only, eos included;
    # bound from the best running beam (early_stopping=False's heuristic)
    "generated": LengthRule(prompt_counts=False, eos_counts=True, bound="running", at_limit="stop",
                            score_dtype=torch.float32),
}
LengthRuleName = Literal["lavis", "generated"]


@torch.no_grad()
@counted
def beam_search(decoder, encoder_states: torch.Tensor, prompt_ids: torch.Tensor, *, num_beams: int,
                max_length: int, min_length: int, repetition_penalty: float, length_penalty: float,
                eos_token_id: int, pad_token_id: int,
                length_rule: LengthRuleName) -> tuple[torch.Tensor, torch.Tensor]:
    """``decoder``: a ``BertLMHeadModel``; ``encoder_states [B, K, Cv]``; ``prompt_ids [T0]``;
    ``length_rule``: a key of ``LENGTH_RULES``. Returns each sentence's best hypothesis, ids
    ``[B, <= max_length]`` (the prompt included), and its score ``[B]`` (``sequences_scores`` of
    transformers: the rule's normalised sum of log-probs, in the rule's ``score_dtype``)."""
    rule = LENGTH_RULES[length_rule]
    batch, prompt_length = encoder_states.shape[0], prompt_ids.numel()
    device = encoder_states.device
    if max_length <= prompt_length:
        raise ValueError(f"max_length {max_length} leaves no room after the {prompt_length}-token prompt")
    processors = build_processors(min_length=min_length, eos_token_id=eos_token_id, top_k=0, top_p=1.0,
                                  repetition_penalty=repetition_penalty, device=device)
    uncounted = 0 if rule.prompt_counts else prompt_length  # tokens left out of a finished length
    keep = 2 * num_beams
    top_beams = torch.arange(keep, device=device) < num_beams                        # [2K]
    running = torch.full((batch, num_beams, max_length), pad_token_id, dtype=torch.long, device=device)
    running[:, :, :prompt_length] = prompt_ids.to(device)
    finished = running.clone()
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = NEG  # the beams start identical: only the first may expand
    finished_scores = torch.full((batch, num_beams), NEG, dtype=rule.score_dtype, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    generated = torch.zeros(batch, num_beams, dtype=torch.long, device=device)      # new tokens per hypothesis

    def join(sequences, sums, lengths, new_tokens, joins):
        """Merge hypotheses ``sequences [B, J, max_length]`` with summed log-probs ``sums [B, J]``
        where ``joins [B, J]`` (and the sentence is not done) into the kept ``num_beams``."""
        nonlocal finished, finished_scores, is_finished, generated
        # the divisor as transformers computes it: a Python (float64) power, then the score's type
        scored = sums.to(rule.score_dtype) / (lengths.double() ** length_penalty).to(rule.score_dtype)
        scored = scored + (~(joins & improvable)).to(rule.score_dtype) * NEG
        merged = torch.cat([finished_scores, scored], dim=1)
        best = torch.topk(merged, num_beams).indices
        finished = torch.gather(torch.cat([finished, sequences], dim=1), 1, best[:, :, None].expand(-1, -1, max_length))
        finished_scores = torch.gather(merged, 1, best)
        is_finished = torch.gather(torch.cat([is_finished, joins], dim=1), 1, best)
        generated = torch.gather(torch.cat([generated, new_tokens], dim=1), 1, best)

    states = encoder_states.repeat_interleave(num_beams, dim=0)                     # [B*K, S, Cv]
    cross_kv = decoder.bert.cross_kv(states)
    logits, cache = decoder(running[:, :, :prompt_length].reshape(-1, prompt_length), cross_kv=cross_kv,
                            use_cache=True)
    length = prompt_length  # tokens so far; this step writes position `length`
    offsets = torch.arange(batch, device=device)[:, None] * num_beams
    while True:
        flat = running[:, :, :length].reshape(batch * num_beams, length)
        log_probs = processors(flat, torch.log_softmax(logits[:, -1].float(), dim=-1))
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        top_scores, top_index = torch.topk(totals, keep)                                # [B, 2K]
        source = top_index // vocab
        token = top_index % vocab
        candidates = torch.gather(running, 1, source[:, :, None].expand(-1, -1, max_length)).clone()
        candidates[:, :, length] = token
        last_step = length + 1 >= max_length
        is_eos = token == eos_token_id
        stops = is_eos | (last_step and rule.at_limit == "stop")                         # [B, 2K]

        # the best num_beams candidates that did not stop run on
        run_scores = top_scores + stops.float() * NEG
        nxt = torch.topk(run_scores, num_beams).indices
        running = torch.gather(candidates, 1, nxt[:, :, None].expand(-1, -1, max_length))
        running_scores = torch.gather(run_scores, 1, nxt)
        beam_of = torch.gather(source, 1, nxt)                                           # [B, K]

        # candidates that stopped among the top num_beams join the finished hypotheses
        new_tokens = torch.full_like(token, length + 1 - prompt_length)
        counted_eos = is_eos.long() * (0 if rule.eos_counts else 1)
        join(candidates, top_scores, length + 1 - uncounted - counted_eos, new_tokens, stops & top_beams[None, :])

        # can the sentence still improve? the bound is scored as a caption ending with eos here
        bound = top_scores[:, :1] if rule.bound == "candidates" else running_scores[:, :1]
        bound_length = length + 1 - uncounted - (0 if rule.eos_counts else 1)
        bound = bound.to(rule.score_dtype) / float(bound_length) ** length_penalty
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values,
                            torch.tensor(NEG, dtype=rule.score_dtype, device=device))
        improvable = improvable & (bound > worst).any(dim=-1, keepdim=True)
        if last_step and rule.at_limit == "finalize":  # the running beams of open sentences end here
            join(running, running_scores, torch.full_like(nxt, max_length - uncounted),
                 torch.full_like(nxt, max_length - prompt_length), torch.ones_like(nxt, dtype=torch.bool))
        length += 1
        if last_step or not bool(improvable.any()):
            break
        beam_index = (beam_of + offsets).reshape(-1)
        cache = [(k.index_select(0, beam_index), v.index_select(0, beam_index)) for k, v in cache]
        logits, cache = decoder(running[:, :, length - 1].reshape(-1, 1), cross_kv=cross_kv, cache=cache,
                                use_cache=True)
    out_length = prompt_length + int(generated[:, 0].max())
    return finished[:, 0, :out_length], finished_scores[:, 0]
