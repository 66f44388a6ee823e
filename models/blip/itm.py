"""BLIP image-text matching (ITM) model and PNP-VQA's question-guided GradCAM.

Module names follow LAVIS's ``BlipITM`` (``visual_encoder``, ``text_encoder``, ``itm_head``,
``vision_proj``, ``text_proj``), so ``model_*_retrieval_coco*.pth`` state dicts load unchanged
(less their momentum copies and queues, see :mod:`models.blip.checkpoint`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.blip.config import BlipConfig
from models.blip.med import BertModel, init_bert_weights
from models.blip.vit import build_vit, encode, vit_grid


class BlipITM(nn.Module):
    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        hidden = config.bert.hidden_size
        self.visual_encoder = build_vit(config.vit)
        self.text_encoder = BertModel(config.bert)
        self.vision_proj = nn.Linear(config.vit.width, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        init_bert_weights(self.text_encoder)

    def reset_buffers(self) -> None:
        self.text_encoder.embeddings.reset_buffers()

    @property
    def num_text_layers(self) -> int:
        return self.text_encoder.num_layers

    @property
    def num_heads(self) -> int:
        """Heads of the text encoder's cross-attention."""
        return self.config.bert.num_heads

    @property
    def grid(self) -> int:
        """Side of the ViT patch grid (24 for the 384px presets, 8 for tiny)."""
        return vit_grid(self.visual_encoder)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, S, S]`` -> image tokens ``[B, 1+P, Cv]``."""
        return encode(self.visual_encoder, pixels)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """``image_embeds [B, 1+P, Cv]``, ``input_ids``/``attention_mask [B, T]`` ([ENC] first)
        -> ``[B, 2]`` (index 1 = match)."""
        out = self.text_encoder(input_ids, attention_mask, image_embeds)
        return self.itm_head(out.hidden[:, 0])

    def check_block_num(self, block_num: int) -> None:
        last = self.num_text_layers - 1
        if not 0 <= block_num < last:
            raise ValueError(
                f"block_num {block_num} is out of range: this text encoder has {self.num_text_layers} "
                f"layers, valid GradCAM layers are 0..{last - 1}. The last layer ({last}) gives an "
                "all-zero heatmap (only its first token's output reaches the ITM head).")

    def _grid_for(self, patches: int) -> int:
        grid = self.grid
        if patches == grid * grid:
            return grid
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"image_embeds hold {patches} patch tokens, not a square grid")
        return side  # e.g. fused features on another grid

    def gradcam(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                block_num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PNP-VQA's question-guided GradCAM.

        image_embeds ``[B, 1+P, Cv]`` (no gradient needed); input_ids, attention_mask ``[B, T]``
        from :func:`models.blip.tokenizer.tokenize_questions` (``[ENC]`` first, right padding);
        block_num: text layer, ``0..num_text_layers-2``.

        Returns ``heatmap [B, g, g]`` float32 and ``itm_score [B]`` = softmax(ITM logits)[:, 1].
        With ``A`` the cross-attention probabilities of layer ``block_num`` ``[B, heads, T, 1+P]``
        and ``G = d(sum_b logit_b[1]) / dA``: drop the CLS image column, ``cam = A * clamp(G, 0)
        * token_mask``, mean over heads, then mean over the question tokens ``1..L-2``
        (``L`` = non-pad tokens of the row: ``[ENC]`` and ``[SEP]`` excluded). A row without
        question tokens (``L <= 2``) gets an all-zero heatmap. Works under ``inference_mode``.
        """
        self.check_block_num(block_num)
        batch, tokens = image_embeds.shape[0], image_embeds.shape[1]
        grid = self._grid_for(tokens - 1)
        with torch.inference_mode(False), torch.enable_grad():
            image_embeds, input_ids, attention_mask = (
                t.clone() if t.is_inference() else t for t in (image_embeds, input_ids, attention_mask))
            out = self.text_encoder(input_ids, attention_mask, image_embeds.detach(),
                                    probs_layer=block_num, probs_leaf=True)
            logits = self.itm_head(out.hidden[:, 0])
            probs = out.cross_probs
            (grads,) = torch.autograd.grad(logits[:, 1].sum(), probs)
        with torch.no_grad():
            heatmap = combine_gradcam(probs.detach(), grads, attention_mask)
            score = logits.detach().float().softmax(dim=-1)[:, 1]
        return heatmap.reshape(batch, grid, grid), score


def combine_gradcam(probs: torch.Tensor, grads: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``probs``, ``grads [B, heads, T, 1+P]``, ``attention_mask [B, T]`` -> ``[B, P]`` float32:
    the per-token GradCAM (CLS column dropped, gradients clamped at 0, padded tokens masked,
    mean over heads) averaged over tokens ``1..L-2`` of each row."""
    mask = attention_mask.to(torch.float32)
    cam = probs[..., 1:].float() * grads[..., 1:].float().clamp(min=0)
    cam = (cam * mask[:, None, :, None]).mean(dim=1)  # [B, T, P]
    count = mask.sum(dim=1) - 2  # question tokens per row
    position = torch.arange(mask.shape[1], device=mask.device)
    rows = ((position[None, :] >= 1) & (position[None, :] <= count[:, None])).to(cam.dtype)
    return (cam * rows[..., None]).sum(dim=1) / count.clamp(min=1)[:, None]
