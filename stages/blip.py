"""BLIP stages of PNP-VQA: question-guided GradCAM from the ITM model, and captions of
heatmap-sampled patches from the captioner.

Both take the preprocessed image once per image (``per_image`` input) and encode it once,
however many questions of the batch share it.

Torch and the model code are imported inside the methods: graphs without model stages (and
their Ray workers) never pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from artifacts.columns import tensor_type
from models.blip.family import BLIP, BLIP_CAPTION, BLIP_ITM
from stages.base import STAGES, Batch, Granularity, Input, Output, Resources, StageParams
from stages.common import row_rng
from stages.dtypes import DTYPE_DOC, DType, torch_dtype
from grids import sample_patch_sets
from stages.model_stage import ModelStage
from stages.text import blip_question

if TYPE_CHECKING:
    import torch

Preset = BLIP_ITM.preset_type()  # the captioner's presets are the same


def _image_inputs(config) -> dict[str, Input]:
    """The image as pixels (encoded by the stage's own ViT) or as ready ViT tokens (from
    ``blip_features`` or ``feature_fusion``); exactly one is wired."""
    s, g, c = config.vit.image_size, config.vit.grid, config.vit.width
    return {
        "pixels": Input(tensor_type("float32", [3, s, s]), f"preprocessed image [3, {s}, {s}] "
                        "(preprocess_image, family blip); or wire features", optional=True, per_image=True),
        "features": Input(tensor_type("float32", [1 + g * g, c]), f"image tokens [{1 + g * g}, {c}] of this "
                          "model's ViT, e.g. fused by feature_fusion; or wire pixels", optional=True, per_image=True),
    }


def _one_image_input(wired: set[str]) -> list[tuple[str, str]]:
    if ("pixels" in wired) == ("features" in wired):
        return [("inputs", "wire exactly one of 'pixels' (the stage encodes the image) and 'features' "
                 "(ready image tokens, e.g. from feature_fusion)")]
    return []


def _image_tokens(model, batch: Batch, device: str, dtype: str = "float32"):
    """``[I, 1+P, C]`` image tokens of the batch's distinct images in ``dtype`` (the wired
    features, or the pixels encoded once per image) and ``[N]`` each row's image."""
    import torch

    if "features" in batch.columns:
        images = torch.from_numpy(batch["features"]).to(device, torch_dtype(dtype))
    else:
        with torch.no_grad():
            images = model.encode_image(torch.from_numpy(batch["pixels"]).to(device, torch_dtype(dtype)))
    return images, torch.from_numpy(batch.image_rows).to(device)


# --- itm_gradcam ----------------------------------------------------------------------------

class ItmGradcamParams(StageParams):
    preset: Preset = Field("tiny", description=BLIP_ITM.preset_doc("BLIP ITM model (retrieval checkpoints)"))
    checkpoint: str | None = Field(None, description="explicit checkpoint instead of the preset's standard file: a "
                                   "LAVIS .pth / .safetensors file, a Hugging Face BLIP folder (BlipForImageTextRetrieval: "
                                   "config.json + weights; its sizes replace the preset's), or hf:ORG/NAME from the local "
                                   "Hugging Face cache (e.g. hf:Salesforce/blip-itm-large-coco)")
    block_num: int | None = Field(None, ge=0, description="text layer whose cross-attention gives the GradCAM; "
                                  "None = the preset's (LAVIS PNP-VQA and tiny: 7, shapes: 2); must be below the "
                                  "last layer")
    max_length: int = Field(35, ge=3, le=512, description="question tokens kept (LAVIS max_txt_len)")
    dtype: DType = Field("float32", description=DTYPE_DOC + "; the ViT runs in it, the text encoder and GradCAM's "
                         "backward stay in float32 (the gradient of a bfloat16 softmax loses the heatmap's detail)")


