"""BLIP's BERT ("med"): text encoder / decoder with cross-attention to image tokens.

Parameter names follow LAVIS (``embeddings.{word_embeddings,position_embeddings,LayerNorm}``,
``encoder.layer.N.{attention,crossattention}.{self.{query,key,value},output.{dense,LayerNorm}}``,
``encoder.layer.N.{intermediate.dense,output.{dense,LayerNorm}}``) so published state dicts
load unchanged. No pooler, no token-type embeddings, GELU (erf), LayerNorm eps 1e-12. The
cross-attention key/value take ``encoder_width``-wide image tokens. Inference only: dropout
is left out (it is the identity in eval mode).

One ``BertModel`` covers BLIP's three uses:
- ITM encoder: bidirectional self-attention + cross-attention (``encoder_states`` given);
- ITC text encoder: bidirectional self-attention only (no ``encoder_states``: LAVIS's
  ``mode="text"``);
- caption decoder: causal self-attention + cross-attention, with a key/value cache
  (``causal=True``, ``use_cache=True``) and cross-attention keys/values computed once
  (``cross_kv``).
Masks are additive with LAVIS's ``-10000`` for masked positions.

Why not transformers' ``BlipTextModel`` / ``BlipTextLMHeadModel`` (the same model: on identical
weights the logits agree to 2e-7 in float32 and 3e-16 in float64, ``tests/test_hf_blip.py``):
it cannot take cross-attention keys / values computed once per image and shared by the rows
that read the image (``cross_kv``, used by the ITM training's image-text pairs and by the
decoding loops), nor return one layer's cross-attention probabilities as a gradient leaf for
GradCAM without materialising every layer's attention maps (``output_attentions``, eager
attention only); and its ``generate`` draws from torch's global generator, where the caption
stage needs per-sample draws.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.blip.config import BertConfig

MASK_VALUE = -10000.0  # added to the scores of masked keys, as LAVIS does

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, heads, S, head_dim] each


class MedOutput(NamedTuple):
    hidden: torch.Tensor                   # [B, T, H] last hidden states
    cross_probs: torch.Tensor | None       # [B, heads, T, S] cross-attention probs of ``probs_layer``
    cache: list[KV] | None                 # per layer self-attention keys/values (past + new)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.register_buffer("position_ids", torch.arange(cfg.max_position).expand(1, -1), persistent=True)

    def reset_buffers(self) -> None:
        """Recompute ``position_ids`` (after ``to_empty`` from the meta device)."""
        max_position = self.position_embeddings.num_embeddings
        self.position_ids.copy_(torch.arange(max_position, device=self.position_ids.device).expand(1, -1))

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """``input_ids [B, T]`` -> ``[B, T, H]``; positions start at ``past_length``."""
        length = input_ids.shape[1]
        if past_length + length > self.position_ids.shape[1]:
            raise ValueError(f"sequence of {past_length + length} tokens exceeds max_position "
                             f"{self.position_ids.shape[1]}")
        positions = self.position_ids[:, past_length:past_length + length]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class AttentionCore(nn.Module):
    """Multi-head scaled dot-product attention: LAVIS's ``attention.self`` / ``crossattention.self``."""

    def __init__(self, cfg: BertConfig, kv_width: int):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, heads, T, d]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, states: torch.Tensor) -> KV:
        """``states [B, S, W]`` -> keys, values ``[B, heads, S, d]``."""
        return self._split(self.key(states)), self._split(self.value(states))

    def attend(self, hidden: torch.Tensor, kv: KV, mask: torch.Tensor | None = None,
               need_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden [B, T, H]`` queries against ``kv`` (``[B, heads, S, d]``); ``mask`` additive,
        broadcastable to ``[B, heads, T, S]``. Returns the context ``[B, T, H]`` and, when
        ``need_probs``, the probabilities after softmax ``[B, heads, T, S]`` (the context is
        computed from that very tensor, so gradients w.r.t. it are well defined)."""
        q = self._split(self.query(hidden))
        k, v = kv
        if need_probs:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            context = probs @ v
        else:
            probs = None
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return context.transpose(1, 2).flatten(2), probs


class AttentionOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(context) + residual)


class AttentionBlock(nn.Module):
    """``self`` (query/key/value) + ``output`` (dense, residual, LayerNorm)."""

    def __init__(self, cfg: BertConfig, kv_width: int):
        super().__init__()
        self.self = AttentionCore(cfg, kv_width)
        self.output = AttentionOutput(cfg)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class FeedForwardOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        if cfg.cross_attention:
            self.crossattention = AttentionBlock(cfg, cfg.encoder_width)
        self.intermediate = Intermediate(cfg)
        self.output = FeedForwardOutput(cfg)

    def forward(self, hidden: torch.Tensor, self_mask: torch.Tensor | None, past: KV | None,
                cross_kv: KV | None, cross_mask: torch.Tensor | None, need_probs: bool = False,
                probs_leaf: bool = False) -> tuple[torch.Tensor, KV, torch.Tensor | None]:
        """``hidden [B, T, H]`` -> (``[B, T, H]``, self keys/values incl. ``past``, cross probs)."""
        core = self.attention.self
        k, v = core.project_kv(hidden)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        context, _ = core.attend(hidden, (k, v), self_mask)
        hidden = self.attention.output(context, hidden)
        probs = None
        if cross_kv is not None:
            cross = self.crossattention
            if need_probs and probs_leaf:
                with torch.no_grad():
                    _, probs = cross.self.attend(hidden, cross_kv, cross_mask, need_probs=True)
                probs = probs.requires_grad_(torch.is_grad_enabled())
                context = probs @ cross_kv[1]
                context = context.transpose(1, 2).flatten(2)
            else:
                context, probs = cross.self.attend(hidden, cross_kv, cross_mask, need_probs=need_probs)
            hidden = cross.output(context, hidden)
        hidden = self.output(self.intermediate(hidden), hidden)
        return hidden, (k, v), probs


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (~keep).to(dtype) * MASK_VALUE


class BertModel(nn.Module):
    """``embeddings`` + ``encoder.layer.N``; returns last hidden states (no pooler)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    def cross_kv(self, encoder_states: torch.Tensor) -> list[KV]:
        """Per layer cross-attention keys/values of ``encoder_states [B, S, encoder_width]``
        (``[B, heads, S, d]`` each): compute once, reuse for every decoding step."""
        if not self.config.cross_attention:
            raise ValueError("this text model has no cross-attention layers")
        return [layer.crossattention.self.project_kv(encoder_states) for layer in self.encoder.layer]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_states: torch.Tensor | None = None, *,
                encoder_mask: torch.Tensor | None = None, cross_kv: list[KV] | None = None,
                causal: bool = False, cache: list[KV] | None = None, use_cache: bool = False,
                probs_layer: int | None = None, probs_leaf: bool = False) -> MedOutput:
        """
        input_ids: ``[B, T]``; attention_mask: ``[B, past + T]`` (1 = token, 0 = padding) or None.
        encoder_states: image tokens ``[B, S, encoder_width]`` (or ``cross_kv`` from
            :meth:`cross_kv`); neither = text-only mode (no cross-attention).
        encoder_mask: ``[B, S]`` or None (all image tokens attended).
        causal: causal self-attention (decoder); cache: the ``cache`` of a previous call
            (positions continue after it); use_cache: return the updated cache.
        probs_layer: return that layer's cross-attention probabilities ``[B, heads, T, S]``,
            part of the autograd graph when grad is enabled (``torch.autograd.grad(score,
            probs)`` then gives the gradient of ``score`` w.r.t. them).
        probs_leaf: with ``probs_layer``, run the layers before it without autograd and make
            the probabilities a leaf of the graph: gradients w.r.t. them are unchanged and
            cheaper; nothing flows back to earlier layers or to ``encoder_states``.
        """
        cross_mode = encoder_states is not None or cross_kv is not None
        if cross_mode and not self.config.cross_attention:
            raise ValueError("this text model has no cross-attention layers")
        if probs_layer is not None:
            if not cross_mode:
                raise ValueError("cross-attention probabilities need image tokens (encoder_states)")
            if not 0 <= probs_layer < self.num_layers:
                raise ValueError(f"probs_layer {probs_layer} out of range 0..{self.num_layers - 1}")
        past_length = cache[0][0].shape[2] if cache else 0
        length = input_ids.shape[1]
        hidden_dtype = self.embeddings.word_embeddings.weight.dtype

        keep = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != past_length + length:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, "
                                 f"expected past {past_length} + new {length}")
            keep = attention_mask[:, None, None, :].to(torch.bool)
        if causal and length > 1:
            q_pos = torch.arange(length, device=input_ids.device) + past_length
            k_pos = torch.arange(past_length + length, device=input_ids.device)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, past+T]
            keep = allowed if keep is None else keep & allowed
        self_mask = None if keep is None else _additive(keep, hidden_dtype)
        cross_mask = None
        if cross_mode and encoder_mask is not None:
            cross_mask = _additive(encoder_mask[:, None, None, :].to(torch.bool), hidden_dtype)

        grad_on = torch.is_grad_enabled()
        hidden = None
        probs = None
        new_cache: list[KV] = []
        for i, layer in enumerate(self.encoder.layer):
            no_grad_here = probs_leaf and probs_layer is not None and i < probs_layer
            with torch.set_grad_enabled(grad_on and not no_grad_here):
                if hidden is None:
                    hidden = self.embeddings(input_ids, past_length)
                layer_kv = None
                if cross_mode:
                    layer_kv = (cross_kv[i] if cross_kv is not None
                                else layer.crossattention.self.project_kv(encoder_states))
                hidden, kv, layer_probs = layer(
                    hidden, self_mask, cache[i] if cache else None, layer_kv, cross_mask,
                    need_probs=(i == probs_layer), probs_leaf=probs_leaf)
            if i == probs_layer:
                probs = layer_probs
            if use_cache:
                new_cache.append(kv)
        return MedOutput(hidden, probs, new_cache if use_cache else None)


class PredictionTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPrediction(nn.Module):
    """``transform`` + ``decoder`` (weight tied to the word embeddings by the owner) + ``bias``
    (shared with ``decoder.bias``, so both names are in the state dict, as in LAVIS)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class BertLMHead(nn.Module):
    """LAVIS's ``cls``: ``predictions.{transform.{dense,LayerNorm},decoder,bias}``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.predictions = LMPrediction(cfg)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` -> logits ``[B, T, vocab]``."""
        return self.predictions(hidden)


class BertLMHeadModel(nn.Module):
    """The caption decoder: ``bert`` (causal self-attention + cross-attention) + ``cls``."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.bert = BertModel(cfg)
        self.cls = BertLMHead(cfg)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output projection with the word embeddings (and ``decoder.bias`` with
        ``bias``); call again after anything that replaces parameters (``to_empty``)."""
        predictions = self.cls.predictions
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias

    def forward(self, input_ids: torch.Tensor, *, encoder_states: torch.Tensor | None = None,
                cross_kv: list[KV] | None = None, attention_mask: torch.Tensor | None = None,
                cache: list[KV] | None = None, use_cache: bool = False,
                ) -> tuple[torch.Tensor, list[KV] | None]:
        """``input_ids [N, T]`` (continuing ``cache`` if given) -> logits ``[N, T, vocab]`` and
        the updated cache (when ``use_cache``)."""
        out = self.bert(input_ids, attention_mask, encoder_states, cross_kv=cross_kv, causal=True,
                        cache=cache, use_cache=use_cache)
        return self.cls(out.hidden), out.cache


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, LMPrediction):
            nn.init.zeros_(m.bias)
