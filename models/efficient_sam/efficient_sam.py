"""EfficientSam: image encoder + prompt encoder + mask decoder, with an embed-once /
prompt-many interface.

    pixels = preprocess(images, cfg.image_size)           # [B, 3, S, S], S = 1024 real
    emb = model.embed(pixels)                              # [B, 256, 64, 64], computed once
    logits, iou = model.predict_masks(emb, points, labels, input_size=(H, W), output_size=(h, w))
    masks = logits > 0                                     # [B, Q, 3, h, w]

Facts kept from the reference (yformer/EfficientSAM ``EfficientSam``):

* Preprocessing: pixels in [0, 1] (``ToTensor``), resized to ``S x S`` *before* normalising, with
  ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing, aspect ratio not
  kept), then ImageNet mean / std.
* Points are given in pixels of the original ``H x W`` image and rescaled to the ``S x S`` frame
  (``x * S / W``, ``y * S / H``); a negative coordinate becomes -1. Prompts are padded to
  ``max_points`` (6) with points at (-1, -1) of label -1; the padding tokens take part in the
  decoder's attention, so the padded length is fixed, as in the reference.
* The decoder gives low-res logits (``4 x grid``: 256x256); they are upsampled bicubically
  (``align_corners=False``). The reference upsamples to the input image size (or returns the
  low-res logits); here the size is ``output_size``: ``output_size=input_size`` is exactly the
  reference's ``forward`` output, ``None`` its low-res output.

Our differences (only where the reference's behaviour is accidental): a label -1 point is moved
to (-1, -1) whatever its coordinates (in the reference the padding token also encodes where it
lies, so padding with other coordinates changed the masks); more than ``max_points`` points
are an error unless the extra ones are padding (the reference cut them silently).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.efficient_sam.config import SamConfig
from models.efficient_sam.image_encoder import ImageEncoderViT
from models.efficient_sam.mask_decoder import MaskDecoder
from models.efficient_sam.prompt_encoder import PromptEncoder
from models.efficient_sam.two_way_transformer import TwoWayTransformer

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
MASK_THRESHOLD = 0.0


def preprocess(images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray], image_size: int = 1024, *,
               channels_last: bool | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Images -> normalised encoder input ``[B, 3, image_size, image_size]``.

    ``images``: uint8 in [0, 255] or float in [0, 1]; ``[B, H, W, 3]`` (channels last, as decoded
    images), ``[B, 3, H, W]``, either without the batch axis, or a list of single images of any
    sizes (each resized on its own). ``channels_last=None`` infers the layout from where the
    axis of size 3 is (an error when both places have 3). ``device``: where to compute (the
    pixels are moved there before conversion to float); default: where they are.
    Steps, as the reference: to float in [0, 1] (uint8 / 255, float32), bilinear resize to a
    square (``align_corners=False``, no antialias; skipped when already that size), then
    ``(x - mean) / std`` with the ImageNet mean / std. Floats keep their dtype.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images to preprocess")
        return torch.cat([preprocess(im, image_size, channels_last=channels_last, device=device) for im in images])
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # torch does not take read-only arrays (decoded images are Arrow buffers)
    x = torch.as_tensor(images)
    if device is not None:
        x = x.to(device)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"images must be [B, H, W, 3] or [B, 3, H, W], got {tuple(x.shape)}")
    if channels_last is None:
        last, first = x.shape[-1] == 3, x.shape[1] == 3
        if last and first:
            raise ValueError(f"ambiguous image layout {tuple(x.shape)}: pass channels_last=True or False")
        if not (last or first):
            raise ValueError(f"images must have 3 channels, got {tuple(x.shape)}")
        channels_last = last
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"images must have 3 channels, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {x.dtype}")
    x = x.contiguous()
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(PIXEL_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class EfficientSam(nn.Module):
    """EfficientSAM of a :class:`SamConfig`; parameter names as the published checkpoints."""

    mask_threshold: float = MASK_THRESHOLD

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.config = cfg
        grid = (cfg.embed_grid, cfg.embed_grid)
        self.image_encoder = ImageEncoderViT(cfg.image_size, cfg.patch_size, cfg.encoder_width, cfg.encoder_depth,
                                             cfg.encoder_heads, cfg.mlp_ratio, cfg.embed_dim, cfg.pretrain_grid)
        self.prompt_encoder = PromptEncoder(cfg.embed_dim, grid, (cfg.image_size, cfg.image_size))
        transformer = TwoWayTransformer(cfg.decoder_depth, cfg.embed_dim, cfg.decoder_heads, cfg.decoder_mlp_dim)
        self.mask_decoder = MaskDecoder(cfg.embed_dim, transformer, cfg.num_multimask_outputs, cfg.iou_head_layers,
                                        cfg.iou_head_hidden, cfg.upscaling_dims)
        # not in the checkpoints: non-persistent buffers (they follow .to(device))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def reset_buffers(self) -> None:
        """Refill the non-persistent buffers (after ``to_empty``)."""
        with torch.no_grad():
            self.pixel_mean.copy_(torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1))
            self.pixel_std.copy_(torch.tensor(PIXEL_STD).view(1, 3, 1, 1))

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray], *,
                   channels_last: bool | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """:func:`preprocess` at this model's ``image_size``, on ``device`` (default: the model's)."""
        return preprocess(images, self.config.image_size, channels_last=channels_last,
                          device=self.device if device is None else device)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``pixels [B, 3, S, S]`` -> image embedding ``[B, embed_dim, grid, grid]``."""
        return self.image_encoder(pixels)

    def prepare_points(self, points: torch.Tensor, labels: torch.Tensor,
                       input_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``points [B, Q, N, 2]`` (x, y) in pixels of an ``input_size = (H, W)`` image and
        ``labels [B, Q, N]`` -> points in the ``S x S`` frame and labels, both padded to
        ``max_points`` (padding: (-1, -1), label -1)."""
        if points.dim() != 4 or points.shape[-1] != 2 or labels.shape != points.shape[:-1]:
            raise ValueError(f"points must be [B, Q, N, 2] and labels [B, Q, N], got {tuple(points.shape)} "
                             f"and {tuple(labels.shape)}")
        labels = labels.to(points.device).long()
        if ((labels < -1) | (labels > 3)).any():
            raise ValueError("point labels must be -1 (padding), 0 (background), 1 (foreground), "
                             "2 (box top-left) or 3 (box bottom-right)")
        h, w = (int(v) for v in input_size)
        size = self.config.image_size
        points = points.float()
        x, y = points[..., 0], points[..., 1]
        scaled = torch.stack([torch.where(x >= 0, x * size / w, -1.0), torch.where(y >= 0, y * size / h, -1.0)], -1)
        scaled = torch.where((labels == -1)[..., None], torch.full_like(scaled, -1.0), scaled)
        extra = scaled.shape[2] - self.config.max_points
        if extra > 0:
            if (labels[..., self.config.max_points:] != -1).any():
                raise ValueError(f"at most {self.config.max_points} points per prompt set (padding with "
                                 f"label -1 aside), got {scaled.shape[2]}")
            scaled, labels = scaled[:, :, :self.config.max_points], labels[:, :, :self.config.max_points]
        elif extra < 0:
            scaled = F.pad(scaled, (0, 0, 0, -extra), value=-1.0)
            labels = F.pad(labels, (0, -extra), value=-1)
        return scaled, labels

    def predict_masks(self, embeddings: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                      input_size: Sequence[int], output_size: Sequence[int] | None = None,
                      multimask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for ``Q`` prompt sets per image from an image embedding (decoder only).

        ``embeddings [B, C, g, g]`` from :meth:`embed`; ``points [B, Q, N, 2]`` (x, y) in pixels
        of the original image, ``labels [B, Q, N]``; ``input_size = (H, W)`` of that image.
        Returns mask logits ``[B, Q, M, h, w]`` (on where > 0) and predicted IoU ``[B, Q, M]``,
        ``M`` = 3 (``multimask``) or 1. ``output_size = (h, w)``: bicubic upsampling of the
        low-res logits to that size (``input_size`` reproduces the reference; a heatmap grid or a
        display size avoids a full-resolution intermediate); ``None``: the low-res logits
        (``low_res_size`` square, 256 real) as they are.
        """
        if embeddings.dim() != 4 or embeddings.shape[0] != points.shape[0]:
            raise ValueError(f"embeddings [B, C, g, g] and points [B, Q, N, 2] must share B, got "
                             f"{tuple(embeddings.shape)} and {tuple(points.shape)}")
        scaled, labels = self.prepare_points(points.to(embeddings.device), labels, input_size)
        b, q, n, _ = scaled.shape
        tokens = self.prompt_encoder(scaled.reshape(b * q, n, 2), labels.reshape(b * q, n))
        tokens = tokens.to(embeddings.dtype).reshape(b, q, n, -1)
        logits, iou = self.mask_decoder(embeddings, self.prompt_encoder.dense_pe(), tokens, multimask)
        if output_size is not None:
            size = tuple(int(v) for v in output_size)
            if size != tuple(logits.shape[-2:]):
                m, lh, lw = logits.shape[2:]
                logits = F.interpolate(logits.reshape(b, q * m, lh, lw), size=size, mode="bicubic",
                                       align_corners=False).reshape(b, q, m, *size)
        return logits, iou

    def forward(self, images: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                output_size: Sequence[int] | None | str = "input") -> tuple[torch.Tensor, torch.Tensor]:
        """End to end, as the reference's ``forward``: ``images`` (see :func:`preprocess`; float
        ``[B, 3, H, W]`` in [0, 1] in the reference) -> logits ``[B, Q, 3, H, W]``, IoU ``[B, Q, 3]``.
        ``output_size="input"`` (default) upsamples to ``(H, W)``; ``None`` keeps the low-res logits."""
        pixels_in = torch.as_tensor(images)
        layout_last = pixels_in.shape[-1] == 3 and pixels_in.shape[-3] != 3
        input_size = tuple(pixels_in.shape[-3:-1] if layout_last else pixels_in.shape[-2:])
        embeddings = self.embed(self.preprocess(pixels_in, channels_last=layout_last))
        size = input_size if isinstance(output_size, str) and output_size == "input" else output_size
        return self.predict_masks(embeddings, points, labels, input_size, size)
