"""``runtime train qavit``: train a QA-ViT (vision tower, instruction modules and question encoder,
all from scratch) on the synthetic ``shapes`` data, so that the heatmap the ``qavit_attention``
stage reads is question-aware.

Model: the preset's QA-ViT (``shapes`` or ``tiny``) from its seeded random initialisation, the
instruction modules initialised as QA-ViT does (``instruction_out_proj`` = ``out_proj``) with the
``--formulation`` (default ``gated``: the plain ViT at gate 0, the question enters through the
gated residual only, and the CLS-to-patch map the stage reports is exactly the attention whose
values make the layer's output; with ``reference`` it is a renormalised view of a joint softmax
that also covers the instruction keys), the gates at ``--initial-gate`` (default 0.5, tanh = 0.46:
from scratch there is no pretrained ViT whose output the identity init would preserve, and at gate
0 the instruction projectors get no gradient until the gates move; 0 = QA-ViT's init), the
built-in T5 question encoder (seeded random init), and an answer head (a linear layer on the last layer's CLS after
``post_layernorm``) over the shapes answers (:data:`ANSWERS`: colours, shapes, counts 0-4,
yes / no). Every parameter is trained.

Objective, per step of ``--batch-size`` questions (``batch / --questions-per-image`` images,
each with its questions):

- answer (weight ``--answer-weight``): cross-entropy of the answer head. It makes the CLS
  token, whose attention is the heatmap, depend on the question and learn the scene;
- grounding (weight ``--grounding-weight``): ``-log`` of the CLS-to-patch attention mass (head
  mean, layer ``block_num`` -1, the stage's defaults ``mode: layer, block_num: -1``) on the
  patches the question's referred objects overlap (the question's ``gt_mask`` pooled to the
  model grid, cells > 0), for the questions that refer to objects ("is there a blue square?"
  with answer no and "how many circles?" with answer 0 refer to none). This supervises the
  heatmap itself: the heatmap quality of a model trained with it (pointing game, energy in
  mask on shapes) is supervised, not emergent, as large-scale pre-training would make it for
  real images. ``--grounding-weight 0`` trains on answers alone.

- patch labels (weight ``--patch-label-weight``, default 0 = off): the ITM's training-only probe
  (:mod:`shapes.patch_labels`) on the last layer's patch tokens, colour and shape of the object
  at each patch, object patches weighted ``--patch-object-weight`` times a background patch. The
  answer head reads a CLS that must know the objects' shapes; this tells the ViT directly.

AdamW (no weight decay on biases, norms, gates), linear warmup over ``--warmup`` steps then a
constant learning rate (``--lr-decay cosine``: a cosine decay to 0 at ``--steps``), gradient
clipping. ``--init FILE`` starts from a previous ``qavit.safetensors`` (model and answer head)
instead of the seeded random initialisation.

Data: the ``shapes`` source with seed ``--seed``, ``--num-images`` images and
``--questions-per-image`` questions per image (``--source-param`` sets its other parameters).
Image ``i`` and its questions are rendered on demand exactly as the source yields them
(:func:`render_image`), so a large ``--num-images`` costs nothing up front. Step ``k`` draws its
images from ``numpy.random.default_rng([seed, k])`` alone; pixels are preprocessed per image as
``preprocess_image`` family ``clip`` does at the preset's size. The model has no dropout
(``shapes``; the tiny T5 encoder's dropout draws from the torch RNG, which the checkpoint
saves), so the same command gives the same weights, and ``--resume`` (model, optimiser, step and
torch RNG state from ``DIR/checkpoint.pt``) ends with the same weights as an uninterrupted run
(same device and threads). Evaluation does not touch the training state.

Held-out evaluation (at the start, the end and every ``--eval-every`` steps; ``--eval-images``
images of seed ``--eval-seed``, every question): :mod:`training.qavit_eval`.

Outputs in ``--out DIR``: ``qavit.safetensors`` (vision tower in the published layout,
``question_encoder.*``, ``answer_head.*``; metadata: preset, formulation, answers; loadable by
``load_qavit(preset, path)`` and by the stage as ``checkpoint``; bundled as the ``shapes`` preset
by ``runtime train bundle``), ``checkpoint.pt`` (resumable, atomic, ``weights_only``),
``loss.csv``, ``loss.png``, ``config.json``, ``metrics.json``. The run itself (options, seeding,
``--resume``, the learning-rate schedule, checkpoint and evaluation cadence, records) is
:mod:`training.loop`'s; this module holds the model, the loss and the weights file,
:mod:`training.qavit_data` the data and :mod:`training.qavit_eval` the evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from models.qavit.checkpoint import QAVIT
from shapes.patch_labels import PatchLabels, build_probe, patch_label_loss
from training.common import add_model_options, add_patch_label_options, check_patch_label_options
from training.data import ShapesSettings
from training.loop import Options, Step, Trainer
from training.qavit_data import ANSWERS, draw_step, eval_set, make_batch, render_image, shapes_params

DEFAULT_STEPS = 3000
WEIGHTS_FORMAT = "pnpvqa-qavit"
TRAIN_PRESETS = QAVIT.built_in
OUTPUT_GRID = 24        # the captioner's grid (graphs/qavit.yaml's output_grid)
EVAL_IMAGES_PER_BATCH = 16
INIT_VERSION = 1        # bump when the initialisation of a training changes


# --- settings -----------------------------------------------------------------------------------

@dataclass
class QAViTSettings(ShapesSettings):
    """The loop's settings (their qavit defaults; ``--checkpoint-every`` the loop's 50) and qavit's own."""

    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    weight_decay: float = 0.05
    warmup: int = 100
    preset: str = "shapes"
    init: str | None = None
    integration_point: str = "late"
    formulation: str = "gated"
    initial_gate: float = 0.5
    max_question_tokens: int = 30
    num_images: int = 100_000
    questions_per_image: int = 4
    answer_weight: float = 1.0
    grounding_weight: float = 1.0
    patch_label_weight: float = 0.0
    patch_object_weight: float = 1.0
    eval_images: int = 64
    own_options: ClassVar[tuple[str, ...]] = ("seed", "num_images", "questions_per_image")


