"""BLIP captioner: ViT + BERT decoder with an LM head, and PNP-VQA's caption sampling.

Module names follow LAVIS's ``BlipCaption`` (``visual_encoder``, ``text_decoder.bert``,
``text_decoder.cls``); the output projection is tied to the word embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from models.blip.config import BlipConfig
from models.blip.med import BertLMHeadModel, init_bert_weights
from models.blip.sampling import TopKSampler
from models.blip.vit import build_vit, encode, vit_grid
from models.compute_clock import counted


class BlipCaption(nn.Module):
    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = build_vit(config.vit)
        self.text_decoder = BertLMHeadModel(config.bert)
        init_bert_weights(self.text_decoder)

    def reset_buffers(self) -> None:
        self.text_decoder.bert.embeddings.reset_buffers()

    def tie_weights(self) -> None:
        self.text_decoder.tie_weights()

    @property
    def grid(self) -> int:
        return vit_grid(self.visual_encoder)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, S, S]`` -> image tokens ``[B, 1+P, Cv]``."""
        return encode(self.visual_encoder, pixels)

    def decoder_logits(self, input_ids: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits without cache: ``input_ids [N, T]``, ``encoder_states [N, K, Cv]``
        -> ``[N, T, vocab]`` (position t predicts token t+1)."""
        logits, _ = self.text_decoder(input_ids, encoder_states=encoder_states)
        return logits

    def _next_logits(self, input_ids: torch.Tensor, cross_kv, cache):
        """Logits ``[N, vocab]`` of the position after ``input_ids [N, T]`` (the output layer on
        the last position only) and the extended self-attention cache."""
        out = self.text_decoder.bert(input_ids, cross_kv=cross_kv, causal=True, cache=cache, use_cache=True)
        return self.text_decoder.cls(out.hidden[:, -1]), out.cache

    @torch.no_grad()
    @counted
    def generate(self, encoder_states: torch.Tensor, prompt_ids: torch.Tensor,
                 uniforms: torch.Tensor | None = None, *, max_length: int = 20, min_length: int = 10,
                 top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: int, pad_token_id: int) -> torch.Tensor:
        """Sample one caption per row of ``encoder_states``.

        encoder_states ``[N, K, Cv]`` (e.g. K sampled patch tokens); prompt_ids ``[T0]`` (``[DEC]``
        first, no trailing ``[SEP]``); uniforms ``[N, max_length - T0]`` in [0, 1): the draw of row
        n at new-token step s uses ``uniforms[n, s]`` (``None`` = greedy). Lengths count the
        prompt, as Hugging Face ``generate`` does for decoder-only models: at most
        ``max_length - T0`` new tokens, ``eos`` forbidden while the length is below
        ``min_length``. Returns ``[N, <= max_length]`` ids including the prompt; rows that
        ended early are padded with ``pad_token_id`` after their ``eos``. Self-attention keys and
        values are cached; cross-attention keys/values are computed once.
        """
        if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
            raise ValueError(f"prompt_ids must be a non-empty [T0] tensor, got shape {tuple(prompt_ids.shape)}")
        rows, prompt_length = encoder_states.shape[0], prompt_ids.numel()
        steps = max_length - prompt_length
        if steps <= 0:
            raise ValueError(f"max_length {max_length} leaves no room after the {prompt_length}-token prompt")
        if uniforms is not None and tuple(uniforms.shape) != (rows, steps):
            raise ValueError(f"uniforms must be [{rows}, {steps}] (rows x (max_length - prompt)), "
                             f"got {tuple(uniforms.shape)}")
        device = encoder_states.device
        sampler = TopKSampler(min_length=min_length, eos_token_id=eos_token_id, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, device=device)
        ids = prompt_ids.to(device).expand(rows, prompt_length).clone()
        cross_kv = self.text_decoder.bert.cross_kv(encoder_states)
        logits, cache = self._next_logits(ids, cross_kv, None)
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        for step in range(steps):
            chosen = sampler(ids, logits.float(), None if uniforms is None else uniforms[:, step])
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad_token_id))
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            unfinished &= chosen != eos_token_id
            if step + 1 == steps or not bool(unfinished.any()):
                break
            logits, cache = self._next_logits(chosen[:, None], cross_kv, cache)
        return ids
