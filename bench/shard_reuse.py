"""Benchmark: how much cached work survives an edit of the dataset, with the content-defined
shard boundaries of ``runtime.shards`` against the positional cutting they replaced (a new
shard every ``shard_size`` samples, at the next image boundary).

For each edit it prints the share of the edited run's samples that sit in shards whose
content is unchanged: for nodes that read the questions, and for per-image nodes (image
decoding, SAM embeddings), which only see the shard's images:

- a subset: 10% of the images removed at random;
- a reordering: the second half of the images moved before the first (a block move), and the
  questions of every image reversed;
- one question appended to the last image, and 1% of the questions removed at random;
- another --limit: the first half of the samples, against the whole run.

    .venv/bin/python bench/shard_reuse.py --questions 10000 --per-image 5 --shard-size 64
"""

from __future__ import annotations

import argparse
import random
from typing import Any, Iterator

from runtime.shards import iter_shards
from sources.base import Source


class Records(Source):
    name = "records"

    def __init__(self, records):
        super().__init__(Source.Params())
        self.records = records

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)


def dataset(questions: int, per_image: int) -> list[dict[str, Any]]:
    return [{"sample_id": f"q{i}", "image_id": f"img{i // per_image}", "question": f"question {i}?",
             "image_bytes": f"image {i // per_image}".encode(), "image_path": None, "answers": None,
             "question_type": None} for i in range(questions)]


def content_defined(records, shard_size, limit=None, per_image=False):
    columns = ["image_bytes"] if per_image else ["question", "image_bytes"]
    return [(s.source_fingerprint(columns, per_image), s.num_samples)
            for s in iter_shards(Records(records), shard_size, limit=limit)]


def positional(records, shard_size, limit=None):
    """The former cutting: a shard closes at the first image boundary after shard_size samples."""
    out, current = [], []
    for r in records[:limit]:
        if len(current) >= shard_size and r["image_id"] != current[-1]["image_id"]:
            out.append(current)
            current = []
        current.append(r)
    if current:
        out.append(current)
    return [(tuple(x["sample_id"] for x in shard), len(shard)) for shard in out]  # it hashed them in order


def reused(before, after) -> float:
    known = {k for k, _ in before}
    return sum(n for k, n in after if k in known) / max(1, sum(n for _, n in after))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=10000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    records = dataset(a.questions, a.per_image)
    images = sorted({r["image_id"] for r in records}, key=lambda x: int(x[3:]))
    gone = set(rng.sample(images, len(images) // 10))
    half_images = set(images[len(images) // 2:])
    dropped = set(rng.sample(range(len(records)), len(records) // 100))
    reversed_within = []
    for i in range(0, len(records), a.per_image):
        reversed_within += records[i:i + a.per_image][::-1]
    edits = {
        "subset (10% of images removed)": ([r for r in records if r["image_id"] not in gone], None),
        "reorder (second half of the images first)": (
            [r for r in records if r["image_id"] in half_images] + [r for r in records if r["image_id"] not in half_images],
            None),
        "reorder (questions of each image reversed)": (reversed_within, None),
        "one question appended": (records + [{**records[-1], "sample_id": "extra", "question": "one more?"}], None),
        "1% of the questions removed": ([r for i, r in enumerate(records) if i not in dropped], None),
        "--limit half of the samples": (records, len(records) // 2),
    }
    print(f"{a.questions} questions, {a.per_image} per image, shard_size {a.shard_size}\n")
    print("| edit | content-defined: per-sample nodes | content-defined: per-image nodes | positional (before) |")
    print("|---|---|---|---|")
    for name, (edited, limit) in edits.items():
        new = reused(content_defined(records, a.shard_size), content_defined(edited, a.shard_size, limit))
        image = reused(content_defined(records, a.shard_size, per_image=True),
                       content_defined(edited, a.shard_size, limit, per_image=True))
        old = reused(positional(records, a.shard_size), positional(edited, a.shard_size, limit))
        print(f"| {name} | {new:.1%} | {image:.1%} | {old:.1%} |")
    sizes = [n for _, n in content_defined(records, a.shard_size)]
    print(f"\nshards: {len(sizes)}, samples per shard: mean {sum(sizes) / len(sizes):.1f}, max {max(sizes)}")


if __name__ == "__main__":
    main()