# --- the model ----------------------------------------------------------------------------------

def build_trainee(preset: str, integration_point: str, formulation: str, seed: int, device,
                  initial_gate: float = 0.5):
    """The model a training starts from: the preset's seeded random QA-ViT (instruction modules
    at identity, then the gates set to ``initial_gate``) and question encoder, and an answer head
    drawn from ``seed``; with its tokenizer."""
    from models.qavit.checkpoint import build_vision, load_question_encoder
    from models.qavit.model import QAViT

    encoder, tokenizer, _ = load_question_encoder(preset, None, device)
    config = QAVIT.config(preset, integration_point=integration_point)
    if config.text_dim != encoder.config.d_model:
        raise ValueError(f"preset {preset!r}: text_dim {config.text_dim} != question encoder width "
                         f"{encoder.config.d_model}")
    vision = build_vision(config, device, formulation=formulation)  # gates 0: identity instructions
    vision.set_gates(initial_gate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainee = QAViTTrainee(QAViT(vision, encoder), len(ANSWERS))
    return trainee.to(device), tokenizer


class QAViTTrainee(nn.Module):
    """A QA-ViT and an answer head (``Linear`` on ``post_layernorm`` of the last layer's CLS)."""

    def __init__(self, qavit, num_answers: int):
        super().__init__()
        self.qavit = qavit
        self.answer_head = nn.Linear(qavit.config.width, num_answers)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_rows: torch.Tensor | None = None, block: int = -1, patch_probe: nn.Module | None = None):
        """``(answer logits [B, A], CLS-to-patch attention [B, P] of layer block, head mean)``, and
        with ``patch_probe`` its logits on the last layer's patch tokens ``[B, P, classes]``."""
        states, mask = self.qavit.encode_question(input_ids, attention_mask)
        out = self.qavit(pixels, states, mask, output_attentions=[block], mean_heads=True, image_rows=image_rows)
        cls = self.qavit.vision.vision_model.post_layernorm(out.last_hidden_state[:, 0])
        result = (self.answer_head(cls), out.attentions[block][:, 0, 1:])
        if patch_probe is None:
            return result
        return (*result, patch_probe(out.last_hidden_state[:, 1:]))

    def load_file(self, preset: str, path: str | Path) -> None:
        """Load a ``qavit.safetensors`` of :func:`weights_tensors` (the vision tower in the
        published layout, ``question_encoder.*``, ``answer_head.*``) of ``preset`` into this model."""
        from safetensors.torch import load_file

        from models.qavit.checkpoint import load_qavit

        qavit, _, _ = load_qavit(preset, path, integration_point=self.qavit.config.integration_point,
                                 device=next(self.parameters()).device)
        self.qavit.load_state_dict(qavit.state_dict())
        state = load_file(str(path))
        self.answer_head.load_state_dict({"weight": state["answer_head.weight"], "bias": state["answer_head.bias"]})


