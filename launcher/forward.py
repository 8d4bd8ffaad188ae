"""How a batch of ``launcher.data`` goes through an HF causal LM: the one forward every stage
uses, so that packed and padded batches mean the same thing everywhere.

Packed rows (``segment_ids``) get their ``position_ids`` and a block-diagonal causal mask:
position ids alone would still let a token attend to the examples before it in the row (SDPA
and eager attention see only the mask). An encoder (``causal=False``) gets the block-diagonal
mask without the causal triangle: each token sees its whole document and nothing else.
Padded rows (``attention_mask``) are right-padded, so the mask changes nothing for real
tokens; it is passed for models that read it (pooling).
"""

from __future__ import annotations

import torch
from torch import nn


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask: causal, and no attention across packed documents."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones_like(same[0], dtype=torch.bool).tril()
    return _additive(same & causal, dtype)


def block_bidirectional_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask: every token sees its own packed document, all of it."""
    return _additive(segment_ids[:, :, None] == segment_ids[:, None, :], dtype)


def forward_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "", causal: bool = True
) -> torch.Tensor:
    """The logits [B, L, vocab] of the batch's ``<prefix>input_ids``; ``causal=False`` for an
    encoder (bidirectional attention inside each packed document)."""
    kwargs = {}
    if f"{prefix}segment_ids" in batch:
        kwargs["position_ids"] = batch[f"{prefix}position_ids"]
        block = block_causal_mask if causal else block_bidirectional_mask
        kwargs["attention_mask"] = block(batch[f"{prefix}segment_ids"], torch.float32)
    elif f"{prefix}attention_mask" in batch:
        kwargs["attention_mask"] = batch[f"{prefix}attention_mask"]
    if causal:
        kwargs["use_cache"] = False  # an encoder's forward takes no use_cache
    return model(input_ids=batch[f"{prefix}input_ids"], **kwargs).logits
