"""QA-ViT: a CLIP vision transformer whose chosen layers read the question.

:class:`InstructCLIPVisionModel` is the vision tower with the published key layout
(``vision_model.embeddings.*``, ``vision_model.pre_layrnorm.*``,
``vision_model.encoder.layers.N.*`` with ``self_attn.instruction_*`` and
``instruct_dim_reduce.{0,1,3}`` in the instruction layers, ``vision_model.post_layernorm.*``);
its ``vision_model`` is a transformers ``CLIPVisionModel`` whose instruction layers are
:class:`~models.qavit.attention.InstructCLIPEncoderLayer`. The forward pass is ours (it returns
the attention maps and shares question-independent layers between the questions of an image).

:class:`QAViT` adds the question encoder (a transformers ``T5EncoderModel``): the question is
encoded once per row, each instruction layer projects the states to its width
(``instruct_dim_reduce``) and attends to them as extra keys / values (padding masked).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from transformers import CLIPVisionModel

from models.qavit.attention import FORMULATIONS, Formulation, InstructCLIPEncoderLayer, qavit_attention
from models.qavit.config import QAViTConfig


class QAViTOutput(NamedTuple):
    """``last_hidden_state [B, 1+P, W]``: the last layer's output (before post_layernorm, the
    features QA-ViT hands to the language model); ``attentions``: per layer the image attention
    ``[B, H, 1+P, 1+P]`` (``[B, 1+P, 1+P]`` with ``mean_heads``), ``None`` where not asked."""

    last_hidden_state: torch.Tensor
    attentions: list[torch.Tensor | None]


class InstructCLIPVisionModel(nn.Module):
    """CLIP ViT with question-instruction injection in ``config.instruction_layers``.

    ``formulation``: ``gated`` (default; identity at gate 0) or ``reference`` (the published
    computation), see :mod:`models.qavit.attention`.
    """

    def __init__(self, config: QAViTConfig, formulation: Formulation = "gated"):
        super().__init__()
        self.config = config
        self.formulation = formulation
        clip = config.clip_config()
        self.vision_model = CLIPVisionModel(clip)
        embeddings = self.vision_model.embeddings
        # persistent, as in the published layout (transformers 5 keeps it out of the state dict)
        embeddings.register_buffer("position_ids", embeddings.position_ids, persistent=True)
        layers = self.vision_model.encoder.layers
        for i in config.instruction_layers:
            layer = InstructCLIPEncoderLayer(clip, config.text_dim)
            layer.load_state_dict(layers[i].state_dict(), strict=False)  # keep the CLIP init of the shared parts
            layers[i] = layer
        self.instruction_layer_ids = list(config.instruction_layers)

    @property
    def layers(self) -> nn.ModuleList:
        return self.vision_model.encoder.layers

    @property
    def formulation(self) -> Formulation:
        return self._formulation

    @formulation.setter
    def formulation(self, value: Formulation) -> None:
        if value not in FORMULATIONS:
            raise ValueError(f"unknown formulation {value!r}; choose one of {', '.join(FORMULATIONS)}")
        self._formulation = value

    # --- initialisation ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute ``position_ids`` (after ``to_empty``)."""
        emb = self.vision_model.embeddings
        emb.position_ids.copy_(torch.arange(emb.num_positions, device=emb.position_ids.device).expand(1, -1))

    @torch.no_grad()
    def reset_instructions(self, seed: int = 0) -> None:
        """Identity initialisation of every instruction module: gates 0, ``instruction_out_proj``
        copied from ``out_proj`` (as the reference's ``init_qavit_comps``) and the projectors
        re-initialised from ``seed`` (their values do not matter at gate 0, but must be finite
        and the same in every process). The RNG state of the caller is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in self.instruction_layer_ids:
                layer = self.layers[i]
                layer.self_attn.reset_instruction()
                for module in layer.instruct_dim_reduce:
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()

    @torch.no_grad()
    def set_gates(self, value: float) -> None:
        """Set every ``instruction_proj_gate`` to ``value`` (0 = the plain ViT with ``gated``)."""
        for i in self.instruction_layer_ids:
            self.layers[i].self_attn.instruction_proj_gate.fill_(value)

    def instruction_keys(self) -> list[str]:
        """State-dict keys of the instruction modules (absent from plain CLIP weights)."""
        return [k for k in self.state_dict() if ".instruction_" in k or ".instruct_dim_reduce." in k]

    # --- forward ------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor, question_states: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None, *, output_attentions: bool | Sequence[int] = True,
                mean_heads: bool = False, image_rows: torch.Tensor | None = None) -> QAViTOutput:
        """Encode ``pixels`` under the question.

        ``pixels [B, 3, S, S]`` (or ``[I, 3, S, S]`` with ``image_rows [B]`` naming each row's
        image: the layers before the first instruction layer do not depend on the question and
        run once per image); ``question_states [B, L, text_dim]`` and ``question_mask [B, L]``
        (1 = token, 0 = padding; padding keys are masked). Without question states the model
        is the plain ViT. ``output_attentions``: all layers (True), none (False) or the listed
        layer indices; ``mean_heads`` averages the maps over heads (``[B, 1+P, 1+P]``).
        """
        depth = len(self.layers)
        if output_attentions is True:
            wanted = set(range(depth))
        elif output_attentions is False or output_attentions is None:
            wanted = set()
        else:
            wanted = {i % depth if -depth <= i < depth else _bad_layer(i, depth) for i in output_attentions}
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        hidden = self.vision_model.pre_layrnorm(self.vision_model.embeddings(pixels.to(dtype)))

        bias = None
        if question_states is not None:
            question_states = question_states.to(dtype)
            if question_mask is None:
                question_mask = torch.ones(question_states.shape[:2], device=question_states.device)
            bias = (1.0 - question_mask.to(dtype)) * torch.finfo(dtype).min
            rows = question_states.shape[0]
            expected = hidden.shape[0] if image_rows is None else len(image_rows)
            if rows != expected:
                raise ValueError(f"{rows} question rows for {expected} image rows")

        first = min(self.instruction_layer_ids, default=depth) if question_states is not None else depth
        attentions: list[torch.Tensor | None] = [None] * depth
        for idx, layer in enumerate(self.layers):
            if image_rows is not None and idx == first:
                hidden, attentions = _expand(hidden, attentions, image_rows)
            instructions = None
            if question_states is not None and isinstance(layer, InstructCLIPEncoderLayer):
                instructions = layer.instruct_dim_reduce(question_states)
            residual = hidden
            out, probs = qavit_attention(layer.self_attn, layer.layer_norm1(hidden), instructions, bias,
                                         self.formulation)
            hidden = residual + out
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
            if idx in wanted:
                attentions[idx] = probs.mean(dim=1) if mean_heads else probs
        if image_rows is not None and first >= depth:
            hidden, attentions = _expand(hidden, attentions, image_rows)
        return QAViTOutput(hidden, attentions)


def _expand(hidden: torch.Tensor, attentions: list, image_rows: torch.Tensor):
    """Per-image tensors -> per-row tensors."""
    index = image_rows.to(hidden.device).long()
    return hidden[index], [None if a is None else a[index] for a in attentions]


def _bad_layer(i: int, depth: int):
    raise ValueError(f"attention layer {i} out of range for a {depth}-layer ViT")


class QAViT(nn.Module):
    """Question encoder (T5 encoder) + instruction-aware CLIP ViT (``vision``)."""

    def __init__(self, vision: InstructCLIPVisionModel, question_encoder: nn.Module):
        super().__init__()
        self.vision = vision
        self.question_encoder = question_encoder

    @property
    def config(self) -> QAViTConfig:
        return self.vision.config

    def encode_question(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask ``[B, L]`` -> T5 encoder states ``[B, L, text_dim]`` and the mask."""
        out = self.question_encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state, attention_mask

    def forward(self, pixels: torch.Tensor, question_states: torch.Tensor | None, question_mask: torch.Tensor | None,
                output_attentions: bool | Sequence[int] = True, *, mean_heads: bool = False,
                image_rows: torch.Tensor | None = None) -> QAViTOutput:
        """``(last_hidden_state [B, 1+P, W], attentions)``: see :meth:`InstructCLIPVisionModel.forward`."""
        return self.vision(pixels, question_states, question_mask, output_attentions=output_attentions,
                           mean_heads=mean_heads, image_rows=image_rows)
