"""What a checkpoint holds, and how it gets out of (and back into) a DeepSpeed engine.

The format does not depend on the ZeRO stage or the world size that wrote it: for every
parameter (by name) the full fp32 master value and its Adam moments, gathered with DeepSpeed's
``safe_get_full_*`` helpers and spread over ``model-<rank>-of-<world>.safetensors`` /
``optimizer-...`` files (balanced by size: ``launcher.checkpoint.balance``). Loading reads
whatever it needs from whichever file holds it and sets the local partitions with
``safe_set_full_*``: a checkpoint of ZeRO-3 on 2 ranks loads on 1 rank or under ZeRO-2 as is
(this is our "consolidation", instead of DeepSpeed's own pickled shards plus a
universal-checkpoint conversion). Per-rank files hold the data stream and RNG states.
Where the fp32 masters and moments live depends on the optimizer wrapper DeepSpeed chose for
the stage and precision; ``masters`` is the one place that maps a model parameter to them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from launcher.checkpoint import balance

MOMENTS = ("exp_avg", "exp_avg_sq")


def _uses_deepspeed_fragments(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return sorted(model.named_parameters())


def frozen_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that is not trained (``requires_grad`` False: a
    LoRA base, a frozen backbone, layers not unfrozen yet), sorted by name. They have no
    optimizer state and no fp32 master: a checkpoint holds their values only."""
    return [(n, p) for n, p in named_parameters(model) if not p.requires_grad]


def _full_value(param: nn.Parameter) -> torch.Tensor:
    """A frozen parameter's whole value (ZeRO-3: gathered from its partitions, a collective
    every rank must join)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach()


def _numel(param: nn.Parameter) -> int:
    """Elements of the whole parameter (a ZeRO-3 parameter holds none outside a forward)."""
    return param.ds_numel if hasattr(param, "ds_id") else param.numel()


# ---------------------------------------------------------------------------- optimizer state


def inner_states(optimizer: torch.optim.Optimizer, engine) -> list[tuple[torch.Tensor, dict, dict]]:
    """(parameter, state, group) for every tensor the wrapped torch optimizer updates: the flat
    fp32 partitions under ZeRO >= 1, the model parameters under ZeRO-0. (ZeRO-3 lends each
    partition to a group only during its step, so they are taken from DeepSpeed itself.)"""
    zero = getattr(engine, "optimizer", None)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        groups = [optimizer.param_groups[zero.sub_group_to_group_id[i]] for i in range(len(flats))]
        pairs = list(zip(flats, groups, strict=True))
    else:
        pairs = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    return [(p, optimizer.state[p], g) for p, g in pairs]


def ensure_moments(optimizer: torch.optim.Optimizer, engine) -> None:
    """Adam creates its moments at its first step, but DeepSpeed's ZeRO-1/2 link their
    per-parameter views of the optimizer state just *before* that first step and never again,
    so the views stay empty and the moments can never be read or set by name. Creating the
    zeros (exactly what AdamW would create) before the first step, then linking, avoids that;
    it also lets a checkpoint load into a fresh engine."""
    created = False
    for p, state, group in inner_states(optimizer, engine):
        if "exp_avg" in state:
            continue
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = torch.zeros(
            (), dtype=torch.float32, device=p.device if on_device else "cpu"
        )
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        created = True
    zero = getattr(engine, "optimizer", None)
    if created and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def undo_initial_step(optimizer: torch.optim.Optimizer, engine) -> bool:
    """DeepSpeed's ``FP16_UnfusedOptimizer`` (ZeRO-0 in bf16) allocates Adam's state by running
    one optimizer step on zero gradients as it is built: AdamW's weight decay then shrinks
    every fp32 master by ``lr x weight_decay`` and the step count starts at 1, i.e. training
    starts from other weights and with other bias corrections than every other stage. Put the
    masters back to the model's weights (their source) and the count to 0; the moments are
    zeros already. Call once, right after the engine is built. Returns whether it undid one."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = getattr(engine, "optimizer", None)
    if not isinstance(wrapper, FP16_UnfusedOptimizer):
        return False
    wrapper.refresh_fp32_params()
    set_adam_step(optimizer, engine, 0.0)
    return True


