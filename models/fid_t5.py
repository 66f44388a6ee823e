"""UnifiedQA-v2 T5 with Fusion-in-Decoder (FiD): the question-answering model of PNP-VQA.

Each (question, captions) passage is encoded by the T5 encoder on its own; the encoder outputs
of all passages of a sample are concatenated and the decoder attends over all of them. The
model is a plain ``transformers.T5ForConditionalGeneration`` (a UnifiedQA Hugging Face folder
loads as is); :class:`FiDT5` only reshapes around it and adds no parameters.

Presets: ``tiny`` (random init, fixed seed, tokenizer in ``models/assets/tiny_t5``),
``shapes`` (a small T5 trained by the project on the synthetic ``shapes`` data with
``runtime train fid``; the same tokenizer, the weights bundled as
``models/assets/shapes/fid_t5.safetensors``) and ``base`` / ``large`` / ``3b`` (a local folder
``unifiedqa-v2-t5-<size>-1363200`` in the weights folder; nothing is downloaded).

The presets table (T5 sizes, weights sources) is ``models.fid_t5_family``; the built-in
presets' (``tiny``, ``shapes``) weights file is a safetensors file of the T5 state dict
(Hugging Face key names, tied embedding aliases stored once: :func:`fid_t5_state`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from models.compute_clock import counted
from models.fid_t5_family import FID_T5, TINY_TOKENIZER_DIR, WEIGHTS_FORMAT  # noqa: F401  (re-exported)
from models.weights import LoadReport, WeightsError, apply_state_dict


def make_passages(question: str, captions: list[str], num_captions_fid: int, *,
                  num_captions: int | None = None) -> list[str]:
    """The FiD passages of one question, exactly as the reference (LAVIS ``prepare_qa_input``).

    Captions ``captions[:num_captions]`` are taken in order, each ``strip()``-ed and followed by
    ``". "``; every ``num_captions_fid`` captions close a group, and the group is emitted as
    ``question.lower().strip() + " \\\\n " + group.lower().strip()`` -- the separator is space,
    backslash, ``n``, space (two characters, not a newline), the question keeps its ``?``, and
    the group's trailing space is stripped, so a passage ends with ``"."``. E.g. question
    ``"What color is the circle?"``, captions ``["A Red circle", "a blue square "]``, fid 2:
    ``'what color is the circle? \\\\n a red circle. a blue square.'``.

    The last group: the reference also closes a group at caption number ``num_captions``, so
    when ``num_captions`` is not a multiple of ``num_captions_fid`` the last passage holds the
    remainder (e.g. 5 captions, fid 2 -> groups of 2, 2, 1). When fewer than ``num_captions``
    captions are given, a trailing incomplete group is never closed and is dropped, as in the
    reference (5 captions, ``num_captions=6``, fid 2 -> groups of 2, 2). ``num_captions``
    defaults to ``len(captions)`` (the reference always has exactly ``num_captions``).
    """
    if num_captions_fid < 1:
        raise ValueError(f"num_captions_fid must be >= 1, got {num_captions_fid}")
    limit = len(captions) if num_captions is None else num_captions
    head = question.lower().strip() + " \\n "
    passages, group = [], ""
    for count, caption in enumerate(captions[:limit], start=1):
        group += caption.strip() + ". "
        if count == limit or count % num_captions_fid == 0:
            passages.append(head + group.lower().strip())
            group = ""
    return passages


def tokenize_passages(tokenizer, passages: list[list[str]], max_length: int | None = None):
    """Tokenize the passages of B samples (padding to the longest passage, truncating at
    ``max_length`` or the tokenizer's ``model_max_length``, as the reference does).

    Samples with fewer passages than the largest are padded with fully masked passages, which
    the decoder never attends to. Returns ``input_ids`` and ``attention_mask``, ``[B, n, L]``.
    """
    flat = [p for sample in passages for p in sample]
    if not flat:
        raise ValueError("no passages to tokenize")
    enc = tokenizer(flat, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    n = max(len(sample) for sample in passages)
    length = enc["input_ids"].size(1)
    ids = torch.full((len(passages), n, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(passages), n, length), dtype=torch.long)
    start = 0
    for i, sample in enumerate(passages):
        ids[i, :len(sample)] = enc["input_ids"][start:start + len(sample)]
        mask[i, :len(sample)] = enc["attention_mask"][start:start + len(sample)]
        start += len(sample)
    return ids, mask


def passage_token_ids(tokenizer, passages: list[list[str]], max_length: int | None = None) -> list[list[list[int]]]:
    """The token ids of each passage of B samples, unpadded: the real tokens of
    :func:`tokenize_passages` (the same truncation), ``[B][n_b][L_p]``."""
    flat = [p for sample in passages for p in sample]
    if not flat:
        raise ValueError("no passages to tokenize")
    ids = tokenizer(flat, padding=False, truncation=True, max_length=max_length)["input_ids"]
    out, start = [], 0
    for sample in passages:
        out.append(ids[start:start + len(sample)])
        start += len(sample)
    return out


class FiDT5(nn.Module):
    """Fusion-in-Decoder around a ``T5ForConditionalGeneration`` (held as ``self.t5``)."""

    def __init__(self, t5: T5ForConditionalGeneration):
        super().__init__()
        self.t5 = t5

    @property
    def config(self) -> T5Config:
        return self.t5.config

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """``input_ids``, ``attention_mask`` ``[B, n, L]`` (n passages of L tokens) ->
        ``hidden [B, n*L, d]`` (each passage encoded alone, then concatenated per sample) and
        ``mask [B, n*L]``."""
        b, n, length = input_ids.shape
        out = self.t5.encoder(input_ids=input_ids.reshape(b * n, length),
                              attention_mask=attention_mask.reshape(b * n, length), return_dict=True)
        hidden = out.last_hidden_state.reshape(b, n * length, -1)
        return hidden, attention_mask.reshape(b, n * length)

    def encode_packed(self, passages: list[list[list[int]]], chunk_tokens: int = 2048):
        """The fused encoder states of B samples' passages (token ids ``[B][n_b][L_p]``) with no
        padding: ``hidden [B, T, d]`` (each sample's passages' real tokens in order, then zeros;
        T = the most real tokens of a sample) and ``mask [B, T]``.

        The same states as :meth:`encode` without its padded positions, which the decoder never
        attends to: a T5 encoder's outputs at real tokens do not depend on padding (masked keys
        get zero attention weight; the relative position bias depends on offsets alone), and
        cross-attention has no position bias, so dropping masked keys leaves the decoder's input
        the same (to float rounding: other matrix shapes sum in another order). Passages are
        sorted by length and encoded in chunks of at most ``chunk_tokens`` padded tokens, so a
        chunk's rows differ little in length.
        """
        flat = [ids for sample in passages for ids in sample]
        order = sorted(range(len(flat)), key=lambda k: -len(flat[k]))
        device = self.t5.device
        states: list[torch.Tensor | None] = [None] * len(flat)
        start = 0
        while start < len(order):
            longest = len(flat[order[start]])
            chunk = order[start:start + max(1, chunk_tokens // longest)]
            ids = torch.full((len(chunk), longest), self.config.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, k in enumerate(chunk):
                ids[row, :len(flat[k])] = torch.tensor(flat[k])
                mask[row, :len(flat[k])] = 1
            hidden = self.t5.encoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     return_dict=True).last_hidden_state
            for row, k in enumerate(chunk):
                states[k] = hidden[row, :len(flat[k])]
            start += len(chunk)
        per_sample, start = [], 0
        for sample in passages:
            per_sample.append(torch.cat(states[start:start + len(sample)]))
            start += len(sample)
        length = max(len(x) for x in per_sample)
        fused = states[0].new_zeros((len(passages), length, states[0].shape[-1]))
        fused_mask = torch.zeros((len(passages), length), dtype=torch.long, device=device)
        for b, x in enumerate(per_sample):
            fused[b, :len(x)] = x
            fused_mask[b, :len(x)] = 1
        return fused, fused_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, **kwargs):
        """Decoder logits ``[B, T, vocab]`` for ``decoder_input_ids [B, T]`` over the fused
        passages (``[B, n, L]``); a ``Seq2SeqLMOutput``."""
        hidden, mask = self.encode(input_ids, attention_mask)
        return self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                       decoder_input_ids=decoder_input_ids, return_dict=True, **kwargs)

    @torch.no_grad()
    @counted
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_beams: int = 1,
                 max_new_tokens: int = 20, min_new_tokens: int = 0) -> torch.LongTensor:
        """Answers for ``[B, n, L]`` passages: ``LongTensor [B, T]``, starting with the decoder
        start token (``<pad>``) and padded with ``<pad>`` after ``</s>``.

        Greedy with ``num_beams=1``, beam search otherwise; no sampling. Token counts exclude the
        start token: the reference's ``max_length=20`` (Hugging Face semantics, start token
        included) is ``max_new_tokens=19``.
        """
        hidden, mask = self.encode(input_ids, attention_mask)
        return self._decode(hidden, mask, num_beams, max_new_tokens, min_new_tokens)

    @torch.no_grad()
    @counted
    def generate_packed(self, passages: list[list[list[int]]], *, num_beams: int = 1, max_new_tokens: int = 20,
                        min_new_tokens: int = 0, chunk_tokens: int = 2048) -> torch.LongTensor:
        """:meth:`generate` over passages given as token ids ``[B][n_b][L_p]`` (unpadded), encoded
        without padding (:meth:`encode_packed`): the same answers with less encoder work."""
        hidden, mask = self.encode_packed(passages, chunk_tokens)
        return self._decode(hidden, mask, num_beams, max_new_tokens, min_new_tokens)

    def _decode(self, hidden: torch.Tensor, mask: torch.Tensor, num_beams: int, max_new_tokens: int,
                min_new_tokens: int) -> torch.LongTensor:
        cfg = self.t5.config
        start = cfg.decoder_start_token_id if getattr(cfg, "decoder_start_token_id", None) is not None \
            else cfg.pad_token_id
        return self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
            num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=False, num_return_sequences=1, decoder_start_token_id=start,
            pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)


def t5_config(preset: str, vocab_size: int) -> T5Config:
    """The ``T5Config`` of ``preset``'s table entry for a vocabulary size (what a preset built
    without a file is: ``tiny``, ``shapes`` before training, a published size under ``--random-weights``)."""
    return T5Config(vocab_size=vocab_size, **FID_T5.config(preset))


def build_fid_t5(preset: str, *, seed: int | None = None):
    """``(FiDT5 in eval mode, tokenizer)``: a preset's architecture (the bundled tiny tokenizer),
    randomly initialised from ``seed`` (default: the preset's) without touching the global RNG
    state. For ``tiny`` this is the preset itself; for ``shapes`` the starting point of its
    training; for the published sizes what ``--random-weights`` runs."""
    tokenizer = _tiny_tokenizer()
    config = t5_config(preset, len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FID_T5.random_init(preset).seed if seed is None else seed)
        t5 = T5ForConditionalGeneration(config)
    return FiDT5(t5).eval(), tokenizer


def tied_aliases(model: nn.Module) -> list[str]:
    """State-dict keys that alias an earlier key's tensor (T5's tied embeddings: the encoder's and
    decoder's ``embed_tokens`` and, with ``tie_word_embeddings``, ``lm_head`` share ``shared``)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    aliases = []
    for key, value in model.state_dict(keep_vars=True).items():
        ident = (value.data_ptr(), tuple(value.shape))
        if ident in seen:
            aliases.append(key)
        seen.add(ident)
    return aliases


def fid_t5_state(model: FiDT5 | T5ForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The T5 state dict to store in a safetensors file (CPU, contiguous copies, Hugging Face key
    names), each tied tensor once (safetensors refuses shared storage)."""
    t5 = model.t5 if isinstance(model, FiDT5) else model
    skip = set(tied_aliases(t5))
    return {k: v.detach().cpu().contiguous().clone() for k, v in t5.state_dict().items() if k not in skip}


def _file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # not a safetensors file: load_checkpoint reports it
        return {}


def load_builtin_file(preset: str, path: Path) -> tuple[FiDT5, LoadReport, object]:
    """A built-in preset's architecture with the weights of the safetensors / torch file ``path``
    (every key checked), the load report and the tiny tokenizer."""
    from models.weights import load_checkpoint

    meta = _file_metadata(path)
    if meta.get("preset") and meta["preset"] != preset:
        raise WeightsError(f"{path} holds a '{meta['preset']}' FiD T5, not '{preset}': load it with preset "
                           f"'{meta['preset']}'")
    state = load_checkpoint(path)
    model, tokenizer = build_fid_t5(preset)
    report = apply_state_dict(model.t5, state, str(path), optional=tied_aliases(model.t5))
    model.t5.tie_weights()
    return model.eval(), report, tokenizer


def load_folder(folder: Path) -> tuple[FiDT5, LoadReport, object]:
    """A local Hugging Face folder (``from_pretrained(..., local_files_only=True)``; nothing is
    downloaded), an empty report (transformers checks the keys) and the folder's tokenizer."""
    try:
        t5 = T5ForConditionalGeneration.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot load the UnifiedQA folder {folder}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return FiDT5(t5).eval(), LoadReport(), tokenizer


def _tiny_tokenizer():
    if not (TINY_TOKENIZER_DIR / "tokenizer.json").exists():
        raise WeightsError(f"the tiny T5 tokenizer is missing from {TINY_TOKENIZER_DIR}: rebuild it with "
                           "models/assets/build_tiny_t5.py")
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), local_files_only=True)


def load_fid_t5(preset: str, path: str | Path | None = None):
    """``(FiDT5 in eval mode, tokenizer)`` of ``preset`` (weights from ``path`` or the preset's)."""
    loaded = FID_T5.load(preset, path)
    return loaded.model, loaded.tokenizer
