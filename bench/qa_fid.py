"""The QA stage alone at a published T5 size: the runtime's ``qa_fid`` against the reference
loop's ``forward_qa`` (one padded FiD ``generate`` per question, as LAVIS) and against the
stage's previous way (every passage of the batch padded to the batch's longest, one
``generate``), on the same questions and captions, A/B alternated; answers checked equal.
Each way's matrix-multiply FLOPs are counted once (``torch.utils.flop_counter``) and set against
its time and against this machine's rate on one encoder-sized matmul: where a way already runs
near that rate, only less work (fewer padded tokens) makes it faster.

Captions are what a randomly initialised BLIP captioner emits at LAVIS's VQAv2 settings: random
word pieces, never the end token, so every caption has ``max_length`` minus the prompt's tokens
(16 pieces) -- drawn here uniformly from the vocabulary of the tokenizer that
``--random-weights`` gives the BLIP captioner.

    .venv/bin/python bench/qa_fid.py --preset base --questions 4 --captions 100 --repeats 3 \
        --ways reference runtime --out bench/results/qa_fid.json      # and qa_fid.md beside it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_captions(questions: int, captions: int, seed: int = 0) -> list[list[str]]:
    """``captions`` texts per question, as a random BLIP captioner's (module doc)."""
    from models.blip.tokenizer import load_blip_tokenizer
    from models.blip.family import BLIP_CAPTION

    tok = load_blip_tokenizer(BLIP_CAPTION.tokenizer_dir("large", None))
    ordinary = np.setdiff1d(np.arange(len(tok)), tok.all_special_ids)
    rng = np.random.default_rng(seed)
    return [[tok.decode(rng.choice(ordinary, 16).tolist(), clean_up_tokenization_spaces=True)
             for _ in range(captions)] for _ in range(questions)]


def padding_stats(tokenizer, passages: list[list[str]], max_length: int) -> dict:
    """Encoder tokens of each way: real, padded per question (reference), padded per batch (before)."""
    from models.fid_t5 import passage_token_ids

    lengths = [[len(p) for p in sample] for sample in passage_token_ids(tokenizer, passages, max_length)]
    longest = max(max(s) for s in lengths)
    return {"real": sum(map(sum, lengths)), "per_question_padded": sum(len(s) * max(s) for s in lengths),
            "per_batch_padded": sum(len(s) for s in lengths) * longest,
            "passage_tokens_min_max": [min(map(min, lengths)), longest]}


def counted_gflop(fn) -> float:
    """GFLOP of the matrix multiplies (and attention) one call of ``fn`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def matmul_rate(tokens: int = 4096, width: int = 768, hidden: int = 3072, repeats: int = 5) -> float:
    """GFLOP/s of a T5-base feed-forward-sized matmul at the current thread count (best of
    ``repeats``: the machine's rate on this shape when nothing else runs in between)."""
    import torch

    x, w = torch.randn(tokens, width), torch.randn(hidden, width)
    torch.nn.functional.linear(x, w)
    best = min(_seconds(lambda: torch.nn.functional.linear(x, w)) for _ in range(repeats))
    return 2 * tokens * width * hidden / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ways", nargs="+", default=["reference", "before", "runtime"])
    ap.add_argument("--out", type=Path, help="JSON file of the results")
    a = ap.parse_args()
    from runtime.executors import apply_threads

    apply_threads(a.threads)
    os.environ["PNPVQA_RANDOM_WEIGHTS"] = "1"  # before any preset is looked up: the tokenizers too
    import torch

    from bench.reference_loop import forward_qa, shapes_samples
    from models.fid_t5 import make_passages, tokenize_passages
    from stages.base import Batch
    from stages.qa import QAFiD

    stage = QAFiD(QAFiD.Params(preset=a.preset, max_length=20))
    stage.setup("cpu")
    samples = shapes_samples(8000, a.questions, 1)
    questions = [s["question"] for s in samples]
    captions = random_captions(len(questions), a.captions)
    passages = [make_passages(q, c, 1) for q, c in zip(questions, captions)]
    p = stage.params

    def before() -> list[str]:
        ids, mask = tokenize_passages(stage.tokenizer, passages, p.max_passage_tokens)
        out = stage.model.generate(ids, mask, max_new_tokens=p.max_length - 1)
        return [t.strip() for t in stage.tokenizer.batch_decode(out, skip_special_tokens=True)]

    ways = {"reference": lambda: forward_qa({"answer": stage}, questions, captions),
            "before": before,
            "runtime": lambda: stage.process(Batch({"question": questions, "captions": captions}, {},
                                                   [str(i) for i in range(len(questions))]))["answer"]}
    times: dict[str, list[float]] = {w: [] for w in a.ways}
    answers: dict[str, list[str]] = {}
    with torch.no_grad():
        for _ in range(a.repeats):
            for w in a.ways:
                start = time.perf_counter()
                answers[w] = ways[w]()
                times[w].append(time.perf_counter() - start)
                print(f"{w}: {times[w][-1]:.1f} s", flush=True)
        gflop = {w: counted_gflop(ways[w]) for w in a.ways}
    med = {w: statistics.median(t) for w, t in times.items()}
    rate = matmul_rate()
    result = {"preset": a.preset, "questions": len(questions), "captions": a.captions, "threads": a.threads,
              "seconds": times, "median_s": med,
              "speedup_over_reference": {w: med.get("reference", float("nan")) / m for w, m in med.items()},
              "answers_equal_reference": {w: answers[w] == answers.get("reference", answers[w]) for w in answers},
              "tokens": padding_stats(stage.tokenizer, passages, p.max_passage_tokens),
              "gflop": gflop, "gflop_per_s": {w: gflop[w] / med[w] for w in gflop},
              "matmul_gflop_per_s": rate, "share_of_matmul_rate": {w: gflop[w] / med[w] / rate for w in gflop}}
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
        a.out.with_suffix(".md").write_text(markdown(result, " ".join(sys.argv[1:])))


def markdown(r: dict, argv: str) -> str:
    """The result as a table: time, speed-up, work and rate of each way."""
    t = r["tokens"]
    lines = [f"# QA (FiD) alone: UnifiedQA-v2 T5 {r['preset']}, random weights", "",
             f"{r['questions']} questions x {r['captions']} random-captioner captions, {r['threads']} torch threads; "
             f"passage tokens: {t['real']} real, {t['per_question_padded']} padded per question (the reference), "
             f"{t['per_batch_padded']} padded per batch. GFLOP: matrix multiplies counted by torch's flop counter. "
             f"This machine's rate on one T5-base feed-forward matmul: {r['matmul_gflop_per_s']:.0f} GFLOP/s.", "",
             "| way | median time | speed-up | GFLOP | GFLOP/s | share of the matmul rate | answers equal |",
             "|---|---|---|---|---|---|---|"]
    for way, seconds in r["median_s"].items():
        lines.append(f"| {way} | {seconds:.1f} s | {r['speedup_over_reference'][way]:.2f}x | {r['gflop'][way]:.0f} | "
                     f"{r['gflop_per_s'][way]:.0f} | {100 * r['share_of_matmul_rate'][way]:.0f}% | "
                     f"{'yes' if r['answers_equal_reference'][way] else 'NO'} |")
    return "\n".join(lines + ["", f"_`bench/qa_fid.py {argv}`, medians of {len(next(iter(r['seconds'].values())))} "
                                   "alternated rounds._", ""])


if __name__ == "__main__":
    main()
