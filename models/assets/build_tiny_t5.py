"""Build the tiny T5 tokenizer in ``models/assets/tiny_t5/`` (deterministic; run from anywhere).

A lowercase word-level tokenizer with T5's special ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)
that appends ``</s>`` to every sequence, as T5's tokenizer does. Text is NFKC-normalised and
lowercased, split on whitespace, then every punctuation character (``.``, ``?``, ``\\``, ...)
and every digit becomes a token of its own, so the passage separator ``" \\n "`` is the two
tokens ``\\`` and ``n``. The vocabulary covers every word of the synthetic ``shapes`` dataset
(questions, answers and their spelling variants) plus a few hundred common English words.

    .venv/bin/python models/assets/build_tiny_t5.py
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

OUT = Path(__file__).resolve().parent / "tiny_t5"
SPECIALS = ["<pad>", "</s>", "<unk>"]
MODEL_MAX_LENGTH = 512

SHAPES_WORDS = """
red green blue yellow purple orange circle circles square squares triangle triangles diamond diamonds
zero one two three four five six seven eight nine ten yes no
what color colour colors is the there how many are shape shapes object objects leftmost rightmost
at top bottom of picture a an image with and left right plain noise stripes checker background
""".split()

COMMON_WORDS = """
i you he she it we they me him her us them my your his its our their this that these those
who whom whose which where when why be am was were been being have has had having do does did
done doing will would shall should can could may might must not to in on for from by about as
into like through after over between out against during without before under around among up
down off above below near next behind front inside outside beside along across but or if then
so than too very just also only even still again ever never always often sometimes here now
all any both each few more most other some such own same another every no none nothing something
anything everything someone people person man woman men women boy girl child children baby
time year day week night morning evening today world life hand part place case point group
number way thing things home house room door window table chair bed wall floor kitchen street
road car bus train truck bike bicycle motorcycle boat plane airplane sky cloud clouds sun water
tree trees grass field park beach snow rain city building sign light lights pole fence
dog dogs cat cats horse horses cow cows sheep bird birds elephant elephants giraffe giraffes
zebra zebras bear bears animal animals food pizza cake sandwich banana bananas apple apples
orange oranges plate bowl cup glass bottle knife fork spoon phone laptop computer keyboard
screen tv book books clock bag umbrella hat shirt jacket dress shoes glasses tie ball frisbee
kite kites skateboard surfboard skis racket bat game player players team tennis baseball
soccer football white black brown gray grey pink dark bright big small large little long short
tall high low old new young good bad great first last second third open closed full
empty hot cold wet dry happy sad clean dirty round flat wooden metal front back side middle
center centre corner edge look looking see seen show shown shows sit sitting stand standing
walk walking run running ride riding play playing hold holding eat eating drink drinking
wear wearing fly flying park parked cut lay laying lying sleep sleeping watch watching
go going get make made take give use find tell ask work call try need feel become leave put
mean keep let begin seem help talk turn start shown hear move live believe bring happen write
provide lot kind type made set top area view close together alone near far away
answer question caption captions photo photograph scene shot background foreground frame
contains containing shows showing has have appears appear several pair couple many much
""".split()

PUNCTUATION = list(string.punctuation)  # includes . ? \ and ' , ! - : ;
LETTERS = list(string.ascii_lowercase)
DIGITS = list(string.digits)


def vocabulary() -> list[str]:
    """Specials first (ids 0, 1, 2), then punctuation, digits, letters and words, each once."""
    seen: dict[str, None] = {}
    for token in SPECIALS + PUNCTUATION + DIGITS + LETTERS + SHAPES_WORDS + COMMON_WORDS:
        seen.setdefault(token, None)
    return list(seen)


def build() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    return tok


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok = build()
    (OUT / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