def adam_step(optimizer: torch.optim.Optimizer, engine) -> float:
    for _, state, _ in inner_states(optimizer, engine):
        if "step" in state:
            return float(state["step"])
    return 0.0


def set_adam_step(optimizer: torch.optim.Optimizer, engine, step: float) -> None:
    for _, state, _ in inner_states(optimizer, engine):
        if "step" in state:
            value = state["step"]
            state["step"] = torch.full_like(value, step) if torch.is_tensor(value) else step


@dataclass(frozen=True, eq=False)
class Master:
    """One model parameter's fp32 master value and Adam moments, wherever DeepSpeed keeps them.

    ``whole`` is the full fp32 master on this rank, its moments being
    ``optimizer.state[whole]``: the parameter itself without a wrapper (ZeRO-0 in fp32), or
    the wrapper's fp32 clone (``FP16_UnfusedOptimizer``, ZeRO-0 in bf16; the bf16 parameter
    has no optimizer state). ``None``: fragments of flat fp32 partitions that the parameter
    reaches through DeepSpeed (``ds_id`` under ZeRO-3, ``_hp_mapping`` under ZeRO-1/2 and the
    ``BF16_Optimizer``), read and set with its ``safe_*_full_*`` helpers (collectives)."""

    param: nn.Parameter
    whole: torch.Tensor | None
    optimizer: torch.optim.Optimizer

    def get(self, key: str | None) -> torch.Tensor:
        """The full fp32 value (``key`` None) or Adam moment, on the device it lives on."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.whole is None:
            if key is None:
                return safe_get_full_fp32_param(self.param).detach()
            return safe_get_full_optimizer_state(self.param, key).detach()
        return (self.whole if key is None else self.optimizer.state[self.whole][key]).detach()

    def set(self, key: str | None, value: torch.Tensor) -> None:
        """Set the master value (and the weight the forward pass uses) or a moment."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(torch.float32)
        if self.whole is None:
            target = value.to(_fp32_device(self.param))
            if key is None:
                safe_set_full_fp32_param(self.param, target)
            else:
                safe_set_full_optimizer_state(self.param, target, key)
        else:
            with torch.no_grad():
                stored = self.whole if key is None else self.optimizer.state[self.whole][key]
                stored.copy_(value.to(stored.dtype))
        if key is None and self.whole is not self.param:
            _set_model_weight(self.param, value)


