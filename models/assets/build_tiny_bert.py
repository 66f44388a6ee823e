"""Build ``models/assets/tiny_bert/``: a small uncased WordPiece vocabulary for the tiny BLIP presets.

Run from the repository root: ``python models/assets/build_tiny_bert.py``. The output is
committed; this script only documents (and can reproduce) how it was made. Layout of the
vocabulary: the BERT special tokens (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``,
``[MASK]``), BLIP's ``[DEC]`` and ``[ENC]``, single characters (punctuation, digits, letters)
and their ``##`` continuations so nearly any text tokenizes without ``[UNK]``, every word of
the synthetic ``shapes`` dataset (questions, answers, answer variants, captions), a few
hundred common English words, and a few suffix pieces. The folder loads offline with
``BertTokenizerFast.from_pretrained(folder)``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tiny_bert"
MODEL_MAX_LENGTH = 64  # the tiny text models' max_position

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]

SHAPES_WORDS = """
red green blue yellow purple orange
circle circles square squares triangle triangles diamond diamonds
zero one two three four five six seven eight nine ten
yes no
what color colour is the there how many are shape shapes object objects
leftmost rightmost top bottom at of a an picture image photo with and left right
middle center centre above below next to on in
""".split()

COMMON_WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from
they we say her she or will my all would there their what so up out if about who get which
go me when make can like time just him know take people into year your good some could them
see other than then now look only come its over think also back after use how our work
first well way even new want because any these give day most us is was are were been has had
did does done said made went gone got seen came took known thought
man men woman women child children boy girl person people dog dogs cat cats bird birds horse
car cars bus truck train plane boat bike bicycle street road building house room kitchen table
chair bed window door wall floor sky water tree trees grass field beach snow food plate pizza
sandwich cake fruit banana apple bowl cup glass bottle phone computer laptop television tv
ball game player team sign clock light white black brown gray grey pink dark bright
big small large little tall short long old young front back side near far inside outside
sitting standing walking riding holding playing eating looking lying flying parked
group couple pair lot lots some several each every both few more most less least
background foreground scene view shown showing shows picture photograph drawn drawing
filled flat plain striped stripes checkered checker textured texture noise pattern patterned
round pointed corner corners edge edges line lines point points area region part
empty full alone together single only same different other another
close closer far farther highest lowest upper lower between around beside behind
count number numbers answer question questions word words
this that these those here where when why which who whose whom
can could should would will shall may might must
very really quite too also just still yet already
""".split()

SUFFIXES = ["##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##most", "##ish", "##y", "##n"]


def vocabulary() -> list[str]:
    chars = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    pieces = ["##" + c for c in string.digits + string.ascii_lowercase]
    ordered = SPECIAL + chars + pieces + SHAPES_WORDS + COMMON_WORDS + SUFFIXES
    return list(dict.fromkeys(ordered))  # first occurrence wins, order kept


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    (OUT / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "cls_token": "[CLS]", "mask_token": "[MASK]"}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None,
              "tokenize_chinese_chars": True, "model_max_length": MODEL_MAX_LENGTH, **specials}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (OUT / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens to {OUT}")


if __name__ == "__main__":
    main()
