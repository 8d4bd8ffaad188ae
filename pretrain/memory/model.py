"""The model a plan is made for: its parameter tensors in closed form, from a preset."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from launcher.config import CONFIG_ROOT, ConfigError, load_config


class PlanError(ValueError):
    """A bad model or setting; the message names the argument."""


# ------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    decay: bool  # which AdamW group launcher/optim.py puts it in (matrices except embeddings)


def param_tensors(cfg) -> list[Tensor]:
    """The parameters of ``build_model(cfg)`` in ``named_parameters()`` order, closed-form.

    The order matters: ZeRO-1/2 cut each group's flat buffer into equal partitions, and which
    parameters straddle a cut decides the size of the gradient buffers."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_size
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    out = [Tensor("model.embed_tokens.weight", cfg.vocab_size * d, False)]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out += [
            Tensor(p + "self_attn.q_proj.weight", d * q, True),
            Tensor(p + "self_attn.k_proj.weight", d * kv, True),
            Tensor(p + "self_attn.v_proj.weight", d * kv, True),
            Tensor(p + "self_attn.o_proj.weight", q * d, True),
            Tensor(p + "mlp.gate_proj.weight", d * f, True),
            Tensor(p + "mlp.up_proj.weight", d * f, True),
            Tensor(p + "mlp.down_proj.weight", f * d, True),
            Tensor(p + "input_layernorm.weight", d, False),
            Tensor(p + "post_attention_layernorm.weight", d, False),
        ]
    out.append(Tensor("model.norm.weight", d, False))
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head.weight", cfg.vocab_size * d, True))
    return out


def load_model(ref: str):
    """A ``ModelConfig`` from a preset name in configs/model/ or a path to a model yaml."""
    from pretrain.model import ModelConfig

    path = Path(ref)
    if not (ref.endswith((".yaml", ".yml")) or "/" in ref):
        path = CONFIG_ROOT / "model" / f"{ref}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
        near = difflib.get_close_matches(ref, presets, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise PlanError(
            f"MODEL_PRESET: no model preset or file '{ref}' (presets in configs/model/: "
            f"{', '.join(presets)}){hint}"
        )
    try:
        cfg = load_config(ModelConfig, path)
    except ConfigError as exc:
        raise PlanError(f"MODEL_PRESET: {exc}") from None
    if cfg.arch != "llama":
        raise PlanError(
            f"MODEL_PRESET: {path} is a {cfg.arch} model; the planner models Llama blocks only "
            "(a BERT encoder's memory is not planned yet)"
        )
    return cfg
