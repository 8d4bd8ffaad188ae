"""How a process joins the run: Accelerator + DeepSpeed plugin, devices, precision, seeds.

One code path for GPUs and CPUs: NCCL and bf16 where CUDA is present, gloo and fp32 on CPU.
Accelerate on CPU silently runs every process as its own world of 1 unless the process group
is created with the gloo backend (see ../shared/NOTES.md), so the runtime asks for gloo
explicitly and then checks that the world it got is the world the config was validated for.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: this module's collectives take
# `group=group.WORLD` as a default argument, evaluated at import. Imported later (torch._dynamo
# pulls it in lazily, mid-run), every default binds the run's world group, which then outlives
# `destroy_process_group()` to the interpreter's shutdown, where its gloo worker threads abort
# the finished process (SIGABRT, "terminate called without an active exception").
import torch.distributed.nn.functional  # see above: before any init_process_group

from launcher.config import CONFIG_ROOT
from launcher.run_config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the loop needs to know about this process and its peers."""

    accelerator: object  # accelerate.Accelerator
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    zero_stage: int
    ds_config: dict
    env_set: tuple[str, ...] = ()
    accelerate_env: dict[str, str] = field(default_factory=dict)
    """ACCELERATE_* variables before the Accelerator was created (``close`` restores them)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def own_clipping(self) -> bool:
        """ZeRO-0 in fp32: DeepSpeed hands our optimizer the full gradients and keeps no norm,
        so the optimizer clips and skips itself (see launcher/optim.py)."""
        return self.zero_stage == 0 and self.dtype == torch.float32

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        if self.world_size > 1:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])

    def prepare_frozen(self, model):
        """A model that is used but not trained (reference, reward): ``launcher/engines.py``."""
        from launcher.engines import prepare_frozen

        return prepare_frozen(self, model)

    def generating(self, model):
        """``with runtime.generating(engine) as module: module.generate(...)``: whole model,
        cache on, activation checkpointing off, restored after (``launcher/engines.py``)."""
        from launcher.engines import generating

        return generating(self, model)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group and forget Accelerate's process-wide state, so that
        another run can start in this process (tests, notebooks).

        The process groups must die here, while the interpreter is whole: one that survives to
        shutdown is torn down with its gloo threads still running, and the process aborts
        after a finished run. The engines hold the groups, and the run's engines, optimizer
        and task sit in reference cycles that only a collection frees: the Accelerator lets go
        of its engine, and the cycles are collected before the groups are destroyed."""
        # close() runs in `finally` blocks: an error while freeing the engine must not mask
        # the error of the run itself, but it is said (the groups may then outlive close())
        try:
            self.accelerator.free_memory()
        except Exception as error:
            log.warning("freeing the engine at close failed: %s: %s", type(error).__name__, error)
        gc.collect()
        _forget_accelerate_state()
        if dist.is_initialized():
            dist.destroy_process_group()
        _forget_deepspeed_groups()
        for key in self.env_set:
            os.environ.pop(key, None)
        # The Accelerator exported ACCELERATE_USE_DEEPSPEED and friends, and transformers
        # holds its DeepSpeed config: a later Accelerator or from_pretrained in this process
        # (a TRL trainer in a test) would believe it runs under DeepSpeed.
        for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
            if key not in self.accelerate_env:
                del os.environ[key]
        os.environ.update(self.accelerate_env)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _forget_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; a destroyed one must not be reused."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.isupper() and ("GROUP" in name or "WORLD" in name):
            if isinstance(value, dict):
                value.clear()
            elif value is None or isinstance(value, dist.ProcessGroup):
                setattr(groups, name, None)


def resolve_precision(requested: str) -> torch.dtype:
    """bf16 on GPUs that support it (and when asked), fp32 otherwise."""
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if requested == "bf16" or (requested == "auto" and cuda_bf16):
        return torch.bfloat16
    return torch.float32


