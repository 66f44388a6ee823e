"""The images and batches ``runtime train caption`` trains and evaluates on
(:mod:`training.caption`): rendered shapes scenes with their per-patch object coverage, patch
subsets and their target captions (:class:`ShapesImages`), the patch tokens of a subset
(:func:`patch_states`) and a batch of captions to teacher-force (:func:`caption_batch`)."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from shapes.captions import caption_for_patches, object_coverage, visible_objects


class ShapesImages:
    """Rendered shapes scenes of one seed, with their per-patch object coverage, by index."""

    def __init__(self, params, count: int, grid: int, image_size: int, min_overlap: float) -> None:
        from shapes.dataset import render_scene

        self.grid, self.image_size, self.min_overlap = grid, image_size, min_overlap
        self.scenes, self.images, self.coverage = [], [], []
        for i in range(count):
            scene = render_scene(params.seed, i, params)
            self.images.append(scene.image)
            self.scenes.append(json.loads(scene.to_json()))
            self.coverage.append(object_coverage(self.scenes[-1], grid, masks=scene.masks))

    def __len__(self) -> int:
        return len(self.scenes)

    def pixels(self, indices: Sequence[int]):
        from training.data import blip_pixels

        return blip_pixels([self.images[i] for i in indices], self.image_size)

    def sample_patches(self, i: int, rng: np.random.Generator, k: int, object_bias: float) -> np.ndarray:
        """``[k]`` sorted distinct patch indices of image ``i`` (Gumbel-top-k on the weights)."""
        from grids import sample_patch_sets

        cover = self.coverage[i]
        on_object = (cover >= self.min_overlap).any(axis=0) if len(cover) else np.zeros(self.grid ** 2, bool)
        weights = 1.0 + object_bias * on_object.astype(np.float64)
        return sample_patch_sets(weights[None], [rng], 1, k)[0, 0]

    def caption(self, i: int, patches: Sequence[int]) -> str:
        return caption_for_patches(self.scenes[i], patches, self.grid, min_overlap=self.min_overlap,
                                   coverage=self.coverage[i])

    def visible(self, i: int, patches: Sequence[int]) -> list[tuple[str, str]]:
        return visible_objects(self.scenes[i], patches, self.grid, min_overlap=self.min_overlap,
                               coverage=self.coverage[i])


def patch_states(tokens, patches):
    """``tokens [B, 1+P, C]``, ``patches [B, K]`` (CLS excluded) -> ``[B, K, C]`` (index + 1)."""
    import torch

    index = (patches + 1)[..., None].expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, index)


def caption_batch(tokenizer, captions: Sequence[str], prompt_length: int):
    """``input_ids [B, T]`` (``[DEC]`` first) and ``targets [B, T]`` (-100 on the prompt and padding)."""
    enc = tokenizer(list(captions), padding="longest", return_tensors="pt")
    input_ids = enc["input_ids"].clone()
    input_ids[:, 0] = tokenizer.bos_token_id
    targets = input_ids.masked_fill(enc["attention_mask"] == 0, -100)
    targets[:, :prompt_length] = -100
    return input_ids, targets