def grounding_loss(heat, cells):
    """``-log`` of the CLS-to-patch attention mass ``heat [N, P]`` on the cells ``cells [N, P]`` > 0."""
    mass = (heat * (cells > 0).to(heat.dtype)).sum(dim=1)
    return -torch.log(mass.clamp(min=1e-6)).mean()


def weights_tensors(trainee) -> dict[str, Any]:
    """The tensors of ``qavit.safetensors``: the vision tower (published layout), the question
    encoder (``question_encoder.*``, without T5's tied copy of the embedding) and the answer head."""
    from models.qavit.checkpoint import QUESTION_ENCODER_PREFIX, TIED_EMBEDDING

    tensors = {k: v for k, v in trainee.qavit.vision.state_dict().items()}
    tensors.update({QUESTION_ENCODER_PREFIX + k: v for k, v in trainee.qavit.question_encoder.state_dict().items()
                    if k != TIED_EMBEDDING})
    tensors.update({"answer_head." + k: v for k, v in trainee.answer_head.state_dict().items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def weights_metadata(preset: str, trainee, formulation: str, step: int, max_question_tokens: int) -> dict[str, str]:
    """The metadata of ``qavit.safetensors`` (strings): what the loader and ``check_metrics`` read."""
    return {"format": WEIGHTS_FORMAT, "preset": preset, "step": str(step), "formulation": formulation,
            "integration_point": trainee.qavit.config.integration_point,
            "config": json.dumps(trainee.qavit.config.to_dict(), sort_keys=True),
            "question_encoder": json.dumps(trainee.qavit.question_encoder.config.to_diff_dict(), sort_keys=True,
                                           default=str),
            "answers": json.dumps(list(ANSWERS)), "max_question_tokens": str(max_question_tokens)}


# --- the trainer --------------------------------------------------------------------------------

class QAViTTrainer(Trainer):
    command = "qavit"
    description = ("Train a QA-ViT (vision tower, instruction modules, question encoder; from scratch) on the "
                   "shapes data: answer cross-entropy on the CLS token + a grounding loss that puts the CLS-to-patch "
                   "attention of the last layer (the qavit_attention stage's heatmap) on the referred objects. "
                   "Writes DIR/qavit.safetensors (loadable by load_qavit and the stage's checkpoint), "
                   "DIR/checkpoint.pt, DIR/loss.csv, DIR/loss.png, DIR/config.json, DIR/metrics.json.")
    settings = QAViTSettings
    checkpoint_format, checkpoint_version, checkpoint_kind = "pnpvqa-qavit-training", 1, "a QA-ViT"
    weights_file = "qavit.safetensors"
    log_columns = ("loss", "answer_loss", "grounding_loss", "accuracy", "attention_in_mask", "lr")
    summary_columns = ("loss", "answer_loss", "grounding_loss", "accuracy", "attention_in_mask")
    summary_window = 50
    progress_columns = ("accuracy",)
    plot_curves = (("loss", "tab:blue"), ("answer_loss", "tab:orange"), ("grounding_loss", "tab:red"))
    # options added after runs were made (the loop adds lr_decay); --init is also compared by its fingerprint
    later_options = {"init": None, "patch_label_weight": 0.0, "patch_object_weight": 1.0}
    data_title = "data (the shapes source)"
    batch_help = "questions per step"

    @classmethod
    def add_options(cls, o: Options) -> None:
        add_model_options(o, TRAIN_PRESETS, architecture="QA-ViT (seeded random init)", weights_folder=False,
                          init_help="start from this qavit.safetensors (a previous run's) instead of the seeded "
                          "random initialisation")
        o.add(o.model, "--integration-point", choices=["all", "early", "late", "late2", "late3", "sparse"],
              help="layers that read the question")
        o.add(o.model, "--formulation", choices=["gated", "reference"],
              help="instruction attention (gated: the plain ViT at gate 0)")
        o.add(o.model, "--initial-gate", type=float, metavar="G", help="initial instruction_proj_gate of every "
              "instruction layer (0 = QA-ViT's identity init: the instruction projectors get no gradient until the "
              "gates move)")
        o.add(o.model, "--max-question-tokens", type=int, help="question tokens kept (as the stage)")
        QAViTSettings.add_options(o, images="images of the training source (rendered on demand)")
        o.add(o.data, "--questions-per-image", type=int, metavar="Q",
              help="questions per image (the source's questions_per_image; a step has batch / Q images)")
        t = o.optimisation
        o.add(t, "--answer-weight", type=float, help="weight of the answer cross-entropy")
        o.add(t, "--grounding-weight", type=float, help="weight of the grounding loss on the last layer's "
              "CLS-to-patch attention (0 = off: heatmap quality then emergent)")
        add_patch_label_options(o, "the last layer's patch tokens")
        o.add(o.evaluation, "--eval-images", type=int, help="images of the held-out set (0 = no evaluation)")

    @classmethod
    def check(cls, s: QAViTSettings) -> None:
        s.check_data()
        check_patch_label_options(s)
        if s.preset not in TRAIN_PRESETS:
            raise ValueError(f"--preset {s.preset!r}: runtime train qavit trains {' or '.join(TRAIN_PRESETS)}")
        if s.questions_per_image < 1:
            raise ValueError(f"--questions-per-image must be >= 1, got {s.questions_per_image}")
        if s.max_question_tokens < 2:
            raise ValueError(f"--max-question-tokens must be >= 2, got {s.max_question_tokens}")
        if min(s.answer_weight, s.grounding_weight) < 0:
            raise ValueError("--answer-weight and --grounding-weight must be >= 0")
        if s.init is not None and not Path(s.init).is_file():
            raise ValueError(f"--init {s.init}: no such file (a qavit.safetensors written by runtime train qavit)")
        if s.answer_weight == 0 and s.grounding_weight == 0:
            raise ValueError("--answer-weight and --grounding-weight are both 0: nothing to train")
        shapes_params(s.seed, s.num_images, s.questions_per_image, s.source_params)  # validates them

    @classmethod
    def run_identity(cls, s: QAViTSettings) -> dict[str, Any]:
        from models.weights import file_fingerprint

        identity = {**super().run_identity(s), "init_version": INIT_VERSION}
        if s.init is not None:
            identity["init_weights"] = file_fingerprint(Path(s.init))
        return identity

    def __init__(self, s: QAViTSettings, device, resuming: bool) -> None:
        super().__init__(s, device, resuming)
        self.params = shapes_params(s.seed, s.num_images, s.questions_per_image, s.source_params)
        self.trainee, self.tokenizer = build_trainee(s.preset, s.integration_point, s.formulation, s.seed, device,
                                                     s.initial_gate)
        self.trainee.train()
        self.config = self.trainee.qavit.config
        if s.init is not None and not resuming:
            self.trainee.load_file(s.preset, s.init)
        self.held_out = eval_set(s.held_out_seed, s.eval_images, s.questions_per_image, s.source_params) \
            if s.eval_images else None
        self.images_per_step = max(1, s.batch_size // s.questions_per_image)
        self.probe = None

    def trainable(self) -> list[dict[str, Any]]:
        from training.common import weight_decay_groups

        groups = weight_decay_groups(self.trainee, self.s.weight_decay)
        if self.s.patch_label_weight > 0:  # drawn from the seeded torch RNG
            self.probe = build_probe(self.config.width).to(self.device)
            groups.append({"params": list(self.probe.parameters()), "weight_decay": 0.0})
        return groups

    def modules(self) -> dict[str, Any]:
        return {"model": self.trainee} if self.probe is None else {"model": self.trainee, "probe": self.probe}

    def step(self, step: int, rng: np.random.Generator) -> Step:
        import torch.nn.functional as F

        s, device, probe = self.s, self.device, self.probe
        grid, size = self.config.grid, self.config.image_size
        indices = draw_step(self.params, rng, self.images_per_step)
        batch = make_batch([render_image(self.params, i) for i in indices], size, grid)
        enc = self.tokenizer(batch.questions, padding="longest", truncation=True, max_length=s.max_question_tokens,
                             return_tensors="pt")
        answers = torch.from_numpy(batch.answers).to(device)
        image_rows = torch.from_numpy(batch.image_rows).to(device)
        logits, heat, *patch_logits = self.trainee(torch.from_numpy(batch.pixels).to(device),
                                                   enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                                   image_rows, patch_probe=probe)
        loss_answer = F.cross_entropy(logits.float(), answers)
        grounded = torch.from_numpy(np.flatnonzero(batch.grounded)).to(device)
        loss_ground = torch.zeros((), device=device)
        in_mask = float("nan")
        if len(grounded):
            cells = torch.from_numpy(batch.cells).to(device)[grounded]
            loss_ground = grounding_loss(heat[grounded].float(), cells)
            in_mask = float((heat[grounded].detach() * (cells > 0)).sum(dim=1).mean())
        loss = s.answer_weight * loss_answer + s.grounding_weight * loss_ground
        if probe is not None:  # labels of each row's image
            colour, shape = PatchLabels(batch.scenes, grid)(range(len(batch.scenes)), device)
            loss = loss + s.patch_label_weight * patch_label_loss(
                patch_logits[0].flatten(0, 1).float(), colour[image_rows].flatten(), shape[image_rows].flatten(),
                s.patch_object_weight)
        return Step(loss, {"loss": loss, "answer_loss": loss_answer.detach(), "grounding_loss": loss_ground.detach(),
                           "accuracy": float((logits.argmax(dim=1) == answers).float().mean()),
                           "attention_in_mask": in_mask})

    def evaluate(self, step: int) -> dict[str, Any] | None:
        from training.qavit_eval import evaluate

        if self.held_out is None:
            return None
        return evaluate(self.trainee.qavit, self.tokenizer, self.s.preset, self.held_out, self.device, step,
                        answer_head=self.trainee.answer_head, max_question_tokens=self.s.max_question_tokens)

    @classmethod
    def describe(cls, r) -> str | None:
        if r.get("pointing_game") is None:
            return None

        def num(key: str) -> str:
            return "n/a" if r.get(key) is None else f"{r[key]:.3f}"

        return (f"pointing game {num('pointing_game')} (chance {num('pointing_chance')}), energy in mask "
                f"{num('energy_in_mask')}, answer accuracy {num('answer_accuracy')}")

    def save_weights(self, path: Path, step: int) -> None:
        from models.weights import save_safetensors

        s = self.s
        save_safetensors(weights_tensors(self.trainee), path,
                                weights_metadata(s.preset, self.trainee, s.formulation, step, s.max_question_tokens))

    def plot_title(self) -> str:
        s = self.s
        return (f"QA-ViT {s.preset}: {s.answer_weight:g} x answer + {s.grounding_weight:g} x grounding, "
                f"batch {s.batch_size}")

    def meta(self) -> dict[str, Any]:
        s, config, trainee, held_out = self.s, self.config, self.trainee, self.held_out
        return {
            "seeds": {"train": s.seed, "source": s.seed, "eval": s.held_out_seed,
                      "images": f"numpy default_rng([{s.seed}, step])", "torch": s.seed,
                      "initialisation": "models.qavit.checkpoint.TINY_SEED (ViT, question encoder); "
                                        f"{s.seed} (answer head)"},
            "model": {"preset": s.preset, "formulation": s.formulation, "integration_point": config.integration_point,
                      "initial_gate": s.initial_gate,
                      "config": config.to_dict(),
                      "question_encoder": trainee.qavit.question_encoder.config.to_diff_dict(),
                      "answers": list(ANSWERS),
                      "parameters": sum(p.numel() for p in trainee.parameters()),
                      "parameters_by_part": {
                          "vision": sum(p.numel() for p in trainee.qavit.vision.parameters()),
                          "question_encoder": sum(p.numel() for p in trainee.qavit.question_encoder.parameters()),
                          "answer_head": sum(p.numel() for p in trainee.answer_head.parameters())}},
            "source": {"name": "shapes", "params": self.params.model_dump(mode="json"),
                       "images_per_step": self.images_per_step,
                       "rendering": "image i and its questions rendered on demand as ShapesSource yields them"},
            "eval_source": None if held_out is None else {
                "name": "shapes", "params": held_out.params.model_dump(mode="json"),
                "questions": sum(len(r.questions) for r in held_out.rendered)},
            "objective": {"answer": f"{s.answer_weight:g} x cross-entropy of the answer head on the CLS token",
                          "grounding": f"{s.grounding_weight:g} x -log CLS-to-patch attention mass (head mean, last "
                                       "layer) on the referred objects' cells: heatmap quality is supervised"},
        }


main = QAViTTrainer.main

if __name__ == "__main__":
    raise SystemExit(main())
