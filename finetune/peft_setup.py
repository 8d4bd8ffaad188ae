"""The model an SFT run trains and exports: the parent, optionally wrapped by peft
(LoRA / prefix tuning / prompt tuning), and how it leaves the run as an HF directory.

The export never uses the engine's module: under ZeRO-3 its parameters are partitions. It
builds the same model on CPU from the parent's ``config.json``, loads the full weights by
name (the runner's gathered state dict, or a checkpoint's safetensors), and writes a plain
model: LoRA merged into the base weights; prefix and prompt tuning cannot be merged (their
virtual tokens are not weights of the base model), so their adapter alone is written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.config import PeftSection
from launcher.errors import UserError


def peft_config(cfg: PeftSection):
    """The peft library's config for ``cfg``."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    if cfg.method == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
        )
    kind = PrefixTuningConfig if cfg.method == "prefix" else PromptTuningConfig
    return kind(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)


def wrap(model: nn.Module, cfg: PeftSection | None, seed: int) -> nn.Module:
    """``model`` with ``cfg``'s adapters (its own parameters frozen), or as is; the adapters'
    initial values depend on ``seed`` only (every rank builds the same model)."""
    if cfg is None:
        return model
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_config(cfg))
        except ValueError as exc:  # e.g. target modules not found in the model
            raise UserError(f"peft: {exc}") from None


def load_parent(path: str | Path, cfg: PeftSection | None, seed: int) -> nn.Module:
    """The parent model from its HF directory (fp32), wrapped by ``cfg``."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return wrap(model, cfg, seed)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def export_model(
    weights: dict[str, torch.Tensor],
    config_dir: Path,
    cfg: PeftSection | None,
    out: Path,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``out`` from full ``weights`` (named as in the trained, maybe peft-wrapped
    model) and the parent's ``config.json`` in ``config_dir``. Raises ``KeyError`` naming
    the weights that are missing or unexpected."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(config_dir)
    # The class itself, not from_config: under ZeRO-3 that would build it inside zero.Init,
    # whose collectives hang when the main rank exports alone.
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).float()
    model = wrap(base, cfg, seed=0)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.endswith("lm_head.weight"))]
    # one tensor under two names (prefix tuning's word_embeddings is the base embedding):
    # a checkpoint stores it once, under either name
    state = model.state_dict(keep_vars=True)
    aliases: dict[int, set[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), set()).add(name)
    missing = [m for m in missing if not aliases[id(state[m])] & weights.keys()]
    if missing or unexpected:
        raise KeyError(f"export: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    if cfg is not None and cfg.method != "lora":
        model.to(dtype).save_pretrained(out, safe_serialization=True)  # the adapter only
        return
    if cfg is not None:
        model = model.merge_and_unload()
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)


def refuse_merge(method: str | None) -> str | None:
    """Why a merged export is impossible for adapters of ``method`` (None: it is possible)."""
    if method in ("prefix", "prompt"):
        return (
            f"peft.method={method}: virtual tokens are inputs, not weights of the base "
            "model, so they cannot be merged; the export writes the adapter alone (load it "
            "with peft.PeftModel.from_pretrained on the parent)"
        )
    return None


def checkpoint_merge_refusal(folder: Path) -> str | None:
    """``refuse_merge`` for a checkpoint folder, from the ``peft`` section of its saved
    config.yaml (``Stage.merge_refusal`` of the stages with adapters: SFT keeps it at the top,
    classification under ``classify``)."""
    import yaml

    saved = yaml.safe_load((Path(folder) / "config.yaml").read_text()) or {}
    peft = saved.get("peft") or (saved.get("classify") or {}).get("peft")
    return refuse_merge(peft.get("method", "lora")) if peft else None


@contextlib.contextmanager
def reference_model(frozen: nn.Module | None, model: nn.Module):
    """The reference of DPO and GRPO: the frozen copy of the parent when there is one, else
    the trained ``model`` (engine or module) with its LoRA adapters disabled."""
    if frozen is not None:
        yield frozen
        return
    with getattr(model, "module", model).disable_adapter():
        yield model
