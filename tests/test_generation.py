"""Batched generation: the fast top-p equals transformers' warpers; batches follow length order."""

from __future__ import annotations

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from rega.modules.generation import TemperatureTopP, length_sorted_batches


def reference(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    return TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, scores.clone()))


def test_fast_top_p_equals_transformers():
    torch.manual_seed(0)
    peaked = torch.randn(6, 5000) * 4  # nucleus within the top 256 tokens
    flat = torch.randn(3, 5000) * 0.01  # nucleus wider than 256 tokens: the fallback path
    scores = torch.cat([peaked, flat])
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    for temperature, top_p in ((0.7, 0.95), (1.0, 0.5), (1.3, 0.99)):
        ours = TemperatureTopP(temperature, top_p)(ids, scores.clone())
        theirs = reference(scores, temperature, top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_length_sorted_batches_cover_every_prompt_once():
    lengths = [5, 1, 9, 3, 7, 7, 2]
    batches = length_sorted_batches(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [lengths[i] for i in batches[0]] == [9, 7, 7]
    capped = length_sorted_batches(lengths, batch_size=3, max_batch_tokens=14)
    assert all(max(lengths[i] for i in b) * len(b) <= 14 or len(b) == 1 for b in capped)
