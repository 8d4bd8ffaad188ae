"""The classifier: the parent with a new head, its seeded init, freezing and layer-wise groups.

``AutoModelForSequenceClassification`` pools as the architecture does: decoders (Llama...) the
last token that is not padding (``pad_token_id``), encoders (BERT...) their [CLS] token. The
new head (every parameter the parent's weights did not hold) is initialised by name from
seeded generators, not by the module's own init, so the values do not depend on how the model
was built (ZeRO-3 builds it partitioned, drawing in another order).

Layer-wise learning rates: a parameter's *depth* counts blocks from the top: the head, final
norm and pooler 0, block ``i`` of ``L`` ``L - i``, the embeddings ``L + 1``; its group's
``lr_scale`` is ``layer_decay ** depth``. Gradual unfreezing keeps the groups and sets the
scale of the layers not yet unfrozen to 0 (AdamW leaves a parameter at lr 0 bitwise as it
is: its decay term is multiplied by lr), so ZeRO's optimizer is never rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from launcher.hf_dir import CAUSAL_LM, is_architecture

_BLOCK = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def is_decoder(path: str | Path) -> bool:
    """Whether the HF directory holds a causal LM (pools its last non-pad token)."""
    return is_architecture(path, CAUSAL_LM)


def load_classifier(
    path: str | Path, labels: list[str], pad_id: int, seed: int, std: float | None = None
) -> tuple[nn.Module, list[str]]:
    """The parent at ``path`` with a new ``len(labels)``-way head, initialised from ``seed``;
    returns the model and the names of the parameters the parent did not hold."""
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=pad_id,
        dtype=torch.float32,
        output_loading_info=True,
    )
    new = sorted(set(info["missing_keys"]))
    init_new(model, new, seed, std if std is not None else model.config.initializer_range)
    return model, new


def init_new(model: nn.Module, names: list[str], seed: int, std: float) -> None:
    """Matrices N(0, std), norm weights 1, biases 0; each from a generator seeded by
    ``(seed, name)``."""
    params = dict(model.named_parameters())
    for name in names:
        param = params.get(name)
        if param is None:  # a buffer
            continue
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        with _gathered(param):
            if param.numel() == 0:  # a ZeRO-3 rank that does not modify: gets rank 0's
                continue
            if param.ndim >= 2:
                values = torch.empty(param.shape).normal_(0.0, std, generator=generator)
            elif "norm" in name.lower() and name.endswith("weight"):
                values = torch.ones(param.shape)
            else:
                values = torch.zeros(param.shape)
            with torch.no_grad():
                param.copy_(values.to(param.dtype))


def _gathered(param: torch.Tensor):
    if hasattr(param, "ds_id"):  # ZeRO-3: the full parameter, written on rank 0
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


def freeze_backbone(model: nn.Module, head: list[str]) -> None:
    """Every parameter but the new head's stops training (checkpoints keep its value)."""
    keep = set(head)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def num_layers(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model, "config") else None
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        found = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))]
        layers = max(found, default=-1) + 1
    return int(layers)


def depth(name: str, layers: int) -> int:
    """Blocks between a parameter and the top (see the module's doc)."""
    match = _BLOCK.search(name)
    if match is not None:
        return layers - int(match.group(1))
    if "embed" in name or "wte" in name or "wpe" in name:
        return layers + 1
    return 0


def layer_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """One AdamW group per (depth, decay or not), ``lr_scale = decay ** depth``; no weight
    decay for norms, biases and embeddings (``launcher.optim.param_groups``' rule)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    layers = num_layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3: 1-D placeholders
        decays = ndim >= 2 and id(param) not in embeddings
        d = depth(name, layers)
        group = groups.setdefault(
            (d, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "name": f"depth{d}.{'decay' if decays else 'no_decay'}",
                "depth": d,
                "lr_scale": decay**d,
                "base_scale": decay**d,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def unfrozen_depth(epoch: int, every: int | None) -> int | None:
    """Gradual unfreezing: the deepest depth that trains in ``epoch`` (0-based): the head (0)
    first, one more block every ``every`` epochs; None: everything trains."""
    return None if every is None else epoch // every


def apply_unfreezing(groups: list[dict], epoch: int, every: int | None) -> None:
    """Set each group's ``lr_scale`` for ``epoch``: its base scale, or 0 while frozen."""
    deepest = unfrozen_depth(epoch, every)
    for group in groups:
        trains = deepest is None or group["depth"] <= deepest
        group["lr_scale"] = group["base_scale"] if trains else 0.0


def saved_labels(config: dict) -> list:
    """A saved classifier's labels by class index, from its config.json's ``id2label`` (keys
    are the indices as strings; a missing index reads as None, so a gap never matches)."""
    id2label = config.get("id2label") or {}
    return [id2label.get(str(i)) for i in range(len(id2label))]
