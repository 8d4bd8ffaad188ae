"""``finetune.rl_math`` on 2-6 element fixtures whose expected values are written out by hand
(Python floats, ``math``), each test naming the anchor its formula was checked against."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch

from finetune.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    gae,
    grpo_advantages,
    grpo_token_loss,
    kl_estimate,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)

TOL = 1e-6


def close(actual: torch.Tensor, expected) -> None:
    expected = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, atol=TOL, rtol=0.0)


def two_ranks(call: Callable, half_a, half_b):
    """``call(half, all_reduce)`` as 2 ranks: a first pass records each rank's partial
    statistics (its all_reduce inputs), a second adds the other rank's, as a sum-all-reduce."""
    sent: list[list[torch.Tensor]] = [[], []]
    for rank, half in enumerate((half_a, half_b)):
        call(half, lambda t, rank=rank: sent[rank].append(t.clone()))
    results = []
    for rank, half in enumerate((half_a, half_b)):
        others = iter(sent[1 - rank])
        results.append(call(half, lambda t, others=others: t.add_(next(others))))
    return results


def test_kl_estimators_match_schulman_forms():
    """OpenRLHF ``openrlhf/models/utils.py::compute_approx_kl`` (k1, k2, k3); TRL 1.16
    ``GRPOTrainer._compute_loss`` (k3 as exp(ref - logp) - (ref - logp) - 1)."""
    logp = [[-1.0, -2.0], [-0.5, -3.0]]
    ref = [[-1.5, -1.0], [-0.5, -2.25]]
    d = [[-1.0 - -1.5, -2.0 - -1.0], [-0.5 - -0.5, -3.0 - -2.25]]  # 0.5, -1, 0, -0.75
    k1, k2, k3 = (kl_estimate(torch.tensor(logp), torch.tensor(ref), k) for k in ("k1", "k2", "k3"))
    close(k1, d)
    close(k2, [[0.5 * 0.25, 0.5 * 1.0], [0.0, 0.5 * 0.5625]])
    r = [[-x for x in row] for row in d]  # ref - logp
    close(k3, [[math.exp(x) - x - 1.0 for x in row] for row in r])
    assert float(k3[0, 0]) == pytest.approx(math.exp(-0.5) + 0.5 - 1.0, abs=TOL)  # 0.1065307
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(torch.tensor(logp), torch.tensor(ref), "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_estimate(torch.tensor(logp), torch.tensor(ref[:1]), "k1")


def test_token_rewards_normalise_then_clip_at_last_response_token():
    """TRL legacy ``PPOTrainer.step`` (score norm, then ``score_clip``), OpenRLHF
    ``openrlhf/models/utils.py::compute_reward`` (clip; score at the last action-mask token)."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    score = torch.tensor([3.0, 30.0, 5.0])
    rewards = token_rewards(kl, score, mask, kl_coef=0.5, score_mean=1.0, score_std=2.0)
    s0 = (3.0 - 1.0) / 2.0  # 1.0
    s1 = min((30.0 - 1.0) / 2.0, 10.0)  # 14.5 clipped to 10 (clip first would give 4.5)
    close(
        rewards,
        [
            [-0.5 * 0.1, -0.5 * 0.2 + s0, 0.0],
            [-0.5 * 0.4, -0.5 * 0.5, -0.5 * 0.6 + s1],
            [0.0, 0.0, 0.0],  # empty response: no KL, no score
        ],
    )
    with pytest.raises(ValueError, match="right-padded"):
        token_rewards(kl, score, torch.tensor([[0, 1, 1]] * 3), 0.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="score"):
        token_rewards(kl, score[:2], mask, 0.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="score_std"):
        token_rewards(kl, score, mask, 0.5, 1.0, 0.0)


def test_adaptive_kl_controller_updates_and_resumes_from_json():
    """OpenRLHF ``openrlhf/trainer/ppo_utils/kl_controller.py::AdaptiveKLController`` (= TRL's
    legacy one, Ziegler et al. 2019 section 2.2)."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=256)  # 9/6 - 1 = 0.5, clipped to 0.2
    first = 0.1 * (1.0 + 0.2 * 256 / 10000)  # 0.100512
    assert ctl.value == pytest.approx(first, abs=1e-12)
    state = json.loads(json.dumps(ctl.state_dict()))
    resumed = AdaptiveKLController(0.5, target=6.0)
    resumed.load_state_dict(state)
    for c in (ctl, resumed):
        c.update(torch.tensor(5.4), n_steps=512)  # 5.4/6 - 1 = -0.1, within the clip
    assert resumed.value == ctl.value == pytest.approx(first * (1.0 - 0.1 * 512 / 10000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert json.loads(json.dumps(fixed.state_dict())) == {"value": 0.05}
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0)


def test_gae_zeroes_past_the_end_and_bootstraps_from_zero():
    """TRL PPOv2 ``PPOTrainer.train`` (``for t in reversed(range(gen_length))``), OpenRLHF
    ``experience_maker.py::get_advantages_and_returns`` (rewards, values masked)."""
    rewards = torch.tensor([[1.0, 0.5, 2.0], [0.0, 3.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 77.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    g, gl = 0.9, 0.9 * 0.8
    a02 = 2.0 + g * 0.0 - 1.5  # 0.5
    a01 = (0.5 + g * 1.5 - 1.0) + gl * a02  # 1.21
    a00 = (1.0 + g * 1.0 - 0.5) + gl * a01  # 2.2712
    a12 = 0.0  # past the end: reward and value 0
    a11 = (3.0 + g * 0.0 - 1.0) + gl * a12  # 2.0
    a10 = (0.0 + g * 1.0 - 2.0) + gl * a11  # 0.34
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[a00, a01, a02], [a10, a11, a12]])
    close(ret, [[a00 + 0.5, a01 + 1.0, a02 + 1.5], [a10 + 2.0, a11 + 1.0, 0.0]])
    adv, _ = gae(rewards, values, mask)  # gamma 1, lambda 0.95
    b2 = 2.0 - 1.5
    b1 = (0.5 + 1.5 - 1.0) + 0.95 * b2
    close(adv[0], [(1.0 + 1.0 - 0.5) + 0.95 * b1, b1, b2])


def test_masked_whiten_unbiased_and_shift_mean():
    """TRL ``masked_whiten`` / ``masked_var(unbiased=True)`` (``trl/core.py``, later inline in
    ``trl/experimental/ppo/ppo_trainer.py``), eps 1e-8 inside the rsqrt."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    mean = (1.0 + 2.0 + 3.0 + 4.0) / 4  # 2.5
    var = (1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / (4 - 1)  # 5/3, Bessel-corrected
    inv = 1.0 / math.sqrt(var + 1e-8)
    white = [[(v - mean) * inv for v in (1.0, 2.0, 3.0)], [(4.0 - mean) * inv, 0.0, 0.0]]
    close(masked_whiten(x, mask), white)
    shifted = [[w + mean for w in white[0]], [white[1][0] + mean, 0.0, 0.0]]
    close(masked_whiten(x, mask, shift_mean=False), shifted)
    with pytest.raises(ValueError, match="mask"):
        masked_whiten(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_two_ranks_equal_one(shift_mean):
    """World-size independence (not in TRL, whose ``masked_whiten`` is per process): two
    ranks holding halves of a [4, T] batch give the one-rank result on each half."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen) * 3.0 + 5.0
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0], [1] + [0] * 5])
    whole = masked_whiten(x, mask, shift_mean)
    halves = two_ranks(
        lambda h, ar: masked_whiten(h[0], h[1], shift_mean, ar),
        (x[:2], mask[:2]),
        (x[2:], mask[2:]),
    )
    torch.testing.assert_close(torch.cat(halves), whole, atol=TOL, rtol=0.0)


