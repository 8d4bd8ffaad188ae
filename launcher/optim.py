"""The optimizer: AdamW parameter groups, clipping and the skip of non-finite steps, LR schedule.

Who clips, and who skips a step whose gradient norm is NaN or inf, depends on the ZeRO stage:
DeepSpeed's ZeRO optimizers (stages 1-3) and its bf16 optimizer compute the global norm over
all partitions, clip, and skip a non-finite step themselves; they then call the wrapped torch
optimizer once per parameter group (so a norm computed inside ``step()`` would see one group
only). With ZeRO-0 in fp32 DeepSpeed calls our optimizer directly, with the full replicated
gradients of every group, and keeps no norm: then ``SkipNonFinite`` clips and skips. Either
way a skipped step leaves parameters and Adam moments exactly as they were, on every rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from launcher.run_config import OptimSection, ScheduleSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for matrices, none for norms, biases and embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Under ZeRO-3 the model is built inside deepspeed.zero.Init: every parameter is an
        # empty 1-D placeholder and its real shape is `ds_shape`. Judged by `p.ndim`, every
        # matrix would silently lose its weight decay.
        ndim = len(getattr(p, "ds_shape", p.shape))
        # A tied lm_head is the embedding (same tensor): no decay for it either.
        (no_decay if ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]


class SkipNonFinite:
    """Mixin for a torch optimizer. With ``own_clipping`` (ZeRO-0 fp32): clip by the global
    norm and skip the step when it is not finite; ``last_grad_norm`` is the pre-clip norm.
    ``step_called`` tells the loop whether DeepSpeed got as far as the optimizer."""

    max_norm: float | None = None
    own_clipping: bool = False
    last_grad_norm: float = float("nan")
    last_skipped: bool = False
    skipped_steps: int = 0
    step_called: bool = False

    @torch.no_grad()
    def step(self, *args, **kwargs):
        self.step_called = True
        if not self.own_clipping:
            return super().step(*args, **kwargs)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        square = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            norms = torch._foreach_norm(
                [g.float() if g.dtype != torch.float32 else g for g in grads]
            )
            square = torch.stack(norms).pow(2).sum()
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
    own_clipping: bool,
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
    opt.own_clipping = own_clipping
    for g in opt.param_groups:
        g["peak_lr"] = cfg.lr
        g.setdefault("lr_scale", 1.0)
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
    """Apply the schedule to every group, times its ``lr_scale``, read at every step: a task
    changes a group's scale (layer-wise rates, gradual unfreezing: 0 until a layer's turn)
    without rebuilding the optimizer, whose ZeRO partitions were laid out once. Returns the
    schedule's learning rate (scale 1)."""
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * g.get("lr_scale", 1.0) * factor
    return optimizer.param_groups[0]["peak_lr"] * factor
