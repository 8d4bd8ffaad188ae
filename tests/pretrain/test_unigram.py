"""The unigram baseline beside validation bits per byte: the bits the best unigram model of
the validation tokens needs (their own frequencies)."""

from __future__ import annotations

import math

import torch

from pretrain.task import unigram_bits


def test_unigram_bits_is_the_tokens_entropy_under_their_own_frequencies():
    counts = torch.tensor([1.0, 0.0, 1.0, 2.0])  # p = 1/4, 1/4, 1/2; an unseen id
    assert unigram_bits(counts) == 2 * 2.0 + 2 * 1.0
    tokens = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=64).double()
    direct = -sum(math.log2(counts[t] / len(tokens)) for t in tokens.tolist())
    assert abs(unigram_bits(counts) - direct) < 1e-6 * direct


def test_no_unigram_model_beats_it():
    """Any other distribution over the same ids (here: smoothed, uniform) needs more bits."""
    counts = torch.tensor([5.0, 3.0, 1.0, 1.0])
    best = unigram_bits(counts)
    for q in (torch.full((4,), 0.25), (counts + 1) / (counts + 1).sum()):
        assert -(counts * torch.log2(q)).sum().item() > best