@STAGES.add
class ItmGradcam(ModelStage):
    """Question-guided GradCAM heatmap and image-question match score from BLIP ITM.

    The LAVIS PNP-VQA recipe: cross-attention probabilities of text layer ``block_num`` times
    their clamped gradient w.r.t. the ITM match logit, averaged over heads and over the
    question tokens (the question lowercased, ``.!"()*#:;~`` and trailing '?' removed, first
    token replaced by [ENC]). Grid and head count come from the model.
    """

    name = "itm_gradcam"
    Params = ItmGradcamParams
    family = BLIP_ITM
    resources = Resources(gpu=0.5, batch_size=32)  # CPU: as fast as 64, 1.5x 16 (bench/results/bench.md)

    def inputs(self) -> dict[str, Input]:
        return {**_image_inputs(self.model_config()), "question": Input(pa.string(), "question text")}

    def wiring_problems(self, wired: set[str]) -> list[tuple[str, str]]:
        return _one_image_input(wired)

    def outputs(self) -> dict[str, Output]:
        g = self.model_config().vit.grid
        return {"heatmap": Output(tensor_type("float32", [g, g]), f"GradCAM heatmap [{g}, {g}] (not normalised)",
                                   role="heatmap"),
                "itm_score": Output(pa.float32(), "probability that the question matches the image",
                                     role="match_score")}

    @property
    def block_num(self) -> int:
        """The GradCAM text layer: the param, else the preset's."""
        p = self.params
        return self.model_config().gradcam_block if p.block_num is None else p.block_num

    def extra_problems(self) -> list[tuple[str, str]]:
        p, layers = self.params, self.model_config().bert.num_layers
        out = []
        if self.block_num > layers - 2:
            out.append(("block_num", f"block_num={self.block_num} but the '{p.preset}' text encoder has "
                        f"{layers} layers: use 0..{layers - 2} (the last layer's GradCAM is exactly zero, only its "
                        "first token reaches the ITM head)"))
        return out + BLIP_ITM.tokenizer_problems(p.preset, p.checkpoint)

    def setup(self, device: str) -> None:
        from models.blip.tokenizer import load_blip_tokenizer

        super().setup(device)
        self.model.visual_encoder.to(torch_dtype(self.params.dtype))
        self.tokenizer = load_blip_tokenizer(BLIP_ITM.tokenizer_dir(self.params.preset, self.params.checkpoint))

    def process(self, batch: Batch) -> dict[str, Any]:
        from models.blip.tokenizer import tokenize_questions

        questions = [blip_question(q) for q in batch["question"]]
        ids, mask = tokenize_questions(self.tokenizer, questions, self.params.max_length)
        device = self.device
        # only the ViT runs in dtype: wired features go to the float32 text encoder unchanged
        vit_dtype = self.params.dtype if "pixels" in batch.columns else "float32"
        images, image_rows = _image_tokens(self.model, batch, device, vit_dtype)
        embeds = images[image_rows].float()
        heatmap, score = self.model.gradcam(embeds, ids.to(device), mask.to(device), self.block_num)
        return {"heatmap": heatmap.detach().float().cpu().numpy(),
                "itm_score": score.detach().float().cpu().numpy()}


# --- caption --------------------------------------------------------------------------------

