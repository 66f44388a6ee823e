"""Question answering over captions with UnifiedQA-v2 T5 in Fusion-in-Decoder mode.
Torch and the model code are imported inside the methods: graphs without model stages (and
their Ray workers) never pay for importing torch.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from models.fid_t5_family import FID_T5
from stages.base import STAGES, Batch, Input, Output, Resources, StageParams
from stages.dtypes import DTYPE_DOC, DType, torch_dtype
from stages.model_stage import ModelStage

Preset = FID_T5.preset_type()


class QAFiDParams(StageParams):
    preset: Preset = Field("tiny", description=FID_T5.preset_doc("UnifiedQA-v2 T5"))
    checkpoint: str | None = Field(None, description="explicit Hugging Face model folder instead of the preset's, "
                                   "or hf:ORG/NAME from the local Hugging Face cache (e.g. "
                                   "hf:allenai/unifiedqa-v2-t5-large-1363200); tiny / shapes: also a "
                                   "fid_t5.safetensors of `runtime train fid`")
    num_captions_fid: int = Field(1, ge=1, description="captions per passage (LAVIS: 1)")
    num_beams: int = Field(1, ge=1, description="beam search width (1 = greedy, as LAVIS)")
    max_length: int = Field(20, ge=2, le=512, description="most answer tokens, decoder start token included "
                            "(Hugging Face max_length; LAVIS: 20)")
    min_length: int = Field(0, ge=0, description="fewest answer tokens (LAVIS: 0)")
    max_passage_tokens: int = Field(512, ge=8, description="passages are truncated to this many tokens")
    dtype: DType = Field("float32", description=DTYPE_DOC + "; not float16: T5's activations overflow it")
    decode_tokens: int = Field(16384, ge=1, description="passage tokens decoded together: questions are answered "
                               "in groups of at most this many (a question's passages always together); bounds the "
                               "decoder's cross-attention cache, layers x 2 x d_model x 4 B per token (base 74 kB, "
                               "large 197 kB)")
    encode_tokens: int = Field(2048, ge=1, description="padded tokens per encoder call (activation memory); 2048 keeps "
                               "a T5 base feed-forward activation (tokens x 3072 x 4 B) under glibc's 32 MiB mmap "
                               "ceiling, so it is reused from the heap rather than page-faulted afresh per op "
                               "(4096: 9% slower at base on 2 threads)")


@STAGES.add
class QAFiD(ModelStage):
    """Answer the question from its captions with UnifiedQA FiD.

    Each passage is the question (lowercased, stripped), a literal ``\\n`` and a group of
    ``num_captions_fid`` captions, exactly as LAVIS builds it; the T5 encoder reads every
    passage separately and the decoder attends over all of them. Passages are encoded without
    padding (sorted by length, across the questions of a batch) and the decoder reads only their
    real tokens: LAVIS's answers, with less encoder work than padding each question's passages
    to its longest (``FiDT5.encode_packed``).
    """

    name = "qa_fid"
    Params = QAFiDParams
    family = FID_T5
    # CPU: 32 as fast as 64, 1.5x 16 (bench/results/bench.md); GPU: not measured yet, the earlier 16 kept
    resources = Resources(gpu=0.5, batch_size=32, cuda_batch_size=16)
    INPUTS = {"question": Input(pa.string(), "question text"),
              "captions": Input(pa.list_(pa.string()), "captions of the image for this question")}
    OUTPUTS = {"answer": Output(pa.string(), "generated answer", role="answer")}

    def extra_problems(self) -> list[tuple[str, str]]:
        if self.params.dtype == "float16":
            return [("dtype", "T5 overflows in float16 (its feed-forward activations exceed 65504 and answers turn "
                     "to NaN or garbage); use bfloat16, which has float32's range")]
        return []

    def setup(self, device: str) -> None:
        super().setup(device)
        self.model.to(device, torch_dtype(self.params.dtype))

    def process(self, batch: Batch) -> dict[str, Any]:
        from models.fid_t5 import make_passages, passage_token_ids

        p = self.params
        rows, passages = [], []
        for i, (question, captions) in enumerate(zip(batch["question"], batch["captions"])):
            if not captions:
                batch.fail(i, "no captions to answer from")
                continue
            rows.append(i)
            passages.append(make_passages(question, captions, p.num_captions_fid))
        answers: list[str | None] = [None] * len(batch)
        if not rows:
            return {"answer": answers}
        ids = passage_token_ids(self.tokenizer, passages, p.max_passage_tokens)
        for group in token_groups([sum(map(len, sample)) for sample in ids], p.decode_tokens):
            out = self.model.generate_packed([ids[g] for g in group], num_beams=p.num_beams,
                                             max_new_tokens=p.max_length - 1, min_new_tokens=max(0, p.min_length - 1),
                                             chunk_tokens=p.encode_tokens)
            for g, text in zip(group, self.tokenizer.batch_decode(out, skip_special_tokens=True)):
                answers[rows[g]] = text.strip()
        return {"answer": answers}


def token_groups(tokens: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices into ``tokens`` (each question's passage tokens) in groups of at most
    ``budget`` tokens; a question over the budget is a group alone."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(tokens):
        if groups and total + n <= budget:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups
