"""PNP-VQA the way LAVIS runs it, with this project's models and weights: the baseline that
``bench/run.py`` times the runtime against.

The control flow is LAVIS ``PNPVQA.predict_answers`` over a data loader of questions:

- each question arrives with its own decoded, preprocessed image (a data loader item per
  question), so an image asked 4 questions is decoded and resized 4 times;
- ``forward_itm`` (LAVIS ``compute_gradcam``): the batch's images are encoded by the ITM ViT
  once per question, with autograd on and every parameter requiring grad; the ITM text encoder
  runs on those tokens keeping layer ``block_num``'s cross-attention probabilities in the graph;
  ``zero_grad``, then ``backward`` of the match logits' sum: a full backward through the text
  encoder and the ViT into every parameter's ``.grad`` (held until the next batch, as LAVIS's
  are), and the GradCAM from the probabilities and their retained gradient;
- ``forward_cap``: the captioner's ViT encodes every question's image again; each round
  decodes ``num_captions`` captions for every row of the batch, finished or not, all
  ``batch x num_captions`` sequences in one decoding loop, until every row holds
  ``num_captions`` distinct captions. The loop (``lavis_generate``) does what LAVIS's
  ``text_decoder.generate(do_sample=True)`` does per step: prefill the prompt, then one decoder
  call per new token in which every layer projects the sampled image tokens' cross-attention
  keys and values again (only the self-attention ones are cached, as in LAVIS's ``med.py``),
  the logits processors over the full vocabulary, one draw per row, finished rows padded;
- ``forward_qa``: one FiD ``generate`` per question (LAVIS's ``internal_bsz_fid=1``), padded
  per question; its greedy decoding caches the decoder's self- and cross-attention keys and
  values, as Hugging Face T5 ``generate`` (LAVIS's) does.

Random draws are the runtime's (seeded by sample id and round: ``stages.common.row_rng``; the
token draw is ``models.blip.sampling.pick_tokens``) and the rounds stop at ``max_rounds`` as the
runtime's do, so both give the same heatmaps, captions and answers
(``tests/test_reference_loop.py``); LAVIS draws from torch's global generator and loops without
bound. Both ViTs attend as LAVIS's do, by explicit matmul and softmax (``lavis_vit_attention``:
under grad autograd keeps every layer's attention probabilities, ``[heads, 577, 577]`` per layer
and image at 384 px). Left as the runtime does them (small next to the work above): the
caption decoder's all-ones image and text attention masks that LAVIS passes (the ITM step passes
its image mask), the second tokenization inside LAVIS's ITM forward, and fused attention in the
BERT layers other than the GradCAM layer, where LAVIS's ``med.py`` uses explicit matmul and
softmax.

    .venv/bin/python bench/reference_loop.py --images 50 --out answers.json
    .venv/bin/python bench/reference_loop.py --images 2 --questions-per-image 5 --random-weights \
        --set gradcam.preset=large --set caption.preset=large --set answer.preset=base \
        --set caption.num_captions=100 --out answers.json --stats stats.json   # published sizes

``--stats`` writes the seconds of each step (load: decode and preprocess; itm; caption; qa) and
the process's peak RSS after each, as ``bench/run.py``'s ``published`` part compares them with
the runtime's nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.executors import apply_threads  # noqa: E402


def pnp_vqa_settings(overrides: list[str] = ()) -> dict:
    """The params of ``graphs/pnp_vqa.yaml``'s model nodes (the reference runs the same), with
    ``NODE.PARAM=VALUE`` overrides (values parsed as YAML, as ``runtime run --set``)."""
    from runtime.yaml_io import load_yaml

    nodes = load_yaml((ROOT / "graphs" / "pnp_vqa.yaml").read_text())["nodes"]
    settings = {name: dict(nodes[name].get("params", {})) for name in ("gradcam", "caption", "answer")}
    for item in overrides:
        key, _, value = item.partition("=")
        node, _, param = key.partition(".")
        settings[node][param] = load_yaml(value)
    return settings


def load_models(settings: dict, device: str):
    """The three set-up stages (models and tokenizers) of the graph's params."""
    from stages.blip import Caption, ItmGradcam
    from stages.qa import QAFiD

    stages = {"gradcam": ItmGradcam, "caption": Caption, "answer": QAFiD}
    out = {}
    for name, cls in stages.items():
        stage = cls(cls.Params(**settings[name]))
        stage.setup(device)
        out[name] = stage
    for name in ("gradcam", "caption"):
        lavis_vit_attention(out[name].model.visual_encoder)
    return out


def lavis_vit_attention(vit, explicit: bool = True) -> None:
    """Make the ViT's attention LAVIS's (``lavis/models/vit.py``): ``softmax(q k^T * scale) v``
    with the probabilities materialised (and kept by autograd for the backward under grad),
    instead of timm's fused attention; ``explicit=False`` restores the fused one."""
    for block in vit.blocks:
        block.attn.fused_attn = not explicit