class CaptionParams(StageParams):
    preset: Preset = Field("tiny", description=BLIP_CAPTION.preset_doc("BLIP captioner (caption checkpoints)"))
    checkpoint: str | None = Field(None, description="explicit checkpoint instead of the preset's standard file: a "
                                   "LAVIS .pth / .safetensors file, a Hugging Face BLIP folder (BlipForConditionalGeneration: "
                                   "config.json + weights; its sizes replace the preset's), or hf:ORG/NAME from the local "
                                   "Hugging Face cache (e.g. hf:Salesforce/blip-image-captioning-large)")
    num_captions: int = Field(5, ge=1, le=1000, description="distinct captions per question (LAVIS VQAv2: 100)")
    num_patches: int = Field(20, ge=1, description="patches sampled per caption, proportional to the heatmap")
    prompt: str = Field("a picture of ", description="decoder prompt, stripped from the captions")
    text: Literal["reference", "tokens"] = Field(
        "reference", description="how the prompt leaves the caption: reference = LAVIS's decoded_text[len(prompt):] "
        "(a first word-piece glued to the prompt's last word goes with it); tokens = decode only the new tokens, "
        "leading word-pieces (##...) dropped. Neither shows ## pieces")
    decoding: Literal["sample", "beam"] = Field(
        "sample", description="sample: top-k / top-p sampling (PNP-VQA); beam: beam search (LAVIS captioning), "
        "deterministic")
    num_beams: int = Field(3, ge=1, le=64, description="beams of decoding=beam (LAVIS: 3)")
    length_penalty: float = Field(1.0, description="beam search: hypotheses are scored sum(log p) / length ** "
                                  "length_penalty (Hugging Face's default 1.0)")
    length_rule: Literal["lavis", "generated"] = Field(
        "lavis", description="beam search's length and stop rule: lavis = transformers 4.25/4.26, which LAVIS "
        "runs on (a finished caption's length counts the prompt, not the eos; a sentence stops when the best of "
        "all candidates, scored as ending there, cannot beat its worst kept caption); generated = current "
        "transformers (only new tokens, eos included; the best running beam is the bound)")
    max_length: int = Field(20, ge=2, le=512, description="most tokens, prompt included ([DEC] a picture of = 4)")
    min_length: int = Field(10, ge=0, description="fewest tokens before [SEP] may end a caption, prompt included")
    top_k: int = Field(50, ge=0, description="top-k sampling (0 = off)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    repetition_penalty: float = Field(1.0, ge=1.0, description="1 = none")
    max_rounds: int = Field(10, ge=1, le=1000, description="sampling rounds before giving up on distinct "
                            "captions; a shortfall is recorded (the reference loops without bound)")
    generation_batch: int = Field(256, ge=1, description="caption sequences decoded at once (memory bound)")
    seed: int = Field(0, ge=0, description="seed; draws depend only on it, the sample id and the round")
    dtype: DType = Field("float32", description=DTYPE_DOC + "; token choice reads float32 scores")


@STAGES.add
class Caption(ModelStage):
    """Question-guided captions: BLIP decodes from heatmap-sampled patches of the image.

    Each round draws ``num_captions`` patch sets per question (without replacement, proportional
    to the heatmap, sorted; CLS never drawn), decodes one caption from each (top-k sampling, or
    beam search), and keeps captions that are not a substring of one already kept, until
    ``num_captions`` are kept or ``max_rounds`` are spent (the shortfall is recorded). Without a
    heatmap wired, captions decode from the whole image (every token, CLS included), as LAVIS's
    plain captioning does. The caption text is LAVIS's by default (``text``).
    """

    name = "caption"
    Params = CaptionParams
    family = BLIP_CAPTION
    # CPU: 64 measured fastest (bench/results/bench.md: 1.8x batch 16 on 2 cores, fewer Python
    # steps per caption); GPU: not measured yet, the earlier 16 kept
    resources = Resources(gpu=0.5, batch_size=64, cuda_batch_size=16)

    def inputs(self) -> dict[str, Input]:
        g = self.model_config().vit.grid
        return {**_image_inputs(self.model_config()),
                "heatmap": Input(tensor_type("float32", [g, g]), f"question-guided heatmap [{g}, {g}]; leave it "
                                 "unwired to caption the whole image", optional=True)}

    def wiring_problems(self, wired: set[str]) -> list[tuple[str, str]]:
        out = _one_image_input(wired)
        if "heatmap" not in wired and self.params.decoding == "beam" and self.params.num_captions > 1:
            out.append(("params.num_captions", "beam search on the whole image (no heatmap wired) gives one "
                        "caption: set num_captions to 1, or wire a heatmap, or use decoding: sample"))
        return out

    def outputs(self) -> dict[str, Output]:
        return {"captions": Output(pa.list_(pa.string()), "distinct captions, at most num_captions", role="captions"),
                "shortfall": Output(pa.int32(), "num_captions minus the captions kept (0 = complete)"),
                "rounds": Output(pa.int32(), "sampling rounds used")}

    def extra_problems(self) -> list[tuple[str, str]]:
        p, cells = self.params, self.model_config().vit.grid ** 2
        out = []
        if p.num_patches > cells:
            out.append(("num_patches", f"num_patches={p.num_patches} exceeds the {cells} patches of the "
                        f"'{p.preset}' image grid"))
        if p.min_length > p.max_length:
            out.append(("min_length", f"min_length={p.min_length} exceeds max_length={p.max_length}"))
        return out + BLIP_CAPTION.tokenizer_problems(p.preset, p.checkpoint)

    def setup(self, device: str) -> None:
        from models.blip.tokenizer import caption_prompt_ids, load_blip_tokenizer

        super().setup(device)
        self.model.to(torch_dtype(self.params.dtype))
        self.tokenizer = load_blip_tokenizer(BLIP_CAPTION.tokenizer_dir(self.params.preset, self.params.checkpoint))
        self.prompt_ids = caption_prompt_ids(self.tokenizer, self.params.prompt)  # [DEC] a picture of

    def process(self, batch: Batch) -> dict[str, Any]:
        import torch

        p, device = self.params, self.device
        n = len(batch)
        images, image_rows = _image_tokens(self.model, batch, device, p.dtype)  # [I, 1+P, C], [N]
        whole_image = "heatmap" not in batch.columns
        heat = None if whole_image else batch["heatmap"].reshape(n, -1)
        new_tokens = p.max_length - len(self.prompt_ids)
        captions: list[list[str]] = [[] for _ in range(n)]
        rounds = np.zeros(n, dtype=np.int32)
        for r in range(p.max_rounds):
            active = [i for i in range(n) if len(captions[i]) < p.num_captions]
            if not active:
                break
            rngs = [row_rng(p.seed, f"{batch.row_ids[i]}#{r}") for i in active]
            if whole_image:  # every token of the image, CLS included
                tokens = images.shape[1]
                index = torch.arange(tokens, device=device).expand(len(active), p.num_captions, tokens)
            else:
                patches = sample_patch_sets(heat[active], rngs, p.num_captions, p.num_patches)  # [A, C, K]
                index = torch.from_numpy(patches + 1).to(device).long()  # +1 skips CLS
            uniforms = None
            if p.decoding == "sample":
                uniforms = torch.from_numpy(np.stack([rng.random((p.num_captions, new_tokens)) for rng in rngs]))
            texts = self._decode(images, image_rows[active], index, uniforms)
            for a, i in enumerate(active):
                rounds[i] = r + 1
                for text in texts[a]:
                    if len(captions[i]) < p.num_captions and not any(text in kept for kept in captions[i]):
                        captions[i].append(text)
        shortfall = np.array([p.num_captions - len(c) for c in captions], dtype=np.int32)
        return {"captions": captions, "shortfall": shortfall, "rounds": rounds}

    def _decode(self, images: torch.Tensor, image_of: torch.Tensor, index: torch.Tensor,
                uniforms: torch.Tensor | None) -> list[list[str]]:
        """One caption per token set: ``index [A, C, K]`` token ids (CLS = 0) into the image
        features of ``image_of [A]``, ``uniforms [A, C, T]`` for sampling (None: beam search);
        returns ``A`` lists of ``C`` captions."""
        import torch

        from models.blip.beam_search import beam_search

        p = self.params
        a, c, k = index.shape
        width = images.shape[-1]
        states = images[image_of][:, None].expand(a, c, -1, -1)                  # [A, C, 1+P, W]
        states = torch.gather(states, 2, index[..., None].expand(a, c, k, width))  # [A, C, K, W]
        states = states.reshape(a * c, k, width)
        flat_uniforms = None if uniforms is None else uniforms.reshape(a * c, -1).to(states.device)
        texts: list[str] = []
        prompt = self.prompt_ids.to(states.device)
        special = dict(eos_token_id=self.tokenizer.sep_token_id, pad_token_id=self.tokenizer.pad_token_id)
        with torch.no_grad():
            for s in range(0, a * c, p.generation_batch):
                chunk = states[s:s + p.generation_batch]
                if flat_uniforms is None:
                    ids, _ = beam_search(self.model.text_decoder, chunk, prompt, num_beams=p.num_beams,
                                      max_length=p.max_length, min_length=p.min_length,
                                      repetition_penalty=p.repetition_penalty, length_penalty=p.length_penalty,
                                      length_rule=p.length_rule, **special)
                else:
                    ids = self.model.generate(chunk, prompt, flat_uniforms[s:s + p.generation_batch],
                                              max_length=p.max_length, min_length=p.min_length, top_k=p.top_k,
                                              top_p=p.top_p, repetition_penalty=p.repetition_penalty, **special)
                texts += caption_texts(self.tokenizer, ids, len(prompt), p.prompt, p.text)
        return [texts[i * c:(i + 1) * c] for i in range(a)]


def caption_texts(tokenizer, ids, prompt_tokens: int, prompt: str, mode: str) -> list[str]:
    """The captions of generated ``ids [N, T]`` (prompt included). ``reference``: LAVIS's
    ``tokenizer.decode(ids, skip_special_tokens=True)[len(prompt):]`` (with the tokenizer's
    spacing clean-up on, as in the transformers LAVIS used); ``tokens``: the new tokens alone,
    leading word-pieces dropped."""
    if mode == "reference":
        full = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [text[len(prompt):] for text in full]
    rows = []
    for row in ids[:, prompt_tokens:].tolist():
        pieces = tokenizer.convert_ids_to_tokens(row)
        start = 0
        while start < len(pieces) and pieces[start].startswith("##"):
            start += 1
        rows.append(row[start:])
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


# --- blip_features --------------------------------------------------------------------------

class BlipFeaturesParams(StageParams):
    preset: Preset = Field("tiny", description="BLIP preset whose ViT encodes the image (as itm_gradcam / caption)")
    model: Literal["itm", "caption"] = Field("itm", description="the ViT of the ITM model or of the captioner "
                                             "(their weights differ); feed the tokens to that model's stage")
    checkpoint: str | None = Field(None, description="explicit checkpoint instead of the preset's standard file: a "
                                   "LAVIS file, a Hugging Face BLIP folder or hf:ORG/NAME (as itm_gradcam / caption)")
    dtype: DType = Field("float32", description=DTYPE_DOC)


@STAGES.add
class BlipFeatures(ModelStage):
    """BLIP ViT image tokens ``[1+P, C]``, once per image, for stages that transform them
    (``feature_fusion``) before ``itm_gradcam`` / ``caption`` read them.

    Not cached (2.4 MiB per image for ViT-L); recomputed in memory when needed.
    """

    name = "blip_features"
    Params = BlipFeaturesParams
    granularity = Granularity.IMAGE
    cacheable = False
    resources = Resources(gpu=0.25, batch_size=16)

    def model_family(self):
        return BLIP[self.params.model]

    def inputs(self) -> dict[str, Input]:
        s = self.model_config().vit.image_size
        return {"pixels": Input(tensor_type("float32", [3, s, s]), f"preprocessed image [3, {s}, {s}]")}

    def outputs(self) -> dict[str, Output]:
        v = self.model_config().vit
        return {"features": Output(tensor_type("float32", [1 + v.grid ** 2, v.width]),
                                   f"ViT tokens (CLS first) [{1 + v.grid ** 2}, {v.width}]")}

    def setup(self, device: str) -> None:
        super().setup(device)
        self.model.visual_encoder.to(torch_dtype(self.params.dtype))

    def process(self, batch: Batch) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            tokens = self.model.encode_image(torch.from_numpy(batch["pixels"]).to(self.device,
                                                                                  torch_dtype(self.params.dtype)))
        return {"features": tokens.float().cpu().numpy()}
