"""The caption decoder's next-token choice: the inverse-CDF draw against hand-computed cases,
and the top-k shortcut against transformers' processors over the whole vocabulary."""

import math

import pytest
import torch

from models.blip.sampling import TopKSampler, build_processors, draw, pick_tokens


def test_draw_inverts_the_cumulative_weights_in_token_order():
    # weights exp(s - max): 1/3 and 1 -> cumulative 1/3, 4/3; u * 4/3 below 1/3 picks the first
    scores = torch.tensor([[0.0, math.log(3.0)]] * 4)
    u = torch.tensor([0.0, 0.2499, 0.2501, 0.999], dtype=torch.float64)
    assert draw(scores, u).tolist() == [0, 0, 1, 1]
    # a forbidden token between them changes no partial sum: the same choices, shifted
    gapped = torch.tensor([[0.0, float("-inf"), math.log(3.0)]] * 4)
    assert draw(gapped, u).tolist() == [0, 0, 2, 2]
    # u = 1 lands past the last weight: the last allowed token, never a forbidden one
    assert draw(torch.tensor([[1.0, 2.0, float("-inf")]]), torch.tensor([1.0])).tolist() == [1]
    assert pick_tokens(gapped[:1], None).tolist() == [2]


@pytest.mark.parametrize("top_k, top_p, penalty", [(50, 1.0, 1.0), (1, 1.0, 1.0), (5, 1.0, 1.3), (400, 1.0, 1.0),
                                                   (1000, 1.0, 1.0), (50, 0.9, 1.0), (0, 1.0, 1.0)])
def test_top_k_shortcut_equals_the_processors_over_the_whole_vocabulary(top_k, top_p, penalty):
    g = torch.Generator().manual_seed(top_k)
    settings = dict(min_length=6, eos_token_id=3, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    sampler, processors = TopKSampler(**settings), build_processors(**settings)
    differ = []
    for trial in range(30):
        logits = torch.randn(32, 400, generator=g) * (0.5 + trial % 4)
        if trial % 3 == 0:
            logits = (2 * logits).round()  # ties at the k-th score: top-k keeps all of them
        ids = torch.randint(0, 400, (32, 4 + trial % 4), generator=g)  # min_length 6: eos banned early on
        u = torch.rand(32, generator=g, dtype=torch.float64)
        fast = sampler(ids, logits.clone(), u)
        full = pick_tokens(processors(ids, logits.clone()), u)
        differ.append(int((fast != full).sum()))
        assert not bool(((fast == 3) & (torch.tensor(ids.shape[1]) < 6)).any())
    assert sum(differ) == 0
    greedy = sampler(ids, logits.clone(), None)
    assert torch.equal(greedy, processors(ids, logits.clone()).argmax(dim=-1))


def test_tied_rows_keep_every_tied_token():
    # k = 2, but three tokens share the 2nd best score: top-k keeps all three, so the draw can
    # land on the third one (the shortcut alone, two candidates, never could)
    logits = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0]] * 3)
    u = torch.tensor([0.2, 0.97, 0.99], dtype=torch.float64)
    sampler = TopKSampler(min_length=0, eos_token_id=4, top_k=2, top_p=1.0, repetition_penalty=1.0)
    chosen = sampler(torch.zeros(3, 1, dtype=torch.long), logits.clone(), u)
    # weights e^0 = 1, e^-4 three times: cumulative 1, 1+e^-4, 1+2e^-4, 1+3e^-4
    total = 1 + 3 * math.exp(-4)
    expected = [next(i for i, c in enumerate([1, 1 + math.exp(-4), 1 + 2 * math.exp(-4), total]) if c > x * total)
                for x in u.tolist()]
    assert chosen.tolist() == expected == [0, 2, 3]
