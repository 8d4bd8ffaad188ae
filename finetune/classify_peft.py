"""PEFT for classification: adapters (LoRA, prefix or prompt tuning) with ``task_type=SEQ_CLS``,
the new head trained in full (``modules_to_save``), and the export as a plain model.

The export never uses the engine's module (under ZeRO-3 its parameters are partitions): it
builds the same model on CPU from the trained model's config, wraps it the same way, loads the
full weights by name and writes LoRA merged into the base weights, a plain HF classifier. Prefix
and prompt tuning cannot be merged (virtual tokens are inputs, not weights): their adapter
(with the head) is written instead, for ``peft.AutoPeftModelForSequenceClassification``.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.classify_config import PeftSection
from launcher.errors import UserError


def peft_config(cfg: PeftSection, head: list[str]):
    """The peft library's config; ``head``: the new head's parameter names."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    modules = sorted({name.rsplit(".", 1)[0] for name in head})
    if cfg.method == "lora":
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            modules_to_save=modules,
        )
    kind = PrefixTuningConfig if cfg.method == "prefix" else PromptTuningConfig
    return kind(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=cfg.num_virtual_tokens,
        modules_to_save=modules,
    )


def wrap_peft(model: nn.Module, cfg: PeftSection, head: list[str], seed: int) -> nn.Module:
    """``model`` with adapters (its own weights frozen, the head trained); the adapters'
    initial values depend on ``seed`` only. Raises ``UserError`` for modules peft cannot find."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_config(cfg, head))
        except ValueError as exc:
            raise UserError(f"classify.peft: {exc}") from None


def merged(model: nn.Module, state_dict: dict | None) -> nn.Module:
    """A CPU copy of the trained PEFT ``model`` with ``state_dict``'s full weights (default:
    the model's own): LoRA merged into a plain model; prefix/prompt: the PEFT model."""
    from peft import get_peft_model
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    config = model.get_base_model().config
    # The class itself, not from_config: under ZeRO-3 that would build it in zero.Init.
    base = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)](config).float()
    copy = get_peft_model(base, model.peft_config["default"])
    weights = state_dict if state_dict is not None else model.state_dict()
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise KeyError(f"export: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    if model.peft_config["default"].peft_type.value != "LORA":
        return copy
    return copy.merge_and_unload()
