"""The model: a Llama-family causal LM, or a BERT encoder, described by a small config section.

``ModelConfig`` holds the shape; ``build_model`` turns it into a ``transformers``
``LlamaForCausalLM`` (pre-norm RMSNorm, RoPE, SwiGLU, optional grouped-query attention, no
biases) or, with ``arch: bert``, a ``BertForMaskedLM`` (post-norm LayerNorm, learned absolute
positions, GELU, biases) for the masked-LM objective, so checkpoints load with
``AutoModelForCausalLM`` / ``AutoModelForMaskedLM`` and work with the rest of the Hugging Face
ecosystem unchanged. ``param_count`` is closed-form for both (huge presets are sized without
building them); ``flops_per_token`` has a formula for Llama only.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from launcher.config import Section

if TYPE_CHECKING:
    from transformers import BertConfig, LlamaConfig, PreTrainedModel
# transformers is imported where a model is built, not here: every `python -m launcher` parent
# process and `kiln slurm submit` validates its config through this module, and the import
# (1.6 s) would be most of their start-up time.

__all__ = [
    "ModelConfig",
    "build_model",
    "describe",
    "flops_per_token",
    "param_count",
    "to_hf_config",
]


class ModelConfig(Section):
    """Shape and initialisation of the model (a Llama causal LM, or a BERT encoder)."""

    arch: Literal["llama", "bert"] = "llama"
    """``llama``: a causal decoder (``objective: causal``); ``bert``: an encoder with a
    masked-LM head (``objective: mlm``)."""
    vocab_size: int = Field(gt=0)
    """Rows of the token embedding; at least the tokenizer's vocabulary size."""
    d_model: int = Field(gt=0)
    """Width of the residual stream (hidden size)."""
    n_layers: int = Field(gt=0)
    """Number of transformer blocks."""
    n_heads: int = Field(gt=0)
    """Query heads per attention layer; must divide d_model into an even head dim."""
    n_kv_heads: int | None = Field(None, gt=0)
    """Key/value heads; null = n_heads (multi-head), fewer = grouped-query attention."""
    ffn_size: int = Field(gt=0)
    """Hidden size of the SwiGLU feed-forward block (Llama's intermediate_size)."""
    max_seq_len: int = Field(gt=0)
    """Longest sequence the model is meant for (max_position_embeddings)."""
    rope_theta: float = Field(10000.0, gt=0)
    """Base of the rotary position embedding frequencies."""
    tie_embeddings: bool = True
    """Share one matrix between the input embedding and the output projection (lm_head)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Attention dropout (Llama's attention_dropout); Llama has no residual dropout."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the normal init of linear and embedding weights."""
    init_scaled_residual: bool = True
    """Init the projections that write into the residual stream (attention o_proj, MLP
    down_proj) at init_std / sqrt(2 * n_layers), as GPT-2, Megatron and torchtitan do;
    false = init_std like every other matrix."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the RMSNorm (Llama) or LayerNorm (BERT) layers."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_heads, or n_heads when unset)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def problems(self) -> Iterable[tuple[str, str]]:
        """Yield head-count problems (shapes an attention layer cannot take), and keys the
        architecture has no use for."""
        if self.arch == "bert":
            yield from self._bert_problems()
            return
        if self.d_model % self.n_heads:
            yield (
                "n_heads",
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})"
                + _examples(_head_choices(self.d_model), self.n_heads),
            )
        elif self.head_dim % 2:
            yield (
                "n_heads",
                f"n_heads ({self.n_heads}) gives an odd head dim d_model / n_heads = "
                f"{self.d_model} / {self.n_heads} = {self.head_dim}; RoPE rotates pairs of "
                "dimensions and needs an even head dim"
                + _examples(_head_choices(self.d_model), self.n_heads),
            )
        if self.kv_heads > self.n_heads or self.n_heads % self.kv_heads:
            divisors = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
            yield (
                "n_kv_heads",
                f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})"
                + _examples(divisors, self.kv_heads),
            )

    def _bert_problems(self) -> Iterable[tuple[str, str]]:
        # BERT has no grouped-query attention and no rotary embedding: a value for either
        # would be silently ignored, so it is an error (one other than the default: a saved
        # resolved config lists every field, and must load again)
        why = {
            "n_kv_heads": "BERT attention has as many key/value heads as query heads",
            "rope_theta": "BERT learns absolute position embeddings (no RoPE)",
        }
        for key, reason in why.items():
            if getattr(self, key) != type(self).model_fields[key].default:
                yield (key, f"does not apply to arch: bert ({reason}); remove it")
        if self.d_model % self.n_heads:
            yield (
                "n_heads",
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})"
                + _examples(_head_choices(self.d_model), self.n_heads),
            )


def _head_choices(d_model: int) -> list[int]:
    """Head counts that divide d_model into even heads, preferring the usual 32..128 head dims."""
    even = [h for h in range(1, d_model + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    return [h for h in even if 32 <= d_model // h <= 128] or even


def _examples(choices: list[int], near: int | None = None, k: int = 4) -> str:
    """'; e.g. a, b, c' with the k choices nearest (on a log scale) to ``near``."""
    if not choices:
        return ""
    if near is not None:
        choices = sorted(choices, key=lambda h: abs(math.log(h / near)))
    return "; e.g. " + ", ".join(str(h) for h in sorted(choices[:k]))


def to_hf_config(
    cfg: ModelConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaConfig | BertConfig:
    """The ``transformers`` config for ``cfg`` (``LlamaConfig`` with no biases, or
    ``BertConfig``), with SDPA attention.

    Special token ids default to None (unlike LlamaConfig's 1 and 2): they belong to the
    tokenizer, so callers pass them when they know them.
    """
    for name, value in [("bos", bos_token_id), ("eos", eos_token_id), ("pad", pad_token_id)]:
        # transformers only warns about out-of-range ids; they would crash generation later
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise ValueError(
                f"{name}_token_id {value} is outside the vocabulary 0..{cfg.vocab_size - 1}"
            )
    if cfg.arch == "bert":
        return _bert_config(cfg, bos_token_id, eos_token_id, pad_token_id)
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,  # explicit, so it never depends on transformers' default
        max_position_embeddings=cfg.max_seq_len,
        # transformers 5 takes RoPE settings as one dict; a bare rope_theta= is legacy
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
        attn_implementation="sdpa",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _bert_config(cfg: ModelConfig, bos: int | None, eos: int | None, pad: int | None) -> BertConfig:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ffn_size,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=1,  # one segment type: kiln packs documents, not sentence pairs
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


ARCHITECTURES = {"llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}
"""The transformers class each ``model.arch`` builds."""


def build_model(
    cfg: ModelConfig,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **special_ids: int | None,
) -> PreTrainedModel:
    """A freshly initialised ``LlamaForCausalLM`` (``BertForMaskedLM`` for ``arch: bert``)
    for ``cfg``, using SDPA attention.

    ``seed`` makes the initial weights reproducible without disturbing the caller's CPU
    random stream (an accelerator's generator is left seeded with it; weights built on a GPU
    differ from CPU-built ones for the same seed). ``device="meta"`` builds the module tree
    without allocating any weights (for counting parameters of huge presets). Without a seed
    the weights are transformers' own init (not ``init_weights``): for models loaded next.
    ``special_ids`` (bos_token_id, eos_token_id, pad_token_id) go into the config.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    hf_config = to_hf_config(cfg, **special_ids)
    auto = AutoModelForMaskedLM if cfg.arch == "bert" else AutoModelForCausalLM
    # allocate weights directly where they will live (and not at all on "meta")
    place = torch.device(device) if device is not None else contextlib.nullcontext()
    with place, torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = auto.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    expected = ARCHITECTURES[cfg.arch]
    if type(model).__name__ != expected:
        raise TypeError(f"expected {expected}, transformers built {type(model).__name__}")
    # transformers can silently fall back to eager attention; we rely on the fused kernel
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"model uses {model.config._attn_implementation!r} attention, not sdpa")
    if seed is not None and torch.device(device or "cpu").type != "meta":
        init_weights(model, cfg, seed)
    return model


