"""``runtime train fid``: train the Fusion-in-Decoder T5 to answer shapes questions from captions.

PNP-VQA's ``qa_fid`` stage reads the question and the captions the ``caption`` stage made of
heatmap-sampled patches (one caption per passage, ``num_captions_fid: 1``). This command trains
the FiD T5 (``--preset shapes``: the bundled model's architecture; ``tiny`` for tests) for
exactly that input on the synthetic ``shapes`` data, with the captions the trained captioner is
taught to produce (:func:`shapes.captions.caption_for_patches`, the prompt stripped as the
``caption`` stage strips it): ``"a red circle and a blue square"``, ``"a plain background"``.

Captions of a training sample (the recipe; :func:`training.fid_data.draw_captions`):

1. The heatmap. The *focus* of a question is its referred objects (the source's ``gt_mask``,
   pooled to the ``--grid`` patch grid as the fraction of each cell covered); a question with
   none (``is there a blue diamond?`` -> no; ``how many circles?`` -> 0) focuses on the objects
   whose colour or shape it names, as an ITM heatmap latches onto those words; a question that
   names nothing in the scene has no focus. The heatmap is ``focus + spread`` with ``spread``
   drawn log-uniformly from ``[--spread-min, --spread-max]`` per sample (small: nearly every
   patch on the focus; 1: close to uniform, other objects appear often). With probability
   ``--uniform-fraction``, and always without a focus, the heatmap is uniform.
2. The captions, as the ``caption`` stage draws them: rounds of ``--num-captions`` subsets of
   ``--num-patches`` distinct patches (probability proportional to the heatmap, Gumbel-top-k
   as ``grids.sample_patch_sets``), each captioned with the objects visible in it
   (``--min-overlap`` of a patch), a caption kept when it is not a substring of one already
   kept; until ``--num-captions`` are kept or ``--max-rounds`` rounds are spent (so a focused
   heatmap gives fewer, repeated-object captions, as in the pipeline).
3. Passages: :func:`models.fid_t5.make_passages` with ``num_captions_fid=1``; target: the most
   frequent VQA-normalised human answer (``stages.evaluation.normalize_answer``: ``"Two"`` and
   ``"two"`` count as ``"2"``), which for the shapes source is the exact answer.

Loss: teacher-forced cross-entropy of the answer tokens (and ``</s>``) through
``FiDT5.forward``. AdamW (no weight decay on biases / norms), linear warmup over ``--warmup``
steps then a constant learning rate (``--lr-decay cosine``: a cosine decay to 0 at ``--steps``,
which then may not change on ``--resume``), gradient clipping. ``--init FILE`` starts from a previous
``fid_t5.safetensors`` of the same preset, else the preset's seeded random initialisation.

Some questions cannot always be answered from captions: captions list objects left to right
but carry no vertical position (``what shape is at the top?``), and a caption names each
visible object once, so counts are only right when the captions together show every object
counted. The held-out metrics are reported per question type for that reason. The bundled
tokenizer (``models/assets/tiny_t5``) lacks the word ``textured``: ``"a textured background"``
reads ``a <unk> background``, still distinct from ``"a plain background"``.

Determinism: step ``k``'s samples and captions come from ``numpy.random.default_rng([seed, k])``
alone; the ``shapes`` preset has no dropout (``tiny``'s dropout draws from the torch RNG, saved in
the checkpoint). So ``--resume`` (model, optimiser, step and torch RNG state from
``DIR/checkpoint.pt``) ends with the same weights as an uninterrupted run (same device and
threads). Evaluation does not touch the training state.

Held-out evaluation (at the start, the end and every ``--eval-every`` steps): the questions of
``--eval-images`` shapes images of seed ``--eval-seed`` (default seed + 1000), captions drawn
once from ``default_rng(eval_seed)`` with the same recipe; greedy answers (as ``qa_fid``: one
beam, ``max_length`` 20) scored by exact match with the answer and by VQA accuracy against the
ten human answers (``stages.evaluation.vqa_accuracy``), overall and per question type.

Outputs in ``--out DIR``: ``fid_t5.safetensors`` (the T5 state dict; ``load_fid_t5(preset,
path)`` reads it), ``checkpoint.pt`` (resumable, atomic, ``weights_only``), ``loss.csv`` (loss,
teacher-forced answer accuracy, learning rate), ``loss.png``, ``config.json``, ``metrics.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from models.fid_t5_family import FID_T5
from training.common import add_model_options, mean_or_none
from training.data import ShapesSettings
from training.fid_data import QAData, QASample, Recipe, sample_passages
from training.loop import Options, Step, Trainer

PRESETS = FID_T5.built_in  # the presets this command trains
GRID = 24  # the BLIP patch grid the caption stage samples from (384 / 16)
EVAL_BATCH = 64
MAX_NEW_TOKENS = 19  # qa_fid's max_length 20, the decoder start token included
MAX_PASSAGE_TOKENS = 512  # qa_fid's max_passage_tokens
CHECK_IMAGES = 32


# --- settings ---------------------------------------------------------------------------------

@dataclass
class FidSettings(ShapesSettings, Recipe):
    preset: str = "tiny"
    init: str | None = None
    grid: int = GRID
    batch_size: int = 32

    @property
    def recipe(self) -> Recipe:
        return Recipe(**{f.name: getattr(self, f.name) for f in fields(Recipe)})


# --- batches and evaluation -------------------------------------------------------------------

def answer_batch(tokenizer, targets: Sequence[str], start_token: int):
    """``decoder_input_ids [B, T]`` (start token, then the answer shifted right) and ``labels
    [B, T]`` (the answer tokens and ``</s>``, -100 on padding)."""
    import torch

    enc = tokenizer(list(targets), padding="longest", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    start = torch.full((labels.shape[0], 1), start_token, dtype=torch.long)
    decoder_input_ids = torch.cat([start, enc["input_ids"][:, :-1]], dim=1)
    return decoder_input_ids, labels


@dataclass(frozen=True)
class EvalItem:
    sample: QASample
    passages: list[str]


def eval_items(data: QAData, seed: int, recipe: Recipe) -> list[EvalItem]:
    """Every question of ``data`` with captions drawn once from ``default_rng(seed)``, in order."""
    rng = np.random.default_rng(seed)
    return [EvalItem(s, sample_passages(data, s, rng, recipe)) for s in data.samples]


def generate_answers(model, tokenizer, passages: list[list[str]], device) -> list[str]:
    """Greedy answers (as ``qa_fid`` with its defaults), ``EVAL_BATCH`` questions at a time."""
    import torch

    from models.fid_t5 import tokenize_passages

    answers: list[str] = []
    with torch.no_grad():
        for start in range(0, len(passages), EVAL_BATCH):
            ids, mask = tokenize_passages(tokenizer, passages[start:start + EVAL_BATCH], MAX_PASSAGE_TOKENS)
            out = model.generate(ids.to(device), mask.to(device), num_beams=1, max_new_tokens=MAX_NEW_TOKENS)
            answers += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return answers


def evaluate(model, tokenizer, items: list[EvalItem], device, step: int) -> dict[str, Any]:
    """Exact match (answer == target) and VQA accuracy, overall and per question type."""
    from stages.evaluation import vqa_accuracy

    was_training = model.training
    model.eval()
    predictions = generate_answers(model, tokenizer, [it.passages for it in items], device)
    model.train(was_training)
    exact = [float(p == it.sample.target) for p, it in zip(predictions, items)]
    vqa = [vqa_accuracy(p, it.sample.answers) for p, it in zip(predictions, items)]
    per_type: dict[str, dict[str, Any]] = {}
    for kind in sorted({it.sample.question_type for it in items}):
        rows = [k for k, it in enumerate(items) if it.sample.question_type == kind]
        per_type[kind] = {"samples": len(rows), "exact_match": float(np.mean([exact[k] for k in rows])),
                          "vqa_accuracy": mean_or_none([vqa[k] for k in rows if vqa[k] is not None])}
    examples = [{"question": it.sample.question, "passages": it.passages, "target": it.sample.target,
                 "answer": p} for p, it in list(zip(predictions, items))[:8]]
    scored = [v for v in vqa if v is not None]
    return {"step": step, "samples": len(items), "exact_match": mean_or_none(exact),
            "vqa_accuracy": mean_or_none(scored), "per_type": per_type,
            "mean_captions": mean_or_none([len(it.passages) for it in items]), "examples": examples}


def check_metrics(weights: Path, *, seed: int = 7000, num_images: int = CHECK_IMAGES) -> dict[str, float]:
    """Held-out metrics of a ``fid_t5.safetensors`` (its preset read from the file's metadata,
    default ``shapes``) on the questions of ``num_images`` default shapes images of ``seed``,
    captions drawn with the default recipe from ``default_rng(seed)``: ``exact_match``,
    ``vqa_accuracy`` and ``exact_match_<type>`` per question type. Deterministic."""
    import torch

    from models.fid_t5 import load_fid_t5
    from training.data import source_params

    weights = Path(weights)
    preset = _file_preset(weights) or "shapes"
    model, tokenizer = load_fid_t5(preset, weights)
    data = QAData(source_params("shapes", seed, num_images, {}), GRID)
    result = evaluate(model, tokenizer, eval_items(data, seed, Recipe()), torch.device("cpu"), 0)
    metrics = {"exact_match": float(result["exact_match"]), "vqa_accuracy": float(result["vqa_accuracy"])}
    metrics.update({f"exact_match_{k}": float(v["exact_match"]) for k, v in result["per_type"].items()})
    return metrics


def _file_preset(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("preset")
    except Exception:  # load_fid_t5 reports an unreadable file
        return None


# --- the trainer ------------------------------------------------------------------------------

def save_weights(model, path: Path, metadata: dict[str, str]) -> None:
    """The T5 state dict (tied embeddings once) as safetensors, atomically."""
    from models.fid_t5 import fid_t5_state
    from models.weights import save_safetensors

    save_safetensors(fid_t5_state(model), path, metadata)


def initial_fingerprint(preset: str, init: str | None) -> str:
    """Identifies the weights :func:`initial_model` starts from."""
    from models.weights import file_fingerprint

    if init is None:
        return f"random-init:{preset}:seed={FID_T5.random_init(preset).seed}"
    if not Path(init).is_file():
        raise FileNotFoundError(f"--init {init}: no such file")
    return file_fingerprint(init)


def initial_model(preset: str, init: str | None):
    """``(FiDT5, tokenizer)`` a training starts from: ``init`` or the seeded random init."""
    from models.fid_t5 import build_fid_t5, load_fid_t5

    if init is None:
        return build_fid_t5(preset)
    if not Path(init).is_file():
        raise FileNotFoundError(f"--init {init}: no such file")
    return load_fid_t5(preset, init)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class FidTrainer(Trainer):
    command = "fid"
    description = ("Train the Fusion-in-Decoder T5 (qa_fid) to answer shapes questions from captions of "
                   "heatmap-sampled patches (one caption per passage, as the graphs use). Writes "
                   "DIR/fid_t5.safetensors (loadable by load_fid_t5(preset, path)), DIR/checkpoint.pt, "
                   "DIR/loss.csv, DIR/loss.png, DIR/config.json, DIR/metrics.json (held-out exact match and "
                   "VQA accuracy, per question type).")
    settings = FidSettings
    checkpoint_format, checkpoint_version, checkpoint_kind = "pnpvqa-fid-training", 2, "a FiD T5"
    weights_file = "fid_t5.safetensors"
    log_columns = ("loss", "accuracy", "lr")  # accuracy: answers whose every token is right (teacher-forced)
    plot_ylabel = "answer cross-entropy (per token)"
    resumable = ("init",)  # the --init file is compared by its fingerprint
    data_title = "data (the shapes source and the captions of a question)"
    batch_help = "questions per step"

    @classmethod
    def add_options(cls, o: Options) -> None:
        add_model_options(o, PRESETS, architecture="FiD T5 (built-in configs)", weights_folder=False,
                          init_help="initial weights (a fid_t5.safetensors of the same preset); default: the "
                          "preset's seeded random initialisation")
        FidSettings.add_options(o, images="shapes images whose questions are trained on")
        d = o.data
        o.add(d, "--grid", type=int, help="patch grid of the captioner (24 = BLIP 384 / 16)")
        o.add(d, "--num-captions", type=int, help="captions kept per question (caption stage)")
        o.add(d, "--num-patches", type=int, help="patches per caption (caption stage)")
        o.add(d, "--max-rounds", type=int, help="sampling rounds for distinct captions (caption stage)")
        o.add(d, "--uniform-fraction", type=float, help="share of questions captioned from a uniform heatmap")
        o.add(d, "--spread-min", type=float,
              help="smallest weight added to every cell of a focused heatmap (log-uniform draw)")
        o.add(d, "--spread-max", type=float,
              help="largest weight added to every cell of a focused heatmap (log-uniform draw)")
        o.add(d, "--min-overlap", type=float,
              help="share of a patch an object must cover to be visible in it (as runtime train caption)")
        o.add(o.evaluation, "--eval-images", type=int, help="held-out images, all their questions (0 = none)")

    @classmethod
    def check(cls, s: FidSettings) -> None:
        s.check_data()
        if s.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {s.preset!r}")
        for name in ("grid", "num_captions", "num_patches", "max_rounds"):
            if getattr(s, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
        if s.num_patches > s.grid * s.grid:
            raise ValueError(f"--num-patches {s.num_patches} exceeds the {s.grid}x{s.grid} patch grid")
        if not 0.0 <= s.uniform_fraction <= 1.0:
            raise ValueError(f"--uniform-fraction must be in [0, 1], got {s.uniform_fraction}")
        if not 0.0 < s.spread_min <= s.spread_max:
            raise ValueError(f"need 0 < --spread-min <= --spread-max, got {s.spread_min} and {s.spread_max}")
        if not 0.0 < s.min_overlap <= 1.0:
            raise ValueError(f"--min-overlap must be in (0, 1], got {s.min_overlap}")

    @classmethod
    def run_identity(cls, s: FidSettings) -> dict[str, Any]:
        return {**super().run_identity(s), "init_weights": initial_fingerprint(s.preset, s.init)}

    def __init__(self, s: FidSettings, device, resuming: bool) -> None:
        super().__init__(s, device, resuming)
        self.model, self.tokenizer = initial_model(s.preset, s.init)
        self.model.to(device).train()
        self.recipe = s.recipe
        self.params = s.shapes_params()
        self.data = QAData(self.params, s.grid)
        self.eval_items = self.eval_params = None
        if s.eval_images:
            self.eval_params = s.shapes_params(held_out=True)
            self.eval_items = eval_items(QAData(self.eval_params, s.grid), s.held_out_seed, self.recipe)
        self.config = self.model.config.to_dict()
        self.config.pop("transformers_version", None)

    def trainable(self) -> list[dict[str, Any]]:
        from training.common import weight_decay_groups

        return weight_decay_groups(self.model, self.s.weight_decay)

    def modules(self) -> dict[str, Any]:
        return {"model": self.model.t5}

    def step(self, step: int, rng: np.random.Generator) -> Step:
        import torch.nn.functional as F

        from models.fid_t5 import tokenize_passages

        data, tokenizer, device = self.data, self.tokenizer, self.device
        chosen = [data.samples[int(i)] for i in rng.integers(0, len(data), size=self.s.batch_size)]
        passages = [sample_passages(data, x, rng, self.recipe) for x in chosen]
        ids, mask = tokenize_passages(tokenizer, passages, MAX_PASSAGE_TOKENS)
        decoder_input_ids, labels = answer_batch(tokenizer, [x.target for x in chosen],
                                                 self.model.config.decoder_start_token_id)
        logits = self.model(ids.to(device), mask.to(device), decoder_input_ids.to(device)).logits.float()
        labels = labels.to(device)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        right = (logits.detach().argmax(-1) == labels) | (labels == -100)
        return Step(loss, {"loss": loss, "accuracy": right.all(dim=1).float().mean()})

    def evaluate(self, step: int) -> dict[str, Any] | None:
        if self.eval_items is None:
            return None
        return evaluate(self.model, self.tokenizer, self.eval_items, self.device, step)

    @classmethod
    def describe(cls, result) -> str:
        per = ", ".join(f"{k} {_fmt(v['exact_match'])}" for k, v in result["per_type"].items())
        return f"exact match {_fmt(result['exact_match'])}, VQA accuracy {_fmt(result['vqa_accuracy'])} ({per})"

    def save_weights(self, path: Path, step: int) -> None:
        from models.fid_t5 import WEIGHTS_FORMAT

        save_weights(self.model, path, {"format": WEIGHTS_FORMAT, "preset": self.s.preset, "step": str(step),
                                        "config": json.dumps(self.config, sort_keys=True)})

    def plot_title(self) -> str:
        return f"FiD T5 {self.s.preset}: {len(self.data)} shapes questions, {self.s.num_captions} captions"

    def meta(self) -> dict[str, Any]:
        s, data = self.s, self.data
        type_counts = Counter(x.question_type for x in data.samples)
        return {
            "seeds": {"train": s.seed, "source": self.params.seed, "eval": s.held_out_seed,
                      "batches": f"numpy default_rng([{s.seed}, step])",
                      "eval_captions": f"numpy default_rng({s.held_out_seed})", "torch": s.seed},
            "model": {"preset": s.preset, "init": s.init, "init_fingerprint": initial_fingerprint(s.preset, s.init),
                      "config": self.config, "parameters": sum(p.numel() for p in self.model.parameters())},
            "captions": {**asdict(self.recipe), "grid": s.grid, "num_captions_fid": 1,
                         "form": "caption stage output, prompt stripped: 'a red circle and a blue square'"},
            "source": {"name": "shapes", "params": self.params.model_dump(mode="json"), "images": len(data.scenes),
                       "questions": len(data), "question_types": dict(sorted(type_counts.items()))},
            "eval_source": None if self.eval_params is None else {
                "name": "shapes", "params": self.eval_params.model_dump(mode="json"),
                "questions": len(self.eval_items)},
        }

    def summary(self, log) -> dict[str, Any]:
        return {**super().summary(log), "answer_accuracy_last": mean_or_none(log["accuracy"][-10:])}


main = FidTrainer.main

if __name__ == "__main__":
    raise SystemExit(main())
