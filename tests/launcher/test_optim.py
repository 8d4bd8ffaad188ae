"""Optimizer groups and learning-rate schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from launcher.optim import build_optimizer, lr_factor, param_groups
from launcher.run_config import OptimSection, ScheduleSection
from pretrain.model import ModelConfig, build_model


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4
    llama = build_model(
        ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, ffn_size=32, max_seq_len=8)
    )
    groups = param_groups(llama, 0.1)
    embedding = llama.get_input_embeddings().weight
    assert any(p is embedding for p in groups[1]["params"])  # tied lm_head: no decay either
    assert all(p.ndim == 2 for p in groups[0]["params"])


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_schedules_warm_up_linearly_then_follow_their_shape(kind):
    cfg = ScheduleSection(kind=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    factors = [lr_factor(cfg, step, 100) for step in range(100)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    if kind == "constant":
        assert set(factors[10:]) == {1.0}
    else:
        assert factors[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    if kind == "cosine":
        assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 46 / 90)))
    if kind == "wsd":
        assert set(factors[10:80]) == {1.0} and factors[80] < 1.0


def test_own_clipping_clips_to_the_norm_and_skips_non_finite_steps():
    w = nn.Parameter(torch.ones(4))
    opt = build_optimizer(
        [{"params": [w]}], OptimSection(lr=0.1, grad_clip=1.0, weight_decay=0), own_clipping=True
    )
    w.grad = torch.full((4,), 3.0)  # norm 6
    opt.step()
    assert opt.last_grad_norm == pytest.approx(6.0) and not opt.last_skipped
    assert w.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    before = w.detach().clone()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    w.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    opt.step()
    assert opt.last_skipped and opt.skipped_steps == 1
    assert torch.equal(w.detach(), before)
    assert all(torch.equal(opt.state[w][k], v) for k, v in state.items())