RESIDUAL_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "output.dense.weight")
"""Parameter name endings of the matrices whose outputs are added to the residual stream
(Llama's attention and MLP outputs; BERT's ``attention.output.dense`` and ``output.dense``)."""


def residual_init_std(cfg: ModelConfig) -> float:
    """The init std of the residual-stream outputs (``RESIDUAL_OUTPUTS``)."""
    if not cfg.init_scaled_residual:
        return cfg.init_std
    # 2 additions per block: keeps the residual stream's variance at init independent of depth
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Llama's / BERT's init (matrices and embeddings N(0, init_std), norm weights 1, biases 0,
    padding row 0), with the residual-stream outputs at ``residual_init_std(cfg)``; each
    parameter from its own generator seeded by (seed, name).

    Why not the module's own init: the values must not depend on how the model was built.
    Under ZeRO-3 transformers builds it inside ``deepspeed.zero.Init`` (partitioned as it is
    created), which draws the random numbers in another order, and a GPU draws others than a
    CPU; per-name CPU generators give the same weights for every stage, world and device.
    """
    pad = model.config.pad_token_id
    residual_std = residual_init_std(cfg)
    for name, param in model.named_parameters():
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        with _gathered(param):
            if param.numel() == 0:  # a ZeRO-3 rank that does not modify: receives rank 0's
                continue
            if param.ndim == 1:  # norm gains 1; biases (BERT's linears, LayerNorms, head) 0
                fill = 0.0 if name.endswith("bias") else 1.0
                values = torch.full(param.shape, fill)
            else:
                std = residual_std if name.endswith(RESIDUAL_OUTPUTS) else cfg.init_std
                values = torch.empty(param.shape).normal_(0.0, std, generator=generator)
                embedding = name.endswith(("embed_tokens.weight", "word_embeddings.weight"))
                if embedding and pad is not None:
                    values[pad] = 0.0
            with torch.no_grad():
                param.copy_(values.to(param.dtype))


def _gathered(param: torch.Tensor):
    """The full parameter while in the block (ZeRO-3: gathered, written on rank 0)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


