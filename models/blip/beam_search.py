"""Beam search for the BLIP caption decoder, with Hugging Face ``generate``'s semantics.

LAVIS's ``BlipCaption.generate(use_nucleus_sampling=False)`` calls transformers'
``generate(num_beams=...)`` on its decoder. Our decoder is not a transformers model (it
keeps LAVIS's parameter names and caches cross-attention keys/values once per image), so
this module runs transformers' beam search algorithm on it; what it reproduces, step by step:

- scores are ``log_softmax`` of the logits, then the logits processors (repetition penalty,
  minimum length) applied to those log-probabilities, plus the beam's running score;
- each step keeps the top ``2 * num_beams`` continuations over ``beams x vocabulary``; those
  ending in ``eos`` (or reaching ``max_length``) among the first ``num_beams`` become finished
  hypotheses scored ``sum of log-probs / generated length ** length_penalty``; the best
  ``num_beams`` others run on;
- ``early_stopping=False``: a sentence stops when its best running beam, scored at the current
  length, cannot beat its worst finished hypothesis; all stop at ``max_length``;
- the result is each sentence's best hypothesis, padded with ``pad_token_id`` to the longest.

``tests/test_models_blip.py`` checks the tokens against transformers' own ``generate`` on
``BlipTextLMHeadModel`` holding the same weights.
"""

from __future__ import annotations

import torch

from models.blip.sampling import build_processors
from models.compute_clock import counted

NEG = -1.0e9


@torch.no_grad()
@counted
def beam_search(decoder, encoder_states: torch.Tensor, prompt_ids: torch.Tensor, *, num_beams: int,
                max_length: int, min_length: int, repetition_penalty: float, length_penalty: float,
                eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """``decoder``: a ``BertLMHeadModel``; ``encoder_states [B, K, Cv]``; ``prompt_ids [T0]``.
    Returns ``[B, <= max_length]`` ids, the prompt included."""
    batch, prompt_length = encoder_states.shape[0], prompt_ids.numel()
    device = encoder_states.device
    if max_length <= prompt_length:
        raise ValueError(f"max_length {max_length} leaves no room after the {prompt_length}-token prompt")
    processors = build_processors(min_length=min_length, eos_token_id=eos_token_id, top_k=0, top_p=1.0,
                                  repetition_penalty=repetition_penalty, device=device)
    keep = 2 * num_beams
    top_beams = torch.arange(keep, device=device) < num_beams                        # [2K]
    running = torch.full((batch, num_beams, max_length), pad_token_id, dtype=torch.long, device=device)
    running[:, :, :prompt_length] = prompt_ids.to(device)
    finished = running.clone()
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = NEG  # the beams start identical: only the first may expand
    finished_scores = torch.full((batch, num_beams), NEG, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    generated = torch.zeros(batch, num_beams, dtype=torch.long, device=device)      # new tokens per hypothesis

    states = encoder_states.repeat_interleave(num_beams, dim=0)                     # [B*K, S, Cv]
    cross_kv = decoder.bert.cross_kv(states)
    logits, cache = decoder(running[:, :, :prompt_length].reshape(-1, prompt_length), cross_kv=cross_kv,
                            use_cache=True)
    length = prompt_length
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
        hits = (token == eos_token_id) | (length + 1 >= max_length)                   # [B, 2K]

        # the best num_beams candidates that did not stop run on
        run_scores = top_scores + hits.float() * NEG
        nxt = torch.topk(run_scores, num_beams).indices
        running = torch.gather(candidates, 1, nxt[:, :, None].expand(-1, -1, max_length))
        running_scores = torch.gather(run_scores, 1, nxt)
        beam_of = torch.gather(source, 1, nxt)                                           # [B, K]

        # candidates that stopped among the top num_beams join the finished hypotheses
        just = hits & top_beams[None, :]
        scored = top_scores / float(length + 1 - prompt_length) ** length_penalty
        scored = scored + (~improvable).float() * NEG + (~just).float() * NEG
        merged = torch.cat([finished_scores, scored], dim=1)
        best = torch.topk(merged, num_beams).indices
        finished = torch.gather(torch.cat([finished, candidates], dim=1), 1, best[:, :, None].expand(-1, -1, max_length))
        finished_scores = torch.gather(merged, 1, best)
        is_finished = torch.gather(torch.cat([is_finished, just], dim=1), 1, best)
        new_lengths = torch.full_like(token, length + 1 - prompt_length)
        generated = torch.gather(torch.cat([generated, new_lengths], dim=1), 1, best)

        length += 1
        # can a running beam still beat the worst finished hypothesis (scored at today's length)?
        best_running = running_scores[:, :1] / float(length - prompt_length) ** length_penalty
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, torch.tensor(NEG, device=device))
        improvable = improvable & (best_running > worst).any(dim=-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()):
            break
        beam_index = (beam_of + offsets).reshape(-1)
        cache = [(k.index_select(0, beam_index), v.index_select(0, beam_index)) for k, v in cache]
        logits, cache = decoder(running[:, :, length - 1].reshape(-1, 1), cross_kv=cross_kv, cache=cache,
                                use_cache=True)
    out_length = prompt_length + int(generated[:, 0].max())
    return finished[:, 0, :out_length]