def test_ppo_policy_loss_clip_and_stats():
    """TRL PPOv2 ``PPOTrainer.train`` (``pg_losses``/``pg_losses2``, ``pg_clipfrac``,
    ``approxkl``), DeepSpeed-Chat ``dschat/rlhf/ppo_trainer.py::actor_loss_fn``."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.2]], requires_grad=True)
    old = torch.tensor([[-1.3, -1.7], [-0.6, -5.0]])
    adv = torch.tensor([[1.0, -2.0], [0.5, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    t00 = max(-1.0 * math.exp(0.3), -1.0 * 1.2)  # ratio 1.3499 clipped to 1.2: -1.2
    t01 = max(2.0 * math.exp(-0.3), 2.0 * 0.8)  # ratio 0.7408 clipped to 0.8: 1.6
    t10 = -0.5 * math.exp(0.1)  # ratio 1.105 inside the clip
    out = ppo_policy_loss(logp, old, adv, mask)
    close(out.loss, (t00 + t01 + t10) / 3)
    close(out.clipfrac, 2 / 3)
    close(out.approxkl, 0.5 * (0.3**2 + 0.3**2 + 0.1**2) / 3)
    close(out.count, 3.0)
    summed = ppo_policy_loss(logp, old, adv, mask, reduction="sum")
    close(summed.loss, t00 + t01 + t10)
    close(summed.clipfrac, 2.0)
    close(summed.approxkl, 0.5 * (0.09 + 0.09 + 0.01))
    # Gradient: clipped tokens give 0, the unclipped one -A ratio / 3, padding 0.
    out.loss.backward()
    close(logp.grad, [[0.0, 0.0], [-0.5 * math.exp(0.1) / 3, 0.0]])
    with pytest.raises(ValueError, match="reduction"):
        ppo_policy_loss(logp, old, adv, mask, reduction="max")
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(logp, old, adv[:, :1], mask)


def test_ppo_policy_loss_ignores_garbage_at_padding():
    """DeepSpeed-Chat ``actor_loss_fn`` masks the log-ratio before exp; TRL fills padding with
    ``INVALID_LOGPROB`` for the same reason: -inf there must give neither inf nor NaN."""
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    out = ppo_policy_loss(
        logp, torch.tensor([[-1.0, 0.0]]), torch.ones(1, 2), torch.tensor([[1, 0]])
    )
    close(out.loss, -1.0)  # ratio 1, A 1
    out.loss.backward()
    close(logp.grad, [[-1.0, 0.0]])


def test_ppo_value_loss_clip():
    """TRL PPOv2 ``PPOTrainer.train`` (``vf_losses1/2``, 0.5 * masked mean of the max,
    ``vf_clipfrac``), DeepSpeed-Chat ``critic_loss_fn``."""
    v = torch.tensor([[1.0, 2.0], [0.5, 9.0]])
    old_v = torch.tensor([[0.5, 2.1], [0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    t00 = max((1.0 - 2.0) ** 2, (0.5 + 0.2 - 2.0) ** 2)  # clipped error 1.69 is larger
    t01 = max((2.0 - 1.0) ** 2, (2.1 - 0.1 - 1.0) ** 2)  # inside the clip: 1, equal
    t10 = max((0.5 + 1.0) ** 2, (0.0 + 0.2 + 1.0) ** 2)  # unclipped 2.25 larger
    out = ppo_value_loss(v, old_v, ret, mask)
    close(out.loss, 0.5 * (t00 + t01 + t10) / 3)
    close(out.clipfrac, 1 / 3)
    summed = ppo_value_loss(v, old_v, ret, mask, reduction="sum")
    close(summed.loss, 0.5 * (t00 + t01 + t10))
    close(summed.count, 3.0)


def test_grpo_advantages_group_batch_none():
    """TRL 1.16 ``grpo_trainer.py::_generate_and_score_completions`` (``nanstd``: Bessel,
    + 1e-4; ``scale_rewards`` group/batch/none; ``frac_reward_zero_std``)."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    centred = [1.0 - 0.5, 0.0 - 0.5, 0.5 - 0.5, 0.0, 0.0, 0.0]  # group means 0.5 and 2
    group_std = math.sqrt((0.25 + 0.25 + 0.0) / (3 - 1))  # 0.5; the second group's is 0
    adv, frac = grpo_advantages(rewards, 3, "group")
    close(adv, [c / (group_std + 1e-4) for c in centred[:3]] + [0.0, 0.0, 0.0])
    close(frac, 0.5)
    batch_mean = (1.0 + 0.0 + 0.5 + 2.0 * 3) / 6  # 1.25
    batch_var = sum((r - batch_mean) ** 2 for r in (1.0, 0.0, 0.5, 2.0, 2.0, 2.0)) / 5  # 0.775
    adv, frac = grpo_advantages(rewards, 3, "batch")
    close(adv, [c / (math.sqrt(batch_var) + 1e-4) for c in centred])
    close(frac, 0.5)
    adv, _ = grpo_advantages(rewards, 3, "none")
    close(adv, centred)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(rewards, 3, "rank")
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(rewards, 4)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(rewards, 1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_two_ranks_equal_one(scale):
    """The batch std and ``frac_reward_zero_std`` over all ranks, as TRL 1.16 computes them on
    gathered rewards; groups stay whole on a rank."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 3.0, -1.0, 0.25, 0.0, 0.0, 0.0])
    whole, frac = grpo_advantages(rewards, 3, scale)
    halves = two_ranks(lambda r, ar: grpo_advantages(r, 3, scale, ar), rewards[:6], rewards[6:])
    torch.testing.assert_close(torch.cat([a for a, _ in halves]), whole, atol=TOL, rtol=0.0)
    for _, f in halves:
        close(f, 0.5)  # 2 of 4 groups have std 0
    close(frac, 0.5)


def grpo_fixture():
    logp = torch.tensor([[-0.7, -1.1, -1.0], [-2.4, -1.5, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.2, -0.9, -1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, ref, torch.tensor([2.0, -1.0]), mask


def test_grpo_token_loss_clip_higher_and_k3():
    """TRL 1.16 ``grpo_trainer.py::_compute_loss`` (``coef_2 = clamp(coef_1, 1 - epsilon_low,
    1 + epsilon_high)``, ``-min``, ``+ beta * per_token_kl`` with k3)."""
    logp, old, ref, adv, mask = grpo_fixture()
    # Row 0, A = 2: ratios e^0.3 (clipped to 1.28), e^-0.1, 1.
    row0 = [-min(2 * math.exp(0.3), 2 * 1.28), -2 * math.exp(-0.1), -2.0]
    # Row 1, A = -1: ratios e^-0.4 (clipped to 0.8: min picks -0.8), e^0.5 (to 1.28: -e^0.5).
    row1 = [-min(-math.exp(-0.4), -0.8), -min(-math.exp(0.5), -1.28), 0.0]
    loss = grpo_token_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    close(loss, [row0, row1])

    def k3(r: float) -> float:  # r = ref - logp
        return math.exp(r) - r - 1.0

    with_kl = [
        [row0[0] + 0.1 * k3(-0.5), row0[1] + 0.1 * k3(0.2), row0[2] + 0.1 * k3(0.0)],
        [row1[0] + 0.1 * k3(0.4), row1[1] + 0.1 * k3(-0.5), 0.0],  # padding: 0
    ]
    close(grpo_token_loss(logp, old, adv, mask, 0.2, 0.28, beta=0.1, ref_logp=ref), with_kl)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_token_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_token_loss(logp, old, torch.ones(3), mask)


def test_aggregate_loss_token_and_sequence():
    """TRL 1.16 ``_compute_loss``: ``dapo`` = sum / global token count (``num_items_in_batch``),
    ``grpo`` = per-sequence token mean (``mask.sum(-1).clamp(min=1.0)``), then mean."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    total, count = aggregate_loss(per_token, mask, "token")
    close(total, 1.0 + 2.0 + 3.0 + 4.0 + 5.0)
    close(count, 5.0)
    total, count = aggregate_loss(per_token, mask, "sequence")
    close(total, (1.0 + 2.0 + 3.0) / 3 + (4.0 + 5.0) / 2 + 0.0)  # the empty row counts, as 0
    close(count, 3.0)
    with pytest.raises(ValueError, match="level"):
        aggregate_loss(per_token, mask, "batch")
    with pytest.raises(ValueError, match="mask"):
        aggregate_loss(per_token, mask[:2], "token")