def deepspeed_template(stage: int, offload_optimizer: bool, offload_params: bool) -> Path:
    name = f"zero{stage}" + ("-offload" if offload_optimizer or offload_params else "")
    return CONFIG_ROOT / "deepspeed" / f"{name}.json"


SIZED_BY_MODEL = {
    # HF's rules for "auto" (Accelerate applies the first three itself when it can see the
    # model): buckets about one d x d matrix, small tensors (norms) never partitioned.
    "reduce_bucket_size": lambda d: d * d,
    "stage3_prefetch_bucket_size": lambda d: int(0.9 * d * d),
    "stage3_param_persistence_threshold": lambda d: 10 * d,
    # DeepSpeed's defaults (1e9 each) keep every gathered parameter of a model under 1e9
    # parameters resident until backward reuses it: ZeRO-3 then saves no parameter memory
    # (measured: 2 ranks held 0.71x of 1 rank's states for `125m`, 0.52x with these;
    # benchmarks/results/zero_memory.md). About one d x d matrix: gather per layer, release
    # after use, like FSDP's reshard-after-forward.
    "stage3_max_live_parameters": lambda d: d * d,
    "stage3_max_reuse_distance": lambda d: d * d,
}


def resolve_sizes(zero: dict, d_model: int | None) -> dict:
    """``zero_optimization`` with every "auto" size knob set from the model width; without a
    width, removed: DeepSpeed's defaults (Accelerate would fill some from ``model.config``,
    and fail on a model without one)."""
    out = dict(zero)
    for key, rule in SIZED_BY_MODEL.items():
        if out.get(key) != "auto":
            continue
        if d_model is not None:
            out[key] = rule(d_model)
        else:
            del out[key]
    return out