def _matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matmuls: attention and MLP projections plus the lm_head."""
    d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
    attn = 2 * d * cfg.n_heads * cfg.head_dim + 2 * d * kv_dim  # q, o and k, v
    mlp = 3 * d * cfg.ffn_size  # gate, up, down
    return cfg.n_layers * (attn + mlp) + cfg.vocab_size * d


def param_count(cfg: ModelConfig) -> int:
    """Exact number of distinct parameters of ``build_model(cfg)`` (tied weights counted once)."""
    if cfg.arch == "bert":
        return _bert_param_count(cfg)
    norms = (2 * cfg.n_layers + 1) * cfg.d_model  # two RMSNorm gains per block, one final
    input_embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return _matmul_params(cfg) + norms + input_embedding


def _bert_param_count(cfg: ModelConfig) -> int:
    d, f, v = cfg.d_model, cfg.ffn_size, cfg.vocab_size
    embeddings = (v + cfg.max_seq_len + 1) * d + 2 * d  # tokens, positions, 1 type; LayerNorm
    block = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d  # q k v o, LN, FFN, LN
    head = d * d + d + 2 * d + v  # transform dense, LayerNorm, output bias
    # untied, transformers gives the decoder its own bias too (tied, it shares the head's)
    decoder = 0 if cfg.tie_embeddings else v * d + v
    return embeddings + cfg.n_layers * block + head + decoder


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float | None:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``; None for
    ``arch: bert`` (no formula yet: MFU is not reported).

    ``6 * N_matmul + 12 * n_layers * d_attn * seq_len`` where

    * ``N_matmul`` counts the weights that take part in matmuls: the attention and MLP
      projections of every block plus the output projection ``vocab_size * d_model``. The
      input embedding is a lookup and costs no FLOPs (when tied, the shared matrix is counted
      once, as the lm_head); RMSNorm gains are elementwise and left out. Each such weight
      costs 2 FLOPs forward and 4 backward (gradients of input and weight): the 6.
    * ``12 * n_layers * d_attn * seq_len`` is attention itself (``d_attn = n_heads *
      head_dim``): QK^T and scores @ V, 2 FLOPs per multiply-add, times 3 for the backward.
      It counts the full (non-causal) score matrix, as PaLM and nanoGPT do, although a causal
      kernel can skip about half of it.

    Elementwise work (norms, RoPE, SwiGLU gating, softmax, loss) is ignored. These are model
    FLOPs (the MFU convention): a flash-attention backward also recomputes QK^T, so the
    hardware does 14 rather than 12 * n_layers * d_attn * seq_len for attention.
    """
    if cfg.arch == "bert":
        return None
    # PaLM (Chowdhery et al. 2022), Appendix B: 6N + 12 L H Q T FLOPs per token
    d_attn = cfg.n_heads * cfg.head_dim
    return 6.0 * _matmul_params(cfg) + 12.0 * cfg.n_layers * d_attn * seq_len


def _human(n: float) -> str:
    """13767552 -> '13.8M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def describe(cfg: ModelConfig, seq_len: int) -> str:
    """A one-line summary: size, shape and training FLOPs per token at ``seq_len``."""
    flops = flops_per_token(cfg, seq_len)
    if flops is None:
        cost = ""
    else:
        mantissa, exponent = f"{flops:.1e}".split("e")
        cost = f" {mantissa}e{int(exponent)} FLOPs/token at seq {seq_len}"
    heads = f"{cfg.n_heads} heads" + (
        f" / {cfg.kv_heads} kv" if cfg.kv_heads != cfg.n_heads and cfg.arch == "llama" else ""
    )
    return (
        f"{ARCHITECTURES[cfg.arch]} {_human(param_count(cfg))} params ({cfg.n_layers} layers x "
        f"{cfg.d_model}, {heads}, ffn {cfg.ffn_size}, vocab {cfg.vocab_size}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'}){cost}"
    )