def load_question_image(sample: dict, preprocess) -> np.ndarray:
    """One data loader item's image: decoded and preprocessed for this question alone."""
    from stages.base import Batch
    from stages.images import decode_image

    image = decode_image(sample["image_bytes"], "image bytes")
    batch = Batch({"image": [image]}, {"image": np.ones(1, bool)}, [sample["sample_id"]])
    return preprocess.process(batch)["pixels"][0]


def forward_itm(models, pixels, questions):
    """GradCAM heatmaps ``[B, g*g]`` the way LAVIS's ``compute_gradcam`` gets them: every
    question's image encoded again by the ITM ViT with autograd on and every parameter requiring
    grad, the ITM logits of the whole model, ``zero_grad`` and ``backward`` of the match logits'
    sum into every parameter's ``.grad`` (ViT included), then the saved cross-attention map of
    ``block_num`` and its gradient. The parameter gradients stay allocated until the next call,
    as LAVIS's do until its next batch's ``zero_grad``."""
    import torch

    from models.blip.itm import combine_gradcam
    from models.blip.tokenizer import tokenize_questions
    from stages.text import blip_question

    gradcam = models["gradcam"]
    model, block_num = gradcam.model, gradcam.block_num
    model.check_block_num(block_num)
    ids, mask = tokenize_questions(gradcam.tokenizer, [blip_question(q) for q in questions],
                                   gradcam.params.max_length)
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            embeds = model.encode_image(pixels)                                # [B, 1+P, Cv], in the graph
            image_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out = model.text_encoder(ids, mask, embeds, encoder_mask=image_mask, probs_layer=block_num)
            logits = model.itm_head(out.hidden[:, 0])
            probs = out.cross_probs                                            # [B, heads, T, 1+P]
            probs.retain_grad()
            model.zero_grad()
            logits[:, 1].sum().backward()
    finally:
        for p, r in zip(params, requires):
            p.requires_grad_(r)
    with torch.no_grad():
        heatmap = combine_gradcam(probs.detach(), probs.grad, mask)
    return heatmap.reshape(len(questions), -1).numpy()


def lavis_generate(stage, patch_states, uniforms):
    """Sampled caption ids ``[N, <= max_length]`` (prompt included, ``pad`` after ``eos``) for
    ``patch_states [N, K, Cv]``, with the per-step work of LAVIS's ``text_decoder.generate(
    do_sample=True)``: the prompt prefilled, then one decoder call per new token in which every
    layer projects the image tokens' cross-attention keys and values again (LAVIS caches only
    the self-attention ones), the logits processors on the full-vocabulary logits, and one draw
    per row. The draw is the runtime's (``pick_tokens`` on ``uniforms [N, max_length - T0]``),
    and the stop and padding rules are ``BlipCaption.generate``'s, so the ids are the runtime's."""
    import torch

    from models.blip.sampling import build_processors, pick_tokens

    p, model, tokenizer = stage.params, stage.model, stage.tokenizer
    eos, pad = tokenizer.sep_token_id, tokenizer.pad_token_id
    rows = patch_states.shape[0]
    prompt = stage.prompt_ids.to(patch_states.device)
    steps = p.max_length - prompt.numel()
    processors = build_processors(min_length=p.min_length, eos_token_id=eos, top_k=p.top_k, top_p=p.top_p,
                                  repetition_penalty=p.repetition_penalty, device=patch_states.device)
    ids = prompt.expand(rows, -1).clone()
    with torch.no_grad():
        logits, cache = model.text_decoder(ids, encoder_states=patch_states, use_cache=True)
        unfinished = torch.ones(rows, dtype=torch.bool, device=ids.device)
        for step in range(steps):
            scores = processors(ids, logits[:, -1].float())
            chosen = pick_tokens(scores, uniforms[:, step])
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            unfinished &= chosen != eos
            if step + 1 == steps or not bool(unfinished.any()):
                break
            logits, cache = model.text_decoder(chosen[:, None], encoder_states=patch_states, cache=cache,
                                               use_cache=True)
    return ids


