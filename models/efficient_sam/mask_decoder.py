"""EfficientSAM's mask decoder: image embedding + prompt tokens -> mask logits and predicted IoU.

The decoder prepends an IoU token and ``1 + num_multimask_outputs`` mask tokens to the prompt
tokens, runs the two-way transformer, upsamples the image tokens 4x with two transposed convs,
and takes the dot product of each mask token (through its own hypernetwork MLP) with every
upsampled pixel. Mask token 0 is the single-mask output; tokens 1..3 are the multimask outputs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.efficient_sam.common import MLP
from models.efficient_sam.two_way_transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """``width``: channels of image embedding and tokens; ``upscaling_dims``: output channels of
    each 2x transposed conv (GroupNorm + GELU after all but the last, GELU after the last);
    ``iou_head_layers``: hidden layers of the IoU MLP (no sigmoid: IoU predictions are raw)."""

    def __init__(self, width: int, transformer: TwoWayTransformer, num_multimask_outputs: int = 3,
                 iou_head_layers: int = 2, iou_head_hidden: int = 256,
                 upscaling_dims: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1 if num_multimask_outputs > 1 else 1
        self.iou_token = nn.Embedding(1, width)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, width)
        layers, channels = [], width
        for i, dim in enumerate(upscaling_dims):
            last = i == len(upscaling_dims) - 1
            layers.append(nn.Sequential(nn.ConvTranspose2d(channels, dim, kernel_size=2, stride=2),
                                        nn.Identity() if last else nn.GroupNorm(1, dim), nn.GELU()))
            channels = dim
        self.final_output_upscaling_layers = nn.ModuleList(layers)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(width, width, channels, num_layers=2) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(width, iou_head_hidden, self.num_mask_tokens, num_layers=iou_head_layers)
        self.upscale = 2 ** len(upscaling_dims)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, prompt_tokens: torch.Tensor,
                multimask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_embeddings [B, C, h, w]``, ``image_pe [1, C, h, w]``, ``prompt_tokens [B, Q, N, C]``
        (Q prompt sets per image) -> masks ``[B, Q, M, 4h, 4w]`` (logits) and IoU ``[B, Q, M]``,
        ``M = num_multimask_outputs`` (3) when ``multimask`` else 1."""
        b, q, n, c = prompt_tokens.shape
        image = image_embeddings.repeat_interleave(q, dim=0)            # [B*Q, C, h, w]
        masks, iou = self.predict(image, image_pe.to(image.dtype), prompt_tokens.reshape(b * q, n, c))
        if multimask and self.num_multimask_outputs > 1:
            masks, iou = masks[:, 1:], iou[:, 1:]
        else:
            masks, iou = masks[:, :1], iou[:, :1]
        return masks.reshape(b, q, *masks.shape[1:]), iou.reshape(b, q, -1)

    def predict(self, image: torch.Tensor, image_pe: torch.Tensor,
                prompt_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: ``image [B, C, h, w]``, ``prompt_tokens [B, N, C]`` ->
        masks ``[B, 1+M, 4h, 4w]``, IoU ``[B, 1+M]``."""
        b, c, h, w = image.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(b, -1, -1), prompt_tokens], dim=1)
        tokens, image_tokens = self.transformer(image, image_pe, tokens)
        iou_out, mask_out = tokens[:, 0], tokens[:, 1:1 + self.num_mask_tokens]
        upscaled = image_tokens.transpose(1, 2).reshape(b, c, h, w)
        for layer in self.final_output_upscaling_layers:
            upscaled = layer(upscaled)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, c2, h2, w2 = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)
        return masks, self.iou_prediction_head(iou_out)
