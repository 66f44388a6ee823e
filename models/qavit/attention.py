"""QA-ViT attention: CLIP self-attention whose keys / values also include instruction tokens.

Shapes: ``B`` rows, ``N = 1 + P`` image tokens (CLS + patches), ``L`` instruction tokens,
``W`` width, ``H`` heads of ``d = W / H`` channels.

The reference (``MMCLIPAttention``) prepends the projected instruction tokens to the image
tokens, drops the instruction tokens' query rows, takes one softmax over the
``L + N`` keys and computes ``out_proj(a) + tanh(g) * instruction_out_proj(a)`` with the *same*
joint attention output ``a`` in both terms. With ``g = 0`` that is ``out_proj(a)`` of an
attention whose image weights are diluted by the instruction keys, so the reference's untrained
QA-ViT is *not* the plain ViT (it ignores the question's padding mask too). Two formulations:

``reference`` (exactly the published computation, plus the padding mask)::

    a_joint = softmax([q k_instr^T + mask, q k_image^T] / sqrt(d)) @ [v_instr; v_image]
    out     = out_proj(a_joint) + tanh(g) * instruction_out_proj(a_joint)

``gated`` (identity at ``g = 0``: the instruction tokens reach the output only through the gated
projection)::

    a_image = softmax(q k_image^T / sqrt(d)) @ v_image          # the plain CLIP attention
    out     = out_proj(a_image) + tanh(g) * instruction_out_proj(a_joint)

With ``g = 0`` the gated output is exactly the plain ViT's, whatever the instruction modules
hold (they must be finite), so plain CLIP weights plus identity-initialised instruction modules
reproduce CLIP. The reported attention map is ``softmax(q k_image^T / sqrt(d))`` in both
formulations: the joint attention's image columns renormalised to sum to 1 (the joint
probabilities of image keys are that map times ``1 - share of the instruction keys``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer

Formulation = Literal["reference", "gated"]
FORMULATIONS = ("reference", "gated")


class InstructionAttention(CLIPAttention):
    """CLIP attention plus the QA-ViT instruction parameters (reference names).

    ``instruction_gate`` is declared and unused, as in the reference (kept for the key layout);
    ``instruction_proj_gate`` is ``g``; ``instruction_out_proj`` projects the joint attention.
    """

    def __init__(self, config):
        super().__init__(config)
        self.instruction_gate = nn.Parameter(torch.zeros(1))
        self.instruction_proj_gate = nn.Parameter(torch.zeros(1))
        self.instruction_out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    @torch.no_grad()
    def reset_instruction(self) -> None:
        """Identity initialisation: gates 0, ``instruction_out_proj`` a copy of ``out_proj``
        (the reference's ``init_qavit_comps``)."""
        self.instruction_gate.zero_()
        self.instruction_proj_gate.zero_()
        self.instruction_out_proj.weight.copy_(self.out_proj.weight)
        self.instruction_out_proj.bias.copy_(self.out_proj.bias)


def instruction_projector(text_dim: int, width: int) -> nn.Sequential:
    """``instruct_dim_reduce``: LayerNorm(text_dim), Linear(text_dim, W, no bias), GELU,
    Linear(W, W, no bias): question states -> instruction tokens of the ViT width."""
    return nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width, bias=False), nn.GELU(),
                         nn.Linear(width, width, bias=False))


class InstructCLIPEncoderLayer(CLIPEncoderLayer):
    """A CLIP encoder layer whose self-attention reads instruction tokens (reference names:
    ``self_attn.instruction_*``, ``instruct_dim_reduce.{0,1,3}``). Run by
    :meth:`models.qavit.model.InstructCLIPVisionModel.forward`, not by its own ``forward``."""

    def __init__(self, config, text_dim: int):
        super().__init__(config)
        self.self_attn = InstructionAttention(config)
        self.instruct_dim_reduce = instruction_projector(text_dim, config.hidden_size)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, W]`` -> ``[B, H, T, d]``."""
    b, t, w = x.shape
    return x.view(b, t, heads, w // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, d]`` -> ``[B, T, W]``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def qavit_attention(attn: CLIPAttention, hidden: torch.Tensor, instructions: torch.Tensor | None = None,
                    instruction_bias: torch.Tensor | None = None, formulation: Formulation = "gated"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of ``attn`` over ``hidden [B, N, W]`` (already layer-normed).

    ``instructions [B, L, W]``: projected instruction tokens (``instruct_dim_reduce`` output),
    used when ``attn`` is an :class:`InstructionAttention`; ``instruction_bias [B, L]``: 0 for
    real tokens, a large negative number for padding. Returns the attention output
    ``[B, N, W]`` and the image attention map ``[B, H, N, N]`` (rows sum to 1).
    The image part is computed as transformers' eager CLIP attention does, so a plain layer (or
    ``gated`` with ``g = 0``) equals ``CLIPAttention`` to rounding.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose one of {', '.join(FORMULATIONS)}")
    heads = attn.num_heads
    q = _heads(attn.q_proj(hidden), heads)
    k = _heads(attn.k_proj(hidden), heads)
    v = _heads(attn.v_proj(hidden), heads)
    logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scale                     # [B, H, N, N]
    probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    if instructions is None or not isinstance(attn, InstructionAttention):
        return attn.out_proj(_merge(torch.matmul(probs, v))), probs

    ki = _heads(attn.k_proj(instructions), heads)
    vi = _heads(attn.v_proj(instructions), heads)
    logits_i = torch.matmul(q, ki.transpose(-1, -2)) * attn.scale                  # [B, H, N, L]
    if instruction_bias is not None:
        logits_i = logits_i + instruction_bias[:, None, None, :].to(logits_i.dtype)
    joint = nn.functional.softmax(torch.cat([logits_i, logits], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    n_instr = logits_i.shape[-1]
    joint_out = _merge(torch.matmul(joint[..., :n_instr], vi) + torch.matmul(joint[..., n_instr:], v))
    gate = torch.tanh(attn.instruction_proj_gate)
    if formulation == "reference":
        out = attn.out_proj(joint_out) + gate * attn.instruction_out_proj(joint_out)
    else:
        out = attn.out_proj(_merge(torch.matmul(probs, v))) + gate * attn.instruction_out_proj(joint_out)
    return out, probs
