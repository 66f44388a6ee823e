"""Held-out evaluation of ``runtime train caption`` (:mod:`training.caption`): greedy captions
of held-out patch subsets against :func:`shapes.captions.caption_for_patches` (exact match,
object precision and recall, the empty subsets apart), and :func:`check_metrics`, the quick
check of a shipped ``caption.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shapes.captions import MIN_OVERLAP, PROMPT, mentioned_objects
from training.caption_data import ShapesImages, patch_states

EVAL_BATCH = 64
GENERATE_MAX_LENGTH = 24  # prompt (4) + 4 objects x 3 words + 3 "and" + [SEP] = 20, with room


def evaluate(model, tokenizer, images: ShapesImages, subsets: list[tuple[int, np.ndarray]], prompt_ids,
             device, step: int) -> dict[str, Any]:
    """Greedy captions of the held-out patch subsets against :func:`caption_for_patches`."""
    import torch

    was_training = model.training
    model.eval()
    texts: list[str] = []
    with torch.no_grad():
        for s in range(0, len(subsets), EVAL_BATCH):
            chunk = subsets[s:s + EVAL_BATCH]
            tokens = model.encode_image(images.pixels([i for i, _ in chunk]).to(device))
            patches = torch.from_numpy(np.stack([p for _, p in chunk])).to(device).long()
            ids = model.generate(patch_states(tokens, patches), prompt_ids.to(device), None,
                                 max_length=GENERATE_MAX_LENGTH, min_length=0,
                                 eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(ids[:, len(prompt_ids):], skip_special_tokens=True)
    model.train(was_training)
    exact = mentioned = mentioned_ok = visible_total = visible_found = empty = empty_ok = 0
    examples = []
    for (i, patches), text in zip(subsets, texts):
        target = images.caption(i, patches)[len(PROMPT):]
        text = " ".join(text.split())
        exact += text == target
        seen = set(images.visible(i, patches))
        named = mentioned_objects(text)
        mentioned += len(named)
        mentioned_ok += sum(o in seen for o in named)
        visible_total += len(seen)
        visible_found += len(seen & set(named))
        if not seen:
            empty += 1
            empty_ok += text == target
        if len(examples) < 8:
            examples.append({"image": int(i), "target": PROMPT + target, "generated": PROMPT + text})
    n = len(subsets)
    return {"step": step, "subsets": n, "exact_match": exact / n if n else None,
            "object_precision": mentioned_ok / mentioned if mentioned else None,
            "object_recall": visible_found / visible_total if visible_total else None,
            "mentioned_objects": mentioned, "visible_objects": visible_total,
            "empty_subsets": empty, "empty_exact_match": empty_ok / empty if empty else None,
            "examples": examples}


def check_metrics(weights: Path, *, seed: int = 7000, num_images: int = 24, subsets: int = 4,
                  num_patches: int = 20, object_bias: float = 3.0) -> dict[str, float]:
    """Held-out greedy-caption exact match and object precision / recall of the shapes captioner
    ``weights`` on ``subsets`` patch subsets of each of ``num_images`` shapes images of ``seed``:
    the quick, deterministic check that a shipped file still gives its manifest's numbers."""
    import torch

    from models.blip.checkpoint import load_blip_caption
    from models.blip.tokenizer import caption_prompt_ids, load_blip_tokenizer_for
    from training.data import source_params

    model, _ = load_blip_caption("shapes", weights)
    tokenizer = load_blip_tokenizer_for("shapes")
    images = ShapesImages(source_params("shapes", seed, num_images, {}), num_images, model.grid,
                          model.config.vit.image_size, MIN_OVERLAP)
    rng = np.random.default_rng(seed)
    chosen = [(i, images.sample_patches(i, rng, num_patches, object_bias)) for i in range(num_images)
              for _ in range(subsets)]
    result = evaluate(model, tokenizer, images, chosen, caption_prompt_ids(tokenizer, PROMPT), torch.device("cpu"), 0)
    return {k: result[k] for k in ("exact_match", "object_precision", "object_recall")}
