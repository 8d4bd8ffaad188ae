"""Tensor math of the PPO and GRPO stages: KL estimators, per-token rewards, KL controllers,
GAE, whitening with all-reduced statistics, clipped PPO losses, GRPO advantages and losses.

Shapes: B sequences, T response positions, right-padded; ``mask`` is 1 on response tokens.
Math is fp32 (inputs cast with ``.float()``); statistics that cross ranks are fp64 sums.
``all_reduce(t)`` sums ``t`` in place across ranks (None: one process). Each function names
the TRL / OpenRLHF / DeepSpeed-Chat code it was checked against (read, not copied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], None]
Reduction = Literal["mean", "sum"]

WHITEN_EPS = 1e-8  # inside the rsqrt of masked_whiten, as TRL's masked_whiten
GRPO_STD_EPS = 1e-4  # added to the std, as TRL 1.16 GRPOTrainer


def _mask(mask: Tensor, shape: torch.Size, right_padded: bool = False) -> Tensor:
    """``mask`` as bool, checked against ``shape`` (and for right-padding: 1s then 0s)."""
    if mask.shape != shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)}, expected {tuple(shape)}")
    m = mask.bool()
    if right_padded and bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("mask: must be right-padded (each row 1s then 0s)")
    return m


def _same_shape(name: str, x: Tensor, like: Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(x.shape)}, expected {tuple(like.shape)}")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: Literal["k1", "k2", "k3"]) -> Tensor:
    """Per-token estimate [B, T] of KL(policy || ref) from sampled tokens' log-probs [B, T]
    (Schulman, "Approximating KL divergence"): k1 = logp - ref_logp, k2 = (logp - ref_logp)^2/2,
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (TRL 1.16 GRPO ``_compute_loss``).
    Anchor: OpenRLHF ``compute_approx_kl`` (all three); TRL PPOv2 ``train`` (k1, k3)."""
    _same_shape("ref_logp", ref_logp, logp)
    log_ratio = logp.float() - ref_logp.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # exp(-d) - 1 + d, accurate near d = 0
    raise ValueError(f"kind: unknown KL estimator {kind!r} (k1, k2, k3)")


def token_rewards(
    kl: Tensor,
    score: Tensor,
    mask: Tensor,
    kl_coef: float,
    score_mean: float,
    score_std: float,
    clip: float = 10.0,
) -> Tensor:
    """Rewards [B, T]: -kl_coef * kl on response tokens, plus the sequence score [B] at each
    row's last response token, normalised with the reward model's ``kiln_reward`` statistics
    and then clipped: clamp((score - mean) / std, -clip, clip). 0 outside ``mask``.

    Order: normalise, then clip, as TRL's legacy ``PPOTrainer.step`` (``use_score_norm`` then
    ``score_clip``) and OpenRLHF (the reward model normalises in its forward,
    ``compute_reward`` clips). TRL PPOv2 neither normalises nor clips; DeepSpeed-Chat
    ``compute_rewards`` clips the raw score. Position: the last mask-1 token, as OpenRLHF
    ``compute_reward`` (TRL PPOv2 adds it one past the EOS, where its value mask ends).
    A row with an empty mask gets no score (it has no token to carry it; OpenRLHF would put
    it on the last padding position)."""
    if score_std <= 0:
        raise ValueError(f"score_std: must be > 0, got {score_std}")
    m = _mask(mask, kl.shape, right_padded=True)
    if score.shape != kl.shape[:1]:
        raise ValueError(f"score: shape {tuple(score.shape)}, expected ({kl.shape[0]},)")
    # Zero the KL outside the response so that padding cannot leak into GAE's sums.
    rewards = torch.where(m, -kl_coef * kl.float(), 0.0)
    normalised = ((score.float() - score_mean) / score_std).clamp(-clip, clip)
    lengths = m.sum(-1)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, (lengths - 1).clamp(min=0)] += torch.where(lengths > 0, normalised, 0.0)
    return rewards


class FixedKLController:
    """A constant KL coefficient ``value`` (TRL/OpenRLHF ``FixedKLController``)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No change (the interface of ``AdaptiveKLController.update``)."""

    def state_dict(self) -> dict[str, float]:
        """JSON-safe; target and horizon belong to the config, not the state."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """KL coefficient steered towards ``target`` (Ziegler et al. 2019, section 2.2); anchor:
    OpenRLHF ``kl_controller.AdaptiveKLController`` (read), the same as TRL's legacy one."""

    def __init__(self, value: float, target: float, horizon: int = 10000) -> None:
        if target <= 0:
            raise ValueError(f"target: must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon: must be > 0, got {horizon}")
        super().__init__(value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """value *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon, where
        ``n_steps`` is the number of samples (episodes) the KL was measured on, all ranks."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over [B, T]: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, returns = A + V; (advantages, returns), both 0 outside
    ``mask``. Rewards and values past a row's end count as 0, so the last token bootstraps
    from 0. Anchor: TRL PPOv2 ``train`` (``for t in reversed(range(gen_length))``) and OpenRLHF
    ``get_advantages_and_returns`` (which masks rewards and values the same way)."""
    _same_shape("values", values, rewards)
    m = _mask(mask, rewards.shape, right_padded=True)
    r = torch.where(m, rewards.float(), 0.0)
    v = torch.where(m, values.float(), 0.0)
    next_values = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    deltas = r + gamma * next_values - v
    last = torch.zeros_like(r[:, 0])
    reversed_advantages = []
    for t in reversed(range(r.shape[1])):
        last = deltas[:, t] + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + v


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, all_reduce: AllReduce | None = None
) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of every rank; with
    ``shift_mean=False`` the mean is added back (TRL's whitening of rewards). Same shape as
    ``x``, 0 outside ``mask`` (TRL masks right after its call). The variance is unbiased, as
    TRL ``core.masked_var(unbiased=True)``, the default ``masked_whiten`` uses (OpenRLHF's
    advantage normalisation is biased, clamp 1e-8). Unlike TRL (per process), the statistics
    come from all-reduced sums, so the result does not depend on the world size."""
    m = _mask(mask, x.shape)
    xf = x.float()
    # One collective of fp64 (sum, sum of squares, count): fp64 keeps sum_sq - sum^2 / n
    # accurate for rewards and advantages, where fp32 would cancel.
    x64 = torch.where(m, xf, 0.0).double()
    stats = torch.stack([x64.sum(), x64.square().sum(), m.sum().double()])
    if all_reduce is not None:
        all_reduce(stats)
    total, total_sq, count = stats
    if count < 2:  # the same global count on every rank: all raise together
        raise ValueError(f"mask: needs at least 2 entries over all ranks, got {int(count)}")
    mean = total / count
    var = ((total_sq - total * mean) / (count - 1)).clamp(min=0.0)
    whitened = (xf - mean.float()) * torch.rsqrt(var.float() + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean.float()
    return torch.where(m, whitened, 0.0)


@dataclass(frozen=True)
class PolicyLoss:
    """``loss``, ``clipfrac``, ``approxkl``: masked means (or sums, ``reduction="sum"``) over
    ``count`` tokens; 0-d fp32 tensors, only ``loss`` with a graph."""

    loss: Tensor
    clipfrac: Tensor
    approxkl: Tensor
    count: Tensor


@dataclass(frozen=True)
class ValueLoss:
    """``loss``, ``clipfrac``: masked means (or sums) over ``count`` tokens, as ``PolicyLoss``."""

    loss: Tensor
    clipfrac: Tensor
    count: Tensor


def _reduce(x: Tensor, m: Tensor, reduction: Reduction) -> Tensor:
    # where, not x * m: an inf or NaN at padding must not reach the sum.
    total = torch.where(m, x, 0.0).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":  # clamp: an empty micro-batch gives 0, not NaN, with no host sync
        return total / m.sum().clamp(min=1)
    raise ValueError(f"reduction: unknown {reduction!r} (mean, sum)")


def _log_ratio(logp: Tensor, old_logp: Tensor, m: Tensor) -> Tensor:
    """logp - old_logp, 0 outside ``m``: exp of padding garbage would be inf, and its gradient
    through a later ``where`` NaN (DeepSpeed-Chat ``actor_loss_fn`` masks it the same way)."""
    _same_shape("old_logp", old_logp, logp)
    return torch.where(m, logp.float() - old_logp.float(), 0.0)


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    reduction: Reduction = "mean",
) -> PolicyLoss:
    """Clipped surrogate over [B, T]: ratio = exp(logp - old_logp), per token
    max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)); clipfrac = share of tokens where the
    clipped term is the larger; approxkl = 0.5 (logp - old_logp)^2. ``reduction="sum"`` with
    ``count`` is for kiln's loop, which divides a loss sum by the global item count.
    Anchor: TRL PPOv2 ``train`` (``pg_loss``, ``pg_clipfrac``, ``approxkl``; its approxkl is
    an unmasked mean, ours masked) and DeepSpeed-Chat ``actor_loss_fn``."""
    m = _mask(mask, logp.shape)
    _same_shape("advantages", advantages, logp)
    log_ratio = _log_ratio(logp, old_logp, m)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    with torch.no_grad():
        clipfrac = _reduce((clipped > unclipped).float(), m, reduction)
        approxkl = _reduce(0.5 * log_ratio.square(), m, reduction)
    loss = _reduce(torch.maximum(unclipped, clipped), m, reduction)
    return PolicyLoss(loss, clipfrac, approxkl, m.sum().float())


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    reduction: Reduction = "mean",
) -> ValueLoss:
    """Clipped value loss over [B, T]: v_clip = old_v + clip(v - old_v, -c, c), per token
    0.5 max((v - R)^2, (v_clip - R)^2); clipfrac = share where the clipped error is the
    larger. Anchor: TRL PPOv2 ``train`` (``vf_loss``, ``vf_clipfrac``), DeepSpeed-Chat
    ``critic_loss_fn``."""
    m = _mask(mask, values.shape)
    _same_shape("old_values", old_values, values)
    _same_shape("returns", returns, values)
    v, old_v, ret = values.float(), old_values.float(), returns.float()
    v_clipped = old_v + (v - old_v).clamp(-clip_range, clip_range)
    unclipped, clipped = (v - ret).square(), (v_clipped - ret).square()
    with torch.no_grad():
        clipfrac = _reduce((clipped > unclipped).float(), m, reduction)
    loss = _reduce(0.5 * torch.maximum(unclipped, clipped), m, reduction)
    return ValueLoss(loss, clipfrac, m.sum().float())


def grpo_advantages(
    rewards: Tensor,
    group_size: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    all_reduce: AllReduce | None = None,
) -> tuple[Tensor, Tensor]:
    """(advantages [N*G], frac_reward_zero_std) from rewards [N*G], groups of ``group_size``
    consecutive samples, each group whole on one rank: A = (r - group mean) / (std + 1e-4),
    std the group's (``group``), the whole batch's over all ranks (``batch``), or no division
    (``none``). Stds are unbiased (Bessel), as TRL 1.16 ``_generate_and_score_completions``
    (``nanstd``). frac_reward_zero_std: share of groups, over all ranks, whose std is 0
    (``torch.isclose``, as TRL; TRL's batch mode reports instead whether the batch std is 0).
    NaN (unscorable) rewards are not handled here, unlike TRL."""
    if group_size < 2:
        raise ValueError(f"group_size: must be >= 2, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: shape {tuple(rewards.shape)}, expected (N * {group_size},)")
    grouped = rewards.float().view(-1, group_size)
    std = grouped.std(dim=1, keepdim=True)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards: unknown {scale_rewards!r} (group, batch, none)")
    # One fp64 collective, as masked_whiten: zero-std groups, groups, sum, sum of squares, count.
    r64, zero_std = grouped.double(), torch.isclose(std, torch.zeros_like(std)).sum()
    sums = [
        r64.new_tensor(r64.shape[0]),
        r64.sum(),
        r64.square().sum(),
        r64.new_tensor(r64.numel()),
    ]
    stats = torch.stack([zero_std.double(), *sums])
    if all_reduce is not None:
        all_reduce(stats)
    if scale_rewards == "group":
        advantages = advantages / (std + GRPO_STD_EPS)
    elif scale_rewards == "batch":
        total, total_sq, count = stats[2:]
        var = ((total_sq - total * total / count) / (count - 1)).clamp(min=0.0)
        advantages = advantages / (var.sqrt().float() + GRPO_STD_EPS)
    return advantages.view(-1), (stats[0] / stats[1]).float()


def grpo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
) -> Tensor:
    """Per-token GRPO loss [B, T], 0 outside ``mask``: -min(ratio A, clip(ratio, 1 - eps_low,
    1 + eps_high) A) + beta k3(logp, ref_logp), ratio = exp(logp - old_logp), advantages [B]
    (or [B, T]). Anchor: TRL 1.16 ``_compute_loss``, loss types grpo/dapo/bnpo/dr_grpo (the
    same per-token term; they differ in aggregation only, see ``aggregate_loss``)."""
    m = _mask(mask, logp.shape)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.shape not in ((logp.shape[0], 1), logp.shape):
        raise ValueError(f"advantages: shape {tuple(advantages.shape)}, expected (B,) or (B, T)")
    ratio = torch.exp(_log_ratio(logp, old_logp, m))
    adv = advantages.float()
    loss = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("ref_logp: required when beta != 0")
        _same_shape("ref_logp", ref_logp, logp)
        # Garbage at padding would make k3 (and its gradient) inf: compare 0 with 0 there.
        logp_in, ref_in = torch.where(m, logp.float(), 0.0), torch.where(m, ref_logp.float(), 0.0)
        loss = loss + beta * kl_estimate(logp_in, ref_in, "k3")
    return torch.where(m, loss, 0.0)


def aggregate_loss(
    per_token: Tensor, mask: Tensor, level: Literal["token", "sequence"]
) -> tuple[Tensor, Tensor]:
    """(sum, count) for kiln's loop, which divides the sum by the count summed over all
    micro-batches and ranks. ``token``: sum over masked tokens, count = tokens, so the step's
    loss is the global token mean (TRL 1.16 ``dapo``, its default, and ``cispo``/``vespo``:
    sum / ``num_items_in_batch``, the global token count). ``sequence``: each row's token mean
    (an empty row gives 0), summed, count = rows, the global mean over sequences (TRL 1.16
    ``grpo``/``sapo``: that mean per micro-batch, divided by the accumulation steps, equal
    when micro-batches hold equally many rows). Not offered: TRL's ``bnpo`` (token mean per
    micro-batch) and ``dr_grpo`` (token sum / (B * max_completion_length))."""
    m = _mask(mask, per_token.shape)
    masked = torch.where(m, per_token.float(), 0.0)
    if level == "token":
        return masked.sum(), m.sum().float()
    if level == "sequence":
        per_row = masked.sum(-1) / m.sum(-1).clamp(min=1)
        return per_row.sum(), torch.tensor(float(per_token.shape[0]), device=per_token.device)
    raise ValueError(f"level: unknown {level!r} (token, sequence)")