def masters(model: nn.Module, optimizer, engine) -> list[tuple[str, Master]]:
    """(name, master) of every trained parameter, sorted by name, for the optimizer wrapper
    DeepSpeed chose for this stage and precision (``engine.optimizer``).

    Raises ``RuntimeError`` naming the wrapper and the parameter when a parameter's master
    cannot be found (a wrapper this module does not know, e.g. the fused FP16_Optimizer)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = getattr(engine, "optimizer", optimizer)
    whole: dict[int, torch.Tensor] = {}
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            whole.update({id(lo): hi for lo, hi in zip(lows, highs, strict=True)})
    elif wrapper is optimizer:
        whole.update({id(p): p for g in optimizer.param_groups for p in g["params"]})
    out = []
    for name, param in named_parameters(model):
        if not param.requires_grad:
            continue  # frozen: no master (frozen_parameters)
        if id(param) in whole:
            out.append((name, Master(param, whole[id(param)], optimizer)))
        elif _uses_deepspeed_fragments(param):
            out.append((name, Master(param, None, optimizer)))
        else:
            raise RuntimeError(
                f"launcher/snapshot.py: no fp32 master for parameter {name!r} under DeepSpeed's "
                f"{type(wrapper).__name__} (ZeRO-{_zero_stage(engine)}); checkpoints know "
                "ZeRO 1-3, BF16_Optimizer, FP16_UnfusedOptimizer and the unwrapped optimizer"
            )
    return out


def _zero_stage(engine) -> int | str:
    try:
        return engine.zero_optimization_stage()
    except AttributeError:
        return "?"


def _fp32_device(param: nn.Parameter) -> torch.device:
    return param.device if param.device.type != "meta" else torch.device("cpu")


def _set_model_weight(param: nn.Parameter, value: torch.Tensor) -> None:
    """The (possibly bf16, possibly partitioned) weight the forward pass uses."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if param.numel():
                param.copy_(value.to(param.dtype))
    else:
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def save_weights(
    model: nn.Module, optimizer, engine, folder: Path, rank: int, world: int
) -> list[str]:
    """Write this rank's share of every parameter and its moments; every rank must call it."""
    ensure_moments(optimizer, engine)
    weights, moments = {}, {}
    params = masters(model, optimizer, engine)
    frozen = frozen_parameters(model)
    # frozen values weigh a third of a trained parameter (no moments) in the balance
    sizes = [3 * _numel(m.param) for _, m in params] + [_numel(p) for _, p in frozen]
    owners = balance(sizes, world)
    for (name, param), owner in zip(frozen, owners[len(params) :], strict=True):
        value = _full_value(param)  # every rank joins the ZeRO-3 gather
        if owner == rank:
            weights[name] = value.float().cpu().contiguous()
    for (name, master), owner in zip(params, owners[: len(params)], strict=True):
        for key in (None, *MOMENTS):
            # Every rank takes part in the gather, but only the owner copies the value to the
            # host: on GPUs the other ranks' copies were (world - 1) / world of a save's
            # device-to-host traffic, thrown away.
            value = master.get(key)
            if owner != rank:
                continue
            host = value.float().cpu().contiguous()
            if key is None:
                weights[name] = host
            else:
                moments[f"{name}::{key}"] = host
    suffix = f"{rank:05d}-of-{world:05d}.safetensors"
    save_file(weights, str(folder / f"model-{suffix}"), metadata={"format": "kiln-fp32"})
    save_file(moments, str(folder / f"optimizer-{suffix}"), metadata={"format": "kiln-adam"})
    return [f"model-{suffix}", f"optimizer-{suffix}"]


def load_weights(model: nn.Module, optimizer, engine, folder: Path) -> None:
    """Set every parameter and its moments from a checkpoint of any stage or world size."""
    ensure_moments(optimizer, engine)
    where: dict[str, Path] = {}
    for path in sorted(folder.glob("model-*.safetensors")) + sorted(
        folder.glob("optimizer-*.safetensors")
    ):
        with safe_open(str(path), framework="pt") as f:
            where.update({key: path for key in f.keys()})  # noqa: SIM118 (not a dict)

    def read(stored: str) -> torch.Tensor:
        if stored not in where:
            raise KeyError(f"{folder}: no tensor {stored!r} (a checkpoint of another model?)")
        with safe_open(str(where[stored]), framework="pt") as f:
            return f.get_tensor(stored)

    for name, param in frozen_parameters(model):
        _set_model_weight(param, read(name))
    for name, master in masters(model, optimizer, engine):
        for key in (None, *MOMENTS):
            master.set(key, read(name if key is None else f"{name}::{key}"))


# ------------------------------------------------------------------------------------ RNG state


def save_rng(folder: Path, rank: int) -> list[str]:
    """This rank's torch, numpy and Python random states (safetensors + JSON, no pickle)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, state, gauss = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(state), gauss],
    }
    name = f"rng-{rank:05d}"
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return [f"{name}.safetensors", f"{name}.json"]


def load_rng(folder: Path, rank: int) -> None:
    name = f"rng-{rank:05d}"
    meta = json.loads((folder / f"{name}.json").read_text())
    with safe_open(str(folder / f"{name}.safetensors"), framework="pt") as f:
        torch.set_rng_state(f.get_tensor("torch_cpu"))
        if torch.cuda.is_available() and "torch_cuda" in f.keys():  # noqa: SIM118
            torch.cuda.set_rng_state(f.get_tensor("torch_cuda"))
        keys = f.get_tensor("numpy_keys").numpy().astype(np.uint32)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
