"""Models besides the trained one, and generation inside a step (what RLHF stages need).

A reference or reward model is *frozen*: no optimizer, no gradients, but under ZeRO-3 it must
be sharded like the trained model or every rank holds it whole. ``prepare_frozen`` gives it a
DeepSpeed engine without an optimizer under ZeRO-3 (DeepSpeed then partitions the parameters
and gathers them layer by layer in forward, as for the trained model), and otherwise just
moves it to the device in the run's dtype.

Generation in a ZeRO-3 run cannot go layer by layer: every new token is a forward pass, and
each would gather every layer again, in lock step across ranks whose sequences end at
different lengths. ``generating`` gathers the whole model once for the block (the memory of
one full copy, for the time of the generation; TRL's ``ds3_gather_for_generation``), turns
the KV cache on and activation checkpointing off, and puts everything back after.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from launcher.runtime import Runtime


def prepare_frozen(runtime: Runtime, model: nn.Module) -> nn.Module:
    """``model`` ready for inference in this run: gradients off, eval mode; under ZeRO-3 an
    optimizer-less DeepSpeed engine (sharded), else on the device in the run's dtype."""
    model.requires_grad_(False)
    if runtime.zero_stage != 3:
        return model.to(runtime.device, dtype=runtime.dtype).eval()
    import deepspeed

    config = copy.deepcopy(runtime.ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def checkpointing_switch(module: nn.Module, what: str):
    """transformers' ``activation_checkpointing_<what>`` (5.x), else the older
    ``gradient_checkpointing_<what>`` (deprecated in 5.x, warns; other models, PEFT wrappers);
    None when the model has neither."""
    found = getattr(module, f"activation_checkpointing_{what}", None)
    return found if found is not None else getattr(module, f"gradient_checkpointing_{what}", None)


def is_checkpointing(module: nn.Module) -> bool:
    value = getattr(module, "is_activation_checkpointing", None)
    return bool(value if value is not None else getattr(module, "is_gradient_checkpointing", False))


def enable_checkpointing(module: nn.Module) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs and ZeRO-3)."""
    if getattr(module, "activation_checkpointing_enable", None) is not None:
        module.activation_checkpointing_enable({"use_reentrant": False})
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def generating(runtime: Runtime, model: nn.Module) -> Iterator[nn.Module]:
    """The module behind ``model`` (an engine or a module), set for ``generate()``: whole on
    every rank under ZeRO-3, eval mode, KV cache on, activation checkpointing off, no
    gradients; each restored when the block ends. Every rank must enter the block (ZeRO-3
    gathers are collectives)."""
    module = getattr(model, "module", model)
    config = getattr(module, "config", None)
    training = module.training
    checkpointing = is_checkpointing(module)
    use_cache = getattr(config, "use_cache", None)
    if checkpointing:
        checkpointing_switch(module, "disable")()
    if config is not None:
        config.use_cache = True
    module.eval()
    gathered = contextlib.nullcontext()
    if runtime.zero_stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
    try:
        with gathered, torch.no_grad():
            yield module
    finally:
        if config is not None:
            config.use_cache = use_cache
        if checkpointing:
            enable_checkpointing(module)
        module.train(training)