def forward_cap(models, pixels, heatmaps, sample_ids):
    """Captions per row; each round decodes ``num_captions`` captions for every row of the
    batch, finished or not, all ``B * num_captions`` sequences in one decoding loop
    (:func:`lavis_generate`)."""
    import torch

    from stages.blip import caption_texts
    from stages.common import row_rng
    from grids import sample_patch_sets

    stage = models["caption"]
    p = stage.params
    n = len(sample_ids)
    with torch.no_grad():
        encoded = stage.model.encode_image(pixels)                      # [B, 1+P, C]
    width = encoded.shape[-1]
    new_tokens = p.max_length - len(stage.prompt_ids)
    captions: list[list[str]] = [[] for _ in range(n)]
    for r in range(p.max_rounds):
        if min(len(c) for c in captions) >= p.num_captions:
            break
        rngs = [row_rng(p.seed, f"{sid}#{r}") for sid in sample_ids]
        patches = sample_patch_sets(heatmaps, rngs, p.num_captions, p.num_patches)  # [B, C, K], sorted
        index = torch.from_numpy(patches + 1).long()                                # +1 skips CLS
        states = torch.stack([torch.gather(encoded, 1, index[:, c, :, None].expand(-1, -1, width))
                              for c in range(p.num_captions)], dim=1).flatten(0, 1)  # [B*C, K, W]
        uniforms = torch.from_numpy(np.stack([rng.random((p.num_captions, new_tokens)) for rng in rngs]))
        ids = lavis_generate(stage, states, uniforms.flatten(0, 1))
        texts = caption_texts(stage.tokenizer, ids, len(stage.prompt_ids), p.prompt, p.text)
        for i in range(n):
            for text in texts[i * p.num_captions:(i + 1) * p.num_captions]:
                if len(captions[i]) < p.num_captions and not any(text in kept for kept in captions[i]):
                    captions[i].append(text)
    return captions


def forward_qa(models, questions, captions) -> list[str]:
    """One FiD generate per question."""
    import torch

    from models.fid_t5 import make_passages, tokenize_passages

    stage = models["answer"]
    p = stage.params
    answers = []
    for question, caps in zip(questions, captions):
        ids, mask = tokenize_passages(stage.tokenizer, [make_passages(question, caps, p.num_captions_fid)],
                                      p.max_passage_tokens)
        with torch.no_grad():
            out = stage.model.generate(ids, mask, num_beams=p.num_beams, max_new_tokens=p.max_length - 1,
                                       min_new_tokens=max(0, p.min_length - 1))
        answers.append(stage.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip())
    return answers


class StepClock:
    """Seconds per step and the process's peak RSS (MiB) at the end of each."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    def step(self, name: str, fn, *args):
        from runtime.node_runner import peak_rss_mb

        start = time.perf_counter()
        out = fn(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.peak_rss_mb[name] = peak_rss_mb()
        return out


def predict(samples: list[dict], batch_size: int, device: str = "cpu", overrides: list[str] = (),
            clock: StepClock | None = None) -> dict[str, str]:
    """Answers by sample id, the reference way."""
    import torch

    from stages.images import PreprocessImage

    clock = clock or StepClock()
    models = clock.step("setup", load_models, pnp_vqa_settings(overrides), device)
    preprocess = PreprocessImage(PreprocessImage.Params(family="blip"))
    answers = {}
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        pixels = clock.step("load", lambda: torch.from_numpy(np.stack([load_question_image(s, preprocess)
                                                                        for s in batch])))
        questions = [s["question"] for s in batch]
        heatmaps = clock.step("itm", forward_itm, models, pixels, questions)
        captions = clock.step("caption", forward_cap, models, pixels, heatmaps, [s["sample_id"] for s in batch])
        for s, answer in zip(batch, clock.step("qa", forward_qa, models, questions, captions)):
            answers[s["sample_id"]] = answer
    return answers


def shapes_samples(seed: int, images: int, questions_per_image: int) -> list[dict]:
    from shapes.dataset import ShapesParams, iter_samples

    return list(iter_samples(ShapesParams(seed=seed, num_images=images, questions_per_image=questions_per_image)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50, help="shapes images (seed 8000, as graphs/pnp_vqa.yaml)")
    ap.add_argument("--questions-per-image", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16, help="questions per data loader batch")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPUs available)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.PARAM=VALUE",
                    help="a model node's param (gradcam, caption, answer), as runtime run --set")
    ap.add_argument("--random-weights", action="store_true", help="seeded random weights (runtime run's flag)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file: {sample_id: answer}")
    ap.add_argument("--stats", type=Path, help="JSON file: seconds and peak RSS per step")
    a = ap.parse_args()
    from models.weights import RANDOM_WEIGHTS_ENV
    from runtime.executors import available_cpus

    apply_threads(a.threads or available_cpus())
    if a.random_weights:
        os.environ[RANDOM_WEIGHTS_ENV] = "1"
    start = time.perf_counter()
    clock = StepClock()
    answers = predict(shapes_samples(8000, a.images, a.questions_per_image), a.batch_size,
                      overrides=a.overrides, clock=clock)
    a.out.write_text(json.dumps(answers, indent=0, sort_keys=True))
    if a.stats:
        a.stats.write_text(json.dumps({"seconds": clock.seconds, "peak_rss_mb": clock.peak_rss_mb,
                                       "total_s": time.perf_counter() - start}, indent=1))
    print(f"{len(answers)} questions in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