def deepspeed_config(cfg: RunConfig, dtype: torch.dtype, world_size: int) -> dict:
    """The DeepSpeed config of this run: a template from configs/deepspeed/ (the one the
    accelerate config names, if launched with one) completed from the run config."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        d = cfg.dist
        path = deepspeed_template(d.zero_stage, d.offload_optimizer, d.offload_params)
    ds = json.loads(Path(path).read_text())
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = cfg.dist.zero_stage
    width = cfg.model_width()
    if width is None and zero["stage"] == 3 and os.environ.get("RANK", "0") == "0":
        log.warning(
            "ZeRO-3 without the model's width (%s.model_width() is None): DeepSpeed's default "
            "buffer sizes, which keep a model under 1e9 parameters gathered on every rank "
            "(no parameter memory saved)",
            type(cfg).__name__,
        )
    zero = ds["zero_optimization"] = resolve_sizes(zero, width)
    if cfg.dist.offload_optimizer and zero["stage"] >= 1:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
    if cfg.dist.offload_params and zero["stage"] == 3:
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size)
    ds.update(
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
        gradient_accumulation_steps=accum,
        train_batch_size=cfg.train.global_batch_size,
        gradient_clipping=cfg.optim.grad_clip or 0.0,
        bf16={"enabled": dtype == torch.bfloat16},
        fp16={"enabled": False},
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=2**62,
        wall_clock_breakdown=False,
    )
    resolve_gradient_dtypes(ds, dtype, cfg.dist.reduce_dtype, int(zero["stage"]), accum)
    if zero["stage"] == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if zero["stage"] == 0 and dtype == torch.float32:
        ds["gradient_clipping"] = 0.0  # our optimizer clips (launcher/optim.py says why)
    return ds


def resolve_gradient_dtypes(
    ds: dict, dtype: torch.dtype, reduce_dtype: str, stage: int, accum: int
) -> None:
    """Fill ``communication_data_type`` and ``data_types.grad_accum_dtype`` where the template
    says "auto" (or nothing): under bf16 ``dist.reduce_dtype``, fp32 otherwise (DeepSpeed
    would default both to the model dtype, bf16). DeepSpeed 0.19 has no fp32 accumulation
    under ZeRO-0 with bf16 (``_do_optimizer_sanity_check`` raises NotImplementedError): there
    only the all-reduce follows ``dist.reduce_dtype``."""
    bf16 = dtype == torch.bfloat16
    want = reduce_dtype if bf16 else "fp32"
    if ds.get("communication_data_type", "auto") == "auto":
        ds["communication_data_type"] = want
    types = ds.setdefault("data_types", {})
    if types.get("grad_accum_dtype", "auto") == "auto":
        types.pop("grad_accum_dtype", None)
        if not (bf16 and stage == 0):
            types["grad_accum_dtype"] = want
        elif want == "fp32" and accum > 1 and os.environ.get("RANK", "0") == "0":
            log.warning(
                "ZeRO-0 with bf16: DeepSpeed accumulates the gradients of the %d micro-batches "
                "in bf16 (it has no fp32 accumulation without ZeRO); dist.zero_stage: 1 "
                "accumulates in fp32",
                accum,
            )
    if not types:
        del ds["data_types"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_runtime(cfg: RunConfig, *, log_with: str | None = None) -> Runtime:
    """Create the Accelerator (and the process group) for this process.

    Raises ``RuntimeError`` when the world it joined is not the one the config was checked
    for (the classic symptom of launching without the right backend).
    """
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    env_set: tuple[str, ...] = ()
    if "WORLD_SIZE" not in os.environ:  # a single process started directly: a world of one
        single = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        single.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        env_set = tuple(k for k in single if k not in os.environ)
        os.environ.update({k: single[k] for k in env_set})
    world_size = int(os.environ["WORLD_SIZE"])
    dtype = resolve_precision(cfg.train.precision)
    ds = deepspeed_config(cfg, dtype, world_size)
    cuda = torch.cuda.is_available()
    handlers = [
        InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    ]
    _without_shm_comm_op()

    # Accelerate keeps its state in process-wide singletons: an Accelerator made earlier in
    # this process (a TRL trainer, a notebook cell) would hand ours its settings, DeepSpeed
    # off, and prepare() would return the bare model. A launched rank has none: a no-op.
    _forget_accelerate_state()
    accelerate_env = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
        gradient_accumulation_steps=ds["gradient_accumulation_steps"],
        mixed_precision="bf16" if dtype == torch.bfloat16 else "no",
        kwargs_handlers=handlers,
        log_with=log_with,
        project_dir=str(cfg.run_dir),
    )
    if accelerator.num_processes != cfg.dist.world_size:
        raise RuntimeError(
            f"this process joined a world of {accelerator.num_processes} processes but the "
            f"config was validated for dist.num_processes x dist.num_nodes = "
            f"{cfg.dist.world_size}; launch with `python -m launcher STAGE CONFIG --nproc N`"
        )
    return Runtime(
        accelerator=accelerator,
        rank=accelerator.process_index,
        local_rank=accelerator.local_process_index,
        world_size=accelerator.num_processes,
        device=accelerator.device,
        dtype=dtype,
        zero_stage=int(ds["zero_optimization"]["stage"]),
        ds_config=ds,
        env_set=env_set,
        accelerate_env=accelerate_env,
    )


def _without_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory op (deepspeed_shm_comm)
    when it joins the process group. It serves only inference tensor parallelism
    (``inference_all_reduce``), never training, and compiling it cost every fresh machine
    36 s on 2 cores (one rank compiles, the others wait on a lock file), crashed a run where
    g++ or ninja is missing, and a stop signal during the compile killed the compiler and the
    rank with it (its peers then waited in the rendezvous until the agent's grace was over).
    DeepSpeed keeps ``deepspeed.ops.__compatible_ops__`` as one dict so that edits to it hold;
    an op marked incompatible is skipped and plain torch.distributed (gloo) does the work.
    GPU accelerators have no such op: nothing changes there."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank streams (dropout differs across ranks; model init is seeded separately)."""
    import random

    import numpy as np

    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
