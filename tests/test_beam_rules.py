"""Beam search's two length rules on hand-computed beams.

A fake decoder reads its next-token probabilities from a table keyed by the tokens generated so
far, so every score below is a sum of logs of the table's numbers. Prompt ``p p p`` (3 tokens),
2 beams, so each step ranks the top 4 candidates. ``lavis`` divides a finished caption's sum by
its length with the prompt and without the eos (``p p p a [eos]``: 4) and stops a sentence when
its worst kept score >= the best of all candidates / the length before the step; ``generated``
divides by the new tokens, eos included (2), and bounds by the best running beam.
"""

from __future__ import annotations

import dataclasses
from math import log
from typing import get_args

import pytest
import torch

from models.blip import beam_search as bs

PAD, EOS, A, B, C, P = range(6)
PROMPT = torch.tensor([P, P, P])


class TableDecoder:
    """``decoder(ids [N, T], cross_kv, cache, use_cache) -> (logits [N, T', 6], cache)``: the
    logits are log-probabilities from ``table[generated tokens]`` (absent tokens: e^-60); the
    cache holds each row's tokens so far. ``steps`` counts the positions scored."""

    bert = property(lambda self: self)

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]]):
        self.table, self.steps = table, 0

    def cross_kv(self, states):
        return states

    def __call__(self, ids, cross_kv=None, cache=None, use_cache=True):
        history = ids if cache is None else torch.cat([cache[0][0], ids], dim=1)
        self.steps += 1
        logits = torch.full((len(history), 1, 6), -60.0)
        for row, tokens in enumerate(history.tolist()):
            for token, p in self.table[tuple(tokens[len(PROMPT):])].items():
                logits[row, 0, token] = log(p)
        return logits, [(history, history)]


def run(table, rule, *, length_penalty=1.0, max_length=10):
    decoder = TableDecoder(table)
    ids, scores = bs.beam_search(decoder, torch.zeros(1, 1, 1), PROMPT, num_beams=2, max_length=max_length,
                                 min_length=0, repetition_penalty=1.0, length_penalty=length_penalty,
                                 eos_token_id=EOS, pad_token_id=PAD, length_rule=rule)
    return ids[0].tolist()[len(PROMPT):], float(scores[0]), decoder.steps


# step 1: a .5, b .4 run on (eos .1 ranks third)
# step 2: b c -1.022, a eos -1.204 (finishes), a c -1.609, b eos -3.219; running b c, a c
# step 3: b c eos -1.715 (finishes), a c b -1.832, b c a -2.226, b c b -2.631; running a c b, b c a
#   lavis: a eos -1.204 / 4 = -0.301 beats b c eos -1.715 / 5 = -0.343; done: worst -0.343 >=
#          best candidate -1.715 / 5
#   generated: b c eos -1.715 / 3 = -0.572 beats a eos -1.204 / 2 = -0.602; done: worst -0.602
#          >= best running -1.832 / 3 = -0.611
DIFFERENT_CAPTIONS = {(): {A: .5, B: .4, EOS: .1},
                      (A,): {EOS: .6, C: .4}, (B,): {C: .9, EOS: .1},
                      (B, C): {EOS: .5, A: .3, B: .2}, (A, C): {EOS: .2, B: .8}}


def test_rules_normalise_finished_captions_by_different_lengths():
    a_eos, bc_eos = log(.5) + log(.6), log(.4) + log(.9) + log(.5)
    assert run(DIFFERENT_CAPTIONS, "lavis") == ([A, EOS], pytest.approx(a_eos / 4, abs=1e-6), 3)
    assert run(DIFFERENT_CAPTIONS, "generated") == ([B, C, EOS], pytest.approx(bc_eos / 3, abs=1e-6), 3)


# length_penalty 0: both rules score plain sums, only the stop differs
# step 1: a -0.693, b -1.204 run on
# step 2: a eos -1.204, b eos -1.309 both finish; a c -1.609, b c -3.507 run on
#   generated: done, worst -1.309 >= best running -1.609
#   lavis: not done, worst -1.309 < best candidate -1.204 (the finished a eos); one more step
# step 3: a c eos -2.120 is the best candidate; -1.309 >= -2.120: done; nothing joins
DIFFERENT_STOPS = {(): {A: .5, B: .3, EOS: .2},
                   (A,): {EOS: .6, C: .4}, (B,): {EOS: .9, C: .1},
                   (A, C): {EOS: .6, B: .4}, (B, C): {EOS: .6, A: .4}}


def test_rules_stop_a_sentence_at_different_steps():
    a_eos = log(.5) + log(.6)
    for rule, steps in (("generated", 2), ("lavis", 3)):
        assert run(DIFFERENT_STOPS, rule, length_penalty=0.0) == ([A, EOS], pytest.approx(a_eos, abs=1e-6), steps)


# max_length 5: step 2 is the last
# step 1: a -0.693, b -1.204 run on
# step 2: a eos -1.492, b eos -1.561, a c -1.609, b c -2.408
#   generated: the top 2 stop: a eos -1.492 / 2 = -0.746 beats b eos -1.561 / 2 = -0.780
#   lavis: a eos -1.492 / 4 = -0.373 and b eos -1.561 / 4 = -0.390 finish; not done (-0.390 <
#          -1.492 / 4), so the running a c and b c join at max_length: a c -1.609 / 5 = -0.322 wins
AT_THE_LIMIT = {(): {A: .5, B: .3, EOS: .2}, (A,): {EOS: .45, C: .4, B: .15}, (B,): {EOS: .7, C: .3}}


def test_rules_at_max_length():
    a_eos, a_c = log(.5) + log(.45), log(.5) + log(.4)
    assert run(AT_THE_LIMIT, "generated", max_length=5) == ([A, EOS], pytest.approx(a_eos / 2, abs=1e-6), 2)
    assert run(AT_THE_LIMIT, "lavis", max_length=5) == ([A, C], pytest.approx(a_c / 5, abs=1e-6), 2)


@pytest.mark.parametrize("field, value, table, kwargs, want", [
    # the stop and the limit of the lavis rule each decide one of the cases above
    ("bound", "running", DIFFERENT_STOPS, {"length_penalty": 0.0}, 2),  # steps: stops with generated
    ("at_limit", "stop", AT_THE_LIMIT, {"max_length": 5}, [A, EOS]),   # a c never joins
])
def test_the_lavis_bound_and_limit_matter(monkeypatch, field, value, table, kwargs, want):
    changed = dataclasses.replace(bs.LENGTH_RULES["lavis"], **{field: value})
    monkeypatch.setitem(bs.LENGTH_RULES, "changed", changed)
    caption, _, steps = run(table, "changed", **kwargs)
    assert (steps if isinstance(want, int) else caption) == want


def test_lavis_scores_in_float64_as_python_floats():
    ids, scores = bs.beam_search(TableDecoder(DIFFERENT_CAPTIONS), torch.zeros(2, 1, 1), PROMPT, num_beams=2,
                                 max_length=10, min_length=0, repetition_penalty=1.0, length_penalty=1.0,
                                 eos_token_id=EOS, pad_token_id=PAD, length_rule="lavis")
    # a batch of two identical sentences: padded to the longest (here both [p p p a eos])
    assert scores.dtype == torch.float64 and ids.tolist() == [[P, P, P, A, EOS]] * 2


def test_the_caption_param_offers_every_rule_and_defaults_to_lavis():
    from stages.blip import CaptionParams

    field = CaptionParams.model_fields["length_rule"]
    assert set(get_args(field.annotation)) == set(bs.LENGTH_RULES) and field.default == "lavis"
