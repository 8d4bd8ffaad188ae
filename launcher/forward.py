"""How a batch of ``launcher.data`` goes through an HF causal LM: the one forward every stage
uses, so that packed and padded batches mean the same thing everywhere.

Packed rows (``segment_ids``) get their ``position_ids`` and a block-diagonal causal mask:
position ids alone would still let a token attend to the examples before it in the row (SDPA
and eager attention see only the mask). Padded rows (``attention_mask``) are right-padded, so
the mask changes nothing for real tokens; it is passed for models that read it (pooling).
"""

from __future__ import annotations

import torch
from torch import nn


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask: causal, and no attention across packed documents."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones_like(same[0], dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def forward_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = ""
) -> torch.Tensor:
    """The logits [B, L, vocab] of the batch's ``<prefix>input_ids``."""
    kwargs = {}
    if f"{prefix}segment_ids" in batch:
        kwargs["position_ids"] = batch[f"{prefix}position_ids"]
        kwargs["attention_mask"] = block_causal_mask(batch[f"{prefix}segment_ids"], torch.float32)
    elif f"{prefix}attention_mask" in batch:
        kwargs["attention_mask"] = batch[f"{prefix}attention_mask"]
    return model(input_ids=batch[f"{prefix}input_ids"], use_cache=False, **kwargs).logits
