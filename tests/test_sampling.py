"""The engine's sampler against transformers' own warpers: the same distribution (temperature, then top-k, then
top-p over what top-k kept), whether the nucleus lies among the first candidates or reaches past them."""

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from domainsynth.actors.sampling import SampleAsLastProcessor, truncated_distribution


def reference_probabilities(scores, temperature, top_p, top_k):
    """transformers' sampling distribution over the whole vocabulary."""
    scores = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


def dense(ids, probs, vocab):
    return torch.zeros(ids.shape[0], vocab).scatter_(-1, ids, probs)


@pytest.mark.parametrize("temperature, top_p, top_k", [
    (0.7, 0.9, 40), (1.0, 0.95, 0), (0.8, 1.0, 0), (1.3, 0.5, 0), (1.0, 1.0, 20), (0.9, 0.99, 1000)])
@pytest.mark.parametrize("peaked", [True, False])
def test_same_distribution_as_transformers(temperature, top_p, top_k, peaked):
    generator = torch.Generator().manual_seed(0)
    vocab = 5000  # above the first look (256 candidates), so that flat rows need the whole vocabulary
    scores = torch.randn(4, vocab, generator=generator) * (6.0 if peaked else 0.3)
    scores[1, :4000] = float("-inf")  # a row structured output has narrowed
    ids, probs = truncated_distribution(scores, temperature, top_p, top_k)
    expected = reference_probabilities(scores, temperature, top_p, top_k)
    assert torch.allclose(dense(ids, probs, vocab), expected, atol=1e-6)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(4))


def test_the_processor_leaves_one_drawn_token_and_draws_by_the_distribution():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20000, 1)
    torch.manual_seed(0)
    out = SampleAsLastProcessor(1.0, 0.9, 0)(None, scores.clone())
    assert bool((torch.isfinite(out).sum(dim=-1) == 1).all())
    drawn = out.argmax(dim=-1)
    frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
    expected = reference_probabilities(scores[:1], 1.0, 0.9, 0)[0]
    assert frequencies[4] == 0 and frequencies[3] == 0  # outside the nucleus
    assert torch.allclose(frequencies, expected, atol=0.015)


@pytest.mark.parametrize("top_p", [1e-300, 1e-9, 1e-3])
def test_a_vanishing_top_p_keeps_the_likeliest_token_as_transformers_does(top_p):
    """top_p may be any positive float the endpoint accepts; one below float32's smallest value once cut every
    token (a division by zero, then a 500)."""
    scores = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)) * 2.0
    ids, probs = truncated_distribution(scores, 1.0, top_p, 0)
    assert torch.equal(ids[:, 0], scores.argmax(dim=-1))
    assert torch.equal(probs[:, 0], torch.ones(3)) and float(probs[:, 1:].sum()) == 0.0
    assert torch.allclose(dense(ids, probs, 1000), reference_probabilities(scores, 1.0, top_p, 0), atol=1e-6)
