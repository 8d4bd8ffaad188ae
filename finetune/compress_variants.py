"""The compressed variants of an HF model: int8 through torchao, magnitude pruning through
``torch.nn.utils.prune``, and structured MLP-channel pruning that gives a smaller model of
the same class. Each returns a model that ``save_pretrained`` writes as a plain HF directory
(no format of our own: any tool with transformers, and torchao for int8, loads it)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from launcher.errors import UserError


class CompressError(UserError):
    """A model that this compression cannot apply to (named in the message)."""


def quantization_config(kind: str):
    """transformers' ``TorchAoConfig`` for ``int8-weight`` or ``int8-dynamic``. Only the
    Linear layers of the blocks are quantized: embeddings, norms and the output head (often
    the input embedding, tied) stay in full precision (``include_input_output_embeddings``
    stays False)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    quant = {
        "int8-weight": Int8WeightOnlyConfig,
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
    }
    return TorchAoConfig(quant_type=quant[kind]())


def architecture(model: nn.Module) -> str:
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    return f"{names[0]} (model_type {model.config.model_type!r})"


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` but the output head. Raises ``CompressError`` naming the
    architecture when there is none."""
    head = model.get_output_embeddings()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if not found:
        raise CompressError(
            f"{architecture(model)} has no nn.Linear layer besides its output head: nothing "
            "to quantize or prune"
        )
    return found


def prune_unstructured(model: nn.Module, sparsity: float, scope: str) -> dict[str, float]:
    """Set the ``sparsity`` share of the smallest-magnitude prunable weights to 0 (one global
    threshold, or per layer), made permanent (no masks or ``weight_orig`` left in the state
    dict). Returns each layer's share of zeros."""
    layers = prunable_linears(model)
    if scope == "global":
        params = [(module, "weight") for _, module in layers]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for _, module in layers:
            prune.l1_unstructured(module, "weight", amount=sparsity)
    for _, module in layers:
        prune.remove(module, "weight")
    return {name: float((m.weight == 0).float().mean()) for name, m in layers}


def zero_share(model: nn.Module) -> float:
    """Share of the prunable weights that are exactly 0."""
    layers = prunable_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return zeros / sum(m.weight.numel() for _, m in layers)


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The gate/up/down MLPs of a Llama-style model (Llama, Mistral, Qwen2 name them so).
    Raises ``CompressError`` naming the architecture when it has none."""
    mlps = [
        m
        for m in model.modules()
        if all(
            isinstance(getattr(m, p, None), nn.Linear)
            for p in ("gate_proj", "up_proj", "down_proj")
        )
    ]
    if not mlps:
        raise CompressError(
            f"{architecture(model)} has no gated MLP (gate_proj / up_proj / down_proj Linear "
            "layers): structured FFN pruning knows Llama-style blocks only"
        )
    return mlps


def channel_norms(mlp: nn.Module) -> torch.Tensor:
    """Each intermediate channel's gate-row x up-row x down-column L2 norms."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    return gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)


@torch.no_grad()
def channel_activations(
    model: nn.Module, batches: list[dict[str, torch.Tensor]]
) -> list[torch.Tensor]:
    """Each MLP's mean |act(gate(x)) * up(x)| per channel over the batches' real tokens (the
    input of down_proj, caught by a hook)."""
    from launcher.forward import forward_logits

    mlps = gated_mlps(model)
    sums = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]
    count = 0
    current: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def record(_module, inputs):
            keep = current["keep"]
            sums[index].add_(inputs[0].abs()[keep].double().sum(0))

        return record

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        for batch in batches:
            current["keep"] = batch["targets"] != -100
            count += int(current["keep"].sum())
            forward_logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


@torch.no_grad()
def prune_ffn(model: nn.Module, fraction: float, scores: list[torch.Tensor]) -> nn.Module:
    """A new model of the same class whose MLPs keep the ``1 - fraction`` highest-scoring
    channels of each layer (rows of gate/up, columns of down), with ``intermediate_size``
    lowered in its config: a normal model any tool loads. ``model`` is left unchanged."""
    mlps = gated_mlps(model)
    width = mlps[0].down_proj.in_features
    keep = round(width * (1 - fraction))
    if keep < 1 or keep == width:
        raise CompressError(
            f"ffn.fraction {fraction} of {width} channels removes {width - keep}: choose a "
            "fraction that removes at least one channel and keeps at least one"
        )
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.intermediate_size = keep
    smaller = type(model)(config).to(model.dtype)
    state = model.state_dict()
    names = {id(m): n for n, m in model.named_modules()}
    for mlp, score in zip(mlps, scores, strict=True):
        kept = torch.topk(score, keep).indices.sort().values
        prefix = names[id(mlp)]
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            key = f"{prefix}.{proj}.weight"
            state[key] = state[key].index_select(dim, kept)
            if f"{prefix}.{proj}.bias" in state and dim == 0:
                state[f"{prefix}.{proj}.bias"] = state[f"{prefix}.{proj}.bias"][kept]
    smaller.load_state_dict(state)
    if model.config.tie_word_embeddings:
        smaller.tie_weights()
    return smaller
