"""Keep a pruned model's zeros at zero while it trains (``init.keep_zeros``).

Why gradient masks and not weight masks: ZeRO-1/2 (and mixed precision) step fp32 master
copies of the weights, which a mask applied to the model's weights after each step would not
reach: the next step would copy the masters back, zeros lost. A gradient that is 0 at a
position keeps AdamW's moments there at 0, so the update is 0 / (0 + eps) = 0, and AdamW's
decoupled decay scales 0 to 0: the weight stays exactly 0 at every ZeRO stage that keeps
whole parameters on each rank. ZeRO-3 partitions the parameters before any hook could see
them whole, so it is refused (a config error) until a test shows the masks there.
"""

from __future__ import annotations

import torch
from torch import nn


def keep_zeros(model: nn.Module) -> dict[str, int]:
    """Mask the gradient of every matrix (a parameter with 2 or more dimensions) at the
    positions that are exactly 0 now; returns the number of such positions by parameter
    name (matrices without zeros get no hook)."""
    kept: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.ndim < 2 or not param.requires_grad:
            continue
        mask = param.detach() != 0
        zeros = int(mask.numel() - mask.sum())
        if zeros == 0:
            continue
        kept[name] = zeros

        def masked(grad: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            return grad * mask.to(device=grad.device, dtype=grad.dtype)

        param.register_hook(masked)
    return kept
