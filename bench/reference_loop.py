"""PNP-VQA the way LAVIS runs it, with this project's models and weights: the baseline that
``bench/run.py`` times the runtime against.

The control flow is LAVIS ``PNPVQA.predict_answers`` over a data loader of questions:

- each question arrives with its own decoded, preprocessed image (a data loader item per
  question), so an image asked 4 questions is decoded and resized 4 times;
- ``forward_itm``: the batch's images are encoded by the ITM ViT once per question, then GradCAM;
- ``forward_cap``: the captioner's ViT encodes every question's image again; each round
  decodes ``num_captions`` captions for every row of the batch, finished or not, until every
  row holds ``num_captions`` distinct captions;
- ``forward_qa``: one FiD ``generate`` per question (LAVIS's ``internal_bsz_fid=1``).

Random draws are the runtime's (seeded by sample id and round: ``stages.common.row_rng``) and
the rounds stop at ``max_rounds`` as the runtime's do, so both give the same answers; LAVIS
draws from torch's global generator and loops without bound.

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
    return out


def load_question_image(sample: dict, preprocess) -> np.ndarray:
    """One data loader item's image: decoded and preprocessed for this question alone."""
    from stages.base import Batch
    from stages.images import decode_image

    image = decode_image(sample["image_bytes"], "image bytes")
    batch = Batch({"image": [image]}, {"image": np.ones(1, bool)}, [sample["sample_id"]])
    return preprocess.process(batch)["pixels"][0]


def forward_itm(models, pixels, questions):
    """GradCAM heatmaps ``[B, g*g]``: every question's image encoded again."""
    import torch

    from models.blip.tokenizer import tokenize_questions
    from stages.text import blip_question

    gradcam = models["gradcam"]
    ids, mask = tokenize_questions(gradcam.tokenizer, [blip_question(q) for q in questions],
                                   gradcam.params.max_length)
    with torch.no_grad():
        embeds = gradcam.model.encode_image(pixels)
    heatmap, _ = gradcam.model.gradcam(embeds, ids, mask, gradcam.block_num)
    return heatmap.reshape(len(questions), -1).numpy()


def forward_cap(models, pixels, heatmaps, sample_ids):
    """Captions per row; each round decodes ``num_captions`` captions for every row."""
    import torch

    from stages.common import row_rng
    from grids import sample_patch_sets

    stage = models["caption"]
    p = stage.params
    n = len(sample_ids)
    with torch.no_grad():
        encoded = stage.model.encode_image(pixels)                      # [B, 1+P, C]
    rows = torch.arange(n)
    new_tokens = p.max_length - len(stage.prompt_ids)
    captions: list[list[str]] = [[] for _ in range(n)]
    for r in range(p.max_rounds):
        if min(len(c) for c in captions) >= p.num_captions:
            break
        rngs = [row_rng(p.seed, f"{sid}#{r}") for sid in sample_ids]
        patches = sample_patch_sets(heatmaps, rngs, p.num_captions, p.num_patches)
        index = torch.from_numpy(patches + 1).long()
        uniforms = torch.from_numpy(np.stack([rng.random((p.num_captions, new_tokens)) for rng in rngs]))
        texts = stage._decode(encoded, rows, index, uniforms)
        for i in range(n):
            for text in texts[i]:
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
