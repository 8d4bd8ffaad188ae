"""The optimizer: AdamW parameter groups, clipping and the skip of non-finite steps, LR schedule.

Clipping and the non-finite check live in the optimizer's own ``step()`` rather than in
DeepSpeed's config: every ZeRO stage (0-3, with or without offload) ends by calling the
wrapped torch optimizer's ``step()`` on the gradients of the parameters (or partitions) this
rank owns, so one implementation serves all stages. The global gradient norm is the local
norm all-reduced over ranks when gradients are partitioned (ZeRO >= 1 or bf16) and the local
norm when they are replicated (ZeRO-0 in fp32). A NaN or inf anywhere makes that norm
non-finite on every rank at once, so all ranks skip the same step: parameters and Adam moments
stay exactly as they were.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from launcher.run_config import OptimSection, ScheduleSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for matrices, none for norms, biases and embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A tied lm_head is the embedding (same tensor): no decay for it either.
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]


class SkipNonFinite:
    """Mixin for a torch optimizer: clip by the global norm, skip the step if it is not finite.

    ``partitioned``: each rank holds a disjoint part of the gradients (so norms add up over
    ranks). After ``step()``: ``last_grad_norm`` (pre-clip, a float), ``last_skipped``.
    """

    max_norm: float | None = None
    partitioned: bool = False
    last_grad_norm: float = float("nan")
    last_skipped: bool = False
    skipped_steps: int = 0
    step_called: bool = False

    @torch.no_grad()
    def step(self, *args, **kwargs):
        self.step_called = True
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        square = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            norms = torch._foreach_norm(
                [g.float() if g.dtype != torch.float32 else g for g in grads]
            )
            square = torch.stack(norms).pow(2).sum()
        if self.partitioned and dist.is_available() and dist.is_initialized():
            dist.all_reduce(square)
        norm = float(square.sqrt())  # the one sync point per optimizer step
        self.last_grad_norm = norm
        self.last_skipped = not math.isfinite(norm)
        if self.last_skipped:
            self.skipped_steps += 1
            return None
        if self.max_norm is not None and norm > self.max_norm:
            torch._foreach_mul_(grads, self.max_norm / (norm + 1e-6))
        return super().step(*args, **kwargs)


def build_optimizer(
    groups: list[dict],
    cfg: OptimSection,
    *,
    partitioned: bool,
    base: type[torch.optim.Optimizer] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (or ``base``, e.g. DeepSpeed's CPU Adam for offload) with ``SkipNonFinite``."""
    base = base or torch.optim.AdamW
    cls = type(f"Skipping{base.__name__}", (SkipNonFinite, base), {})
    extra = {}
    if base is torch.optim.AdamW:
        # fused AdamW exists on CUDA and CPU in recent torch; foreach is the fallback
        extra = {"fused": True} if _fused_ok(groups) else {"foreach": True}
    opt = cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)
    opt.max_norm = cfg.grad_clip
    opt.partitioned = partitioned
    for g in opt.param_groups:
        g["base_lr"] = g.get("lr_scale", 1.0) * cfg.lr
    return opt


def _fused_ok(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() for p in params)


def lr_factor(cfg: ScheduleSection, step: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    Linear warmup over ``warmup_steps``, then: cosine or linear decay to ``min_lr_ratio``;
    ``wsd`` stays at the peak and decays linearly over the last ``decay_fraction`` of the
    steps (warmup-stable-decay, MiniCPM); ``constant`` stays at the peak.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total))
        into = step - (total - decay_steps)
        return 1.0 if into < 0 else 1.0 - (1.0 - floor) * min(1.0, (into + 1) / decay_steps)
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps + 1) / span)
    if cfg.kind == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Apply the schedule; returns the learning rate of the first group."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
