"""`kiln plan MODEL --gpus N --zero S ...`: will a run fit, before anything is launched?

Per-GPU bytes of parameters, gradients, optimizer states, activations and DeepSpeed's own
buffers for a model preset under ZeRO 0-3, from closed forms: nothing is built or allocated, so
the 7b preset on 1024 GPUs is planned in milliseconds on a laptop.

The model of each ZeRO stage is what DeepSpeed (0.19) *allocates*, read from its source and
checked against live tensors on CPU (benchmarks/zero_memory.py), not the textbook 2/2/12 bytes
per parameter. The differences that matter:

* ZeRO-1/2 keep the full 16-bit (or fp32) parameters, plus an fp32 master copy of this rank's
  partition *even in fp32* (stage_1_and_2.py clones it); the gradient partition buffer holds
  every parameter that *touches* the rank's partition, whole (``params_in_partition``); the
  step makes an fp32 copy of one group's gradient partition at a time.
* ZeRO-3 also keeps an fp32 master copy in fp32 (the reuse check in ``_create_fp32_partitions``
  compares a torch.device with a string and never matches); parameters below
  ``stage3_param_persistence_threshold`` stay whole on every rank; gathered parameters stay
  resident up to ``stage3_max_live_parameters`` (DeepSpeed's 1e9 default keeps a 125m model
  whole on every rank during forward/backward, seen on CPU; our template sizes it to d²) and
  prefetching holds a gather buffer of up to ``stage3_prefetch_bucket_size``; the step turns
  the gradient partition into an fp32 copy per sub-group (each AdamW group cut into
  ``sub_group_size`` elements).
* Reduce buckets are allocated at ``reduce_bucket_size`` elements whatever the model size: with
  our ZeRO-1/2 templates (5e8) that is 1 GB per bucket in bf16, two of them under ZeRO-2
  (``overlap_comm``), one under ZeRO-1 and ZeRO-3 (kept for the whole run); reducing a bucket
  makes a copy of its filled part.

Under bf16 with ``dist.reduce_dtype: fp32`` (the default; launcher/runtime.py) gradients are
accumulated and reduced in fp32, which changes what DeepSpeed allocates (measured on CPU, 125m
on 2 ranks, both dtypes): ZeRO-1 becomes DeepSpeed's BF16_Optimizer, with an fp32 gradient
buffer of the whole model on every GPU besides the bf16 ``.grad``s; ZeRO-2/3 hold their
gradient partition in fp32 (and need no fp32 copy at the step); every reduction converts its
bf16 input to an fp32 copy. ZeRO-0 accumulates in bf16 whatever the setting (DeepSpeed has no
fp32 accumulation there); only its all-reduce goes through fp32.

The peak is the largest of three moments: forward/backward (activations, gathered ZeRO-3
parameters, gradients written into the buckets), the end of backward (buckets being reduced
into the gradient partition) and the optimizer step (gradient partition plus its fp32 copy).
Each row printed is that component's largest value; the total is the largest moment.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config import CONFIG_ROOT
from pretrain.memory.model import PlanError, Tensor, param_tensors

GiB = 2**30
# Memory the caching allocator cannot hand to tensors: the CUDA context with cuBLAS/cuDNN
# kernels loaded (~0.5-1 GiB on an H100), NCCL's communicator buffers (~0.5 GiB per group),
# cuBLAS workspaces; plus fragmentation of PyTorch's caching allocator, which grows with the
# variety of tensor sizes (10% is a common rule of thumb for training).
CONTEXT_BYTES = 2 * GiB
FRAGMENTATION = 0.10

# DeepSpeed 0.19 defaults for the knobs our templates may leave out (deepspeed/runtime/zero/
# config.py, runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE).
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "contiguous_gradients": True,
    "stage3_param_persistence_threshold": 1e5,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_max_live_parameters": 1e9,
    "sub_group_size": 1e9,
}
ALLREDUCE_BUCKET = 5e8  # ZeRO-0 all-reduces gradients flattened into buckets of this many


# ------------------------------------------------------------------------------ the setup


@dataclass(frozen=True)
class Setup:
    gpus: int = 1  # per node
    nodes: int = 1
    zero: int = 2
    micro_batch: int = 1
    seq_len: int = 2048
    offload: bool = False
    precision: str = "bf16"
    reduce_dtype: str = "fp32"  # dist.reduce_dtype: gradient accumulation/reduction under bf16
    activation_checkpointing: bool = False
    gpu_memory: float = 80 * GiB

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def bytes(self) -> int:
        """Bytes per element of parameters, gradients and activations."""
        return 2 if self.precision == "bf16" else 4

    @property
    def wide_grads(self) -> bool:
        """bf16 weights whose gradients are accumulated and reduced in fp32."""
        return self.precision == "bf16" and self.reduce_dtype == "fp32"


def knobs_from(path: Path, zero: int, offload: bool = False, d_model: int | None = None) -> dict:
    """The knobs of a DeepSpeed config file, with DeepSpeed's defaults where it is silent and
    "auto" sizes resolved from ``d_model`` as the runtime does."""
    from launcher.runtime import resolve_sizes

    zero_cfg = json.loads(Path(path).read_text()).get("zero_optimization", {})
    zero_cfg = resolve_sizes(zero_cfg, d_model)
    unresolved = [k for k, v in zero_cfg.items() if v == "auto"]
    if unresolved:
        raise PlanError(f"{path}: {', '.join(unresolved)} = auto needs the model width")
    knobs = {**DS_DEFAULTS, **zero_cfg}
    # DeepSpeed turns overlap_comm on by default only for ZeRO-3 (config.py overlap_comm_valid)
    knobs.setdefault("overlap_comm", zero == 3)
    knobs["offload_optimizer"] = offload and zero >= 1
    knobs["offload_param"] = offload and zero == 3
    return knobs


def deepspeed_knobs(zero: int, offload: bool, d_model: int | None = None) -> tuple[dict, Path]:
    """The knobs of our DeepSpeed template for this stage (what the runtime would use)."""
    name = f"zero{zero}" + ("-offload" if offload and zero else "")
    path = CONFIG_ROOT / "deepspeed" / f"{name}.json"
    return knobs_from(path, zero, offload, d_model), path


# -------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Bytes per GPU at each moment; ``cpu`` is per node (offloaded states)."""

    model: object
    setup: Setup
    knobs: dict
    template: Path
    n_params: int
    # moment -> component -> bytes; moments: "forward/backward", "optimizer step"
    moments: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    terms: dict[str, float] = field(default_factory=dict)  # named pieces, for tests and notes
    cpu: float = 0.0
    cpu_note: str = ""
    activations_plain: float = 0.0
    activations_checkpointed: float = 0.0

    def component(self, name: str) -> float:
        return max(m.get(name, 0.0) for m in self.moments.values())

    @property
    def params(self) -> float:
        return self.component("params")

    @property
    def grads(self) -> float:
        return self.component("grads")

    @property
    def optimizer(self) -> float:
        return self.component("optimizer")

    @property
    def activations(self) -> float:
        return self.component("activations")

    @property
    def buffers(self) -> float:
        return self.component("buffers")

    def peak(self, without: tuple[str, ...] = ()) -> float:
        """The largest moment, leaving out some components (e.g. activations)."""
        return max(sum(v for k, v in m.items() if k not in without) for m in self.moments.values())

    @property
    def total(self) -> float:
        return self.peak()

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=lambda k: sum(self.moments[k].values()))

    @property
    def headroom(self) -> float:
        return CONTEXT_BYTES + FRAGMENTATION * self.setup.gpu_memory

    @property
    def fits(self) -> bool:
        return self.total + self.headroom <= self.setup.gpu_memory


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch (see ``activation_bytes``)."""

    tokens: int
    layers: int
    per_layer: int  # bytes per token saved by one decoder layer for backward
    layer_input: int  # bytes per token a checkpointed layer keeps (its input)
    output_saved: int  # bytes per token saved by the final norm and the loss
    output_transient: int  # bytes per token alive only while the loss is computed

    @property
    def plain(self) -> float:
        return self.tokens * (
            self.layers * self.per_layer + self.output_saved + self.output_transient
        )

    @property
    def checkpointed(self) -> float:
        """Layer inputs, plus one layer recomputed at a time during backward."""
        return self.tokens * (
            self.layers * self.layer_input
            + self.per_layer
            + self.output_saved
            + self.output_transient
        )


def activation_bytes(cfg, setup: Setup) -> Activations:
    """Activations of one micro-batch kept for backward, with and without checkpointing.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    Sec. 4.1) count 34·s·b·h + 5·a·s²·b bytes per GPT layer in 16-bit. Adapted to this Llama
    block as HF runs it (and checked tensor by tensor with saved-tensor hooks on CPU, see
    tests/pretrain/test_memory_plan.py), per token and layer, e = bytes per element:

    * each RMSNorm (two): its input upcast to fp32 (4h), the normalised value cast back (e·h),
      the output the next matmuls save (e·h), and one fp32 rsqrt          -> 2·((4 + 2e)·h + 4)
    * attention: Q, K, V after RoPE (grouped-query: K and V are only kv_heads wide) and the
      output O, saved by the SDPA/flash kernel (o_proj saves a view of O), plus its fp32
      log-sum-exp per head. Flash attention keeps no s×s scores, so Korthikanti's 5·a·s²
      term is gone; Llama has no dropout, so the masks are gone      -> e·(2q + 2kv) + 4a
    * SwiGLU MLP: gate and up outputs, SiLU(gate), and the product down_proj saves -> 4e·f
    * the output layer, once: the final RMSNorm and cross-entropy's fp32 log-softmax (4V)
      are saved; while the loss is computed the logits (e·V) and, in bf16, our loss's fp32
      copy of them (4V) are alive too.

    With activation checkpointing (HF, per decoder layer) a layer keeps only its input (e·h)
    and one layer is recomputed at a time during backward.
    """
    e = setup.bytes
    h, a, v = cfg.d_model, cfg.n_heads, cfg.vocab_size
    q, kv, f = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_size
    norm = (4 + 2 * e) * h + 4
    return Activations(
        tokens=setup.micro_batch * setup.seq_len,
        layers=cfg.n_layers,
        per_layer=2 * norm + e * (2 * q + 2 * kv) + 4 * a + 4 * e * f,
        layer_input=e * h,
        output_saved=norm + 4 * v,
        output_transient=e * v + (4 * v if e != 4 else 0),
    )


def _zero12_partition(tensors: list[Tensor], world: int) -> tuple[int, int]:
    """(largest partition, largest gradient buffer) of one AdamW group under ZeRO-1/2, in
    elements, over all ranks: the flat group is padded to a multiple of 2·world and cut into
    equal partitions; the gradient buffer holds every parameter touching a partition, whole
    (stage_1_and_2.py ``get_partition_info`` and ``copy_grads_in_partition``)."""
    total = sum(t.numel for t in tensors)
    align = 2 * world
    part = math.ceil(total / align) * align // world
    starts, offset = [], 0
    for t in tensors:
        starts.append(offset)
        offset += t.numel
    worst = 0
    for rank in range(world):
        lo, hi = rank * part, (rank + 1) * part
        # parameters starting inside [lo, hi), plus the one straddling lo
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi)
        touched = sum(
            tensors[i].numel
            for i in range(max(first, 0), last)
            if starts[i] + tensors[i].numel > lo
        )
        worst = max(worst, touched)
    return part, worst


def plan(cfg, setup: Setup, knobs: dict | None = None, template: Path | None = None) -> Plan:
    """Per-GPU memory of training ``cfg`` with ``setup`` (see the module docstring).

    ``knobs`` (from ``deepspeed_knobs``/``knobs_from``) default to our template for the stage.
    """
    from pretrain.model import param_count

    if knobs is None:
        knobs, template = deepspeed_knobs(setup.zero, setup.offload, cfg.d_model)
    tensors = param_tensors(cfg)
    n = param_count(cfg)
    assert sum(t.numel for t in tensors) == n, "param_tensors disagrees with param_count"
    N, e, z, gpus = setup.world, setup.bytes, setup.zero, setup.gpus
    fp32, wide = e == 4, setup.wide_grads
    rbs = float(knobs["reduce_bucket_size"])
    largest = max(t.numel for t in tensors)
    r = Plan(cfg, setup, knobs, template or Path(), n)
    acts = activation_bytes(cfg, setup)
    r.activations_plain, r.activations_checkpointed = acts.plain, acts.checkpointed
    act = acts.checkpointed if setup.activation_checkpointing else acts.plain
    t = r.terms
    if z == 0:
        # DeepSpeed's plain data parallelism: everything replicated. The gradients are
        # all-reduced flattened into buckets of 5e8 elements (a copy); bf16 goes through its
        # FP16_Optimizer: fp32 master weights, and at the step every group's gradients
        # flattened to fp32 at once.
        t.update(weights=e * n, grads=e * n, moments=8 * n)
        t["master"] = 0 if fp32 else 4 * n
        t["grads_fp32"] = 0 if fp32 else 4 * n
        # the flattened bucket, and its fp32 copy when bf16 gradients are reduced in fp32
        t["allreduce_flat"] = (e + 4 * wide) * min(n, ALLREDUCE_BUCKET) if N > 1 else 0
        optimizer = t["master"] + t["moments"]
        r.moments = {
            "forward/backward": {
                "params": t["weights"],
                "grads": t["grads"],
                "optimizer": optimizer,
                "activations": act,
            },
            "end of backward": {
                "params": t["weights"],
                "grads": t["grads"],
                "optimizer": optimizer,
                "buffers": t["allreduce_flat"],
            },
            "optimizer step": {
                "params": t["weights"],
                "grads": t["grads"] + t["grads_fp32"],
                "optimizer": optimizer,
            },
        }
    elif z == 1 and wide and not setup.offload:
        _plan_bf16_optimizer(r, tensors, act)
    elif z in (1, 2):
        groups = [[x for x in tensors if x.decay], [x for x in tensors if not x.decay]]
        parts = [_zero12_partition(g, N) for g in groups if g]
        part = sum(p for p, _ in parts)
        n_buckets = 2 if knobs["overlap_comm"] else 1
        t.update(weights=e * n, master=4 * part, moments=8 * part)
        t["grad_buffer"] = e * sum(b for _, b in parts)
        t["grads_fp32"] = 4 * max(p for p, _ in parts)  # one group at a time
        if wide:  # fp32 accumulation: an fp32 partition buffer, nothing to convert at the step
            t["grad_buffer"], t["grads_fp32"] = 4 * part, 0
        t["buckets"] = n_buckets * e * rbs if knobs["contiguous_gradients"] or setup.offload else 0
        # seen on CPU, 2 ranks: a copy of the bucket (and its fp32 copy when reduced in fp32)
        t["reduce_scratch"] = (e + 4 * wide) * min(n, rbs) if N > 1 else 0
        optimizer = t["master"] + t["moments"]
        if setup.offload:
            # States and fp32 gradients live in (pinned) CPU memory; the GPU keeps the weights,
            # the buckets and one staging buffer of the largest parameter.
            t["staging"] = e * largest
            buffers = t["buckets"] + t["staging"]
            # ZeRO-1 accumulating in fp32 keeps an fp32 `grad_accum` of every parameter on the
            # GPU (stage_1_and_2.py use_grad_accum_attribute; read, not measured)
            t["grad_accum"] = 4 * n if wide and z == 1 else 0
            r.moments = {
                "forward/backward": {
                    "params": t["weights"],
                    "grads": t["grad_accum"],
                    "activations": act,
                    "buffers": buffers,
                },
                "end of backward": {
                    "params": t["weights"],
                    "grads": t["grad_accum"],
                    "buffers": buffers + t["reduce_scratch"],
                },
                "optimizer step": {"params": t["weights"], "grads": t["grad_accum"]},
            }
            r.cpu = (optimizer + 4 * part + e * part) * gpus
            r.cpu_note = "fp32 master + Adam m, v + fp32 grads + 16-bit copy of the partition"
        else:
            r.moments = {
                "forward/backward": {  # gradients are written into the buckets
                    "params": t["weights"],
                    "optimizer": optimizer,
                    "activations": act,
                    "buffers": t["buckets"],
                },
                "end of backward": {
                    "params": t["weights"],
                    "grads": t["grad_buffer"],
                    "optimizer": optimizer,
                    "buffers": t["buckets"] + t["reduce_scratch"],
                },
                "optimizer step": {
                    "params": t["weights"],
                    "grads": t["grad_buffer"] + t["grads_fp32"],
                    "optimizer": optimizer,
                },
            }
    else:
        threshold = float(knobs["stage3_param_persistence_threshold"])
        part = sum(math.ceil(x.numel / N) for x in tensors)  # each parameter padded to N
        # On one GPU without offload a shard is the whole parameter: nothing is gathered.
        fetched = N > 1 or setup.offload
        big = [x.numel for x in tensors if x.numel > threshold]
        live = min(sum(big), max(max(big, default=0), float(knobs["stage3_max_live_parameters"])))
        t["shard"] = e * part
        # small parameters stay whole on every GPU
        t["persistent"] = e * sum(x.numel for x in tensors if x.numel <= threshold) * fetched
        # gathered parameters stay resident up to stage3_max_live_parameters (DeepSpeed's
        # default 1e9 is a whole 1b model; our template: d²), and prefetching holds its
        # gather buffer (stage3_prefetch_bucket_size) while it is in flight: both seen on CPU
        t["live"] = e * live * fetched
        t["prefetch"] = e * min(sum(big), float(knobs["stage3_prefetch_bucket_size"])) * fetched
        t["grad_in_flight"] = e * largest  # the largest layer's full gradient before reducing
        # Seen on CPU (not offloaded): a gradient larger than the reduce bucket is reduced on
        # its own with a full-size copy beside it (partition + 2 x 147 MiB for `125m` on 2
        # ranks); one that fits is copied into the bucket (counted under buffers). Not
        # measured with offload, so not assumed there.
        # (in fp32 when bf16 gradients are reduced in fp32, like the partition they go to)
        t["reduce_copy"] = (4 if wide else e) * largest if N > 1 and largest > rbs else 0
        t["grad_partition"] = (4 if wide else e) * part
        # DeepSpeed cuts each AdamW group (decay / no decay) into sub-groups; the step turns
        # one sub-group's gradient partition into fp32 at a time
        group_parts = [
            sum(math.ceil(x.numel / N) for x in tensors if x.decay == decay)
            for decay in (True, False)
        ]
        cap = float(knobs["sub_group_size"]) + math.ceil(largest / N)
        t["grads_fp32"] = 0 if wide else 4 * min(max(group_parts), cap)
        t.update(master=4 * part, moments=8 * part, bucket=e * rbs)
        t["reduce_scratch"] = e * min(n, rbs)  # seen on CPU, also on 1 rank
        optimizer = t["master"] + t["moments"]
        window = t["persistent"] + t["live"]
        if setup.offload:
            r.moments = {
                "forward/backward": {
                    "params": window + t["prefetch"],
                    "grads": t["grad_in_flight"],
                    "activations": act,
                    "buffers": t["bucket"],
                },
                "end of backward": {
                    "params": window,
                    "buffers": t["bucket"] + t["reduce_scratch"],
                },
                "optimizer step": {"buffers": t["bucket"]},
            }
            r.cpu = (optimizer + 4 * part + e * part) * gpus
            r.cpu_note = "16-bit params + fp32 master + Adam m, v + fp32 grads of the partition"
        else:
            r.moments = {
                "forward/backward": {
                    "params": t["shard"] + window + t["prefetch"],
                    "grads": t["grad_partition"] + t["grad_in_flight"] + t["reduce_copy"],
                    "optimizer": optimizer,
                    "activations": act,
                    "buffers": t["bucket"],
                },
                "end of backward": {
                    "params": t["shard"] + window,
                    "grads": t["grad_partition"],
                    "optimizer": optimizer,
                    "buffers": t["bucket"] + t["reduce_scratch"],
                },
                # gathered and persistent parameters are released for the step
                "optimizer step": {
                    "params": t["shard"],
                    "grads": t["grad_partition"] + t["grads_fp32"],
                    "optimizer": optimizer,
                    "buffers": t["bucket"],
                },
            }
    # Every process builds the model in fp32 on the host before DeepSpeed moves it
    # (pretrain/task.py); under ZeRO-3 zero.Init partitions each layer as it is made, so
    # only about one layer at a time is whole.
    start_up = 4 * (n if z < 3 else largest) * gpus
    if start_up > r.cpu:
        r.cpu = start_up
        what = "the fp32 model" if z < 3 else "its largest layer in fp32 (zero.Init)"
        r.cpu_note = f"at start-up: {gpus} process{'es' if gpus > 1 else ''} each build {what}"
    r.notes = _notes(r, acts)
    return r


def _allreduce_copy(sizes: list[int], limit: float = ALLREDUCE_BUCKET) -> int:
    """Elements of the largest flattened copy DeepSpeed's ``allreduce_no_retain`` makes of
    ``sizes`` (tensors gathered in order until a bucket exceeds ``limit``; a bucket of one
    tensor is reduced in place)."""
    worst, bucket = 0, []
    for size in sizes:
        bucket.append(size)
        if sum(bucket) > limit:
            worst, bucket = max(worst, sum(bucket) if len(bucket) > 1 else 0), []
    return max(worst, sum(bucket) if len(bucket) > 1 else 0)


def _plan_bf16_optimizer(r: Plan, tensors: list[Tensor], act: float) -> None:
    """ZeRO-1 with bf16 weights and fp32 gradient accumulation: DeepSpeed's BF16_Optimizer
    (bf16_optimizer.py). Flat bf16 weights; an fp32 master and Adam m, v of 1/N; an fp32
    gradient buffer of the whole model on every GPU that the bf16 ``.grad``s are added into
    after backward (they live until the step); the fp32 buffers of the two AdamW groups are
    all-reduced, flattened together when they fit in one 5e8-element bucket. Measured on CPU
    (125m, 2 ranks): every component within 1%."""
    t, N, n = r.terms, r.setup.world, r.n_params
    groups = [[x for x in tensors if x.decay], [x for x in tensors if not x.decay]]
    part = sum(_zero12_partition(g, N)[0] for g in groups if g)
    t.update(weights=2 * n, master=4 * part, moments=8 * part)
    t["grads_fp32"], t["grads_bf16"] = 4 * n, 2 * n
    sizes = [sum(x.numel for x in g) for g in groups if g]
    t["allreduce_flat"] = 4 * _allreduce_copy(sizes) if N > 1 else 0
    optimizer = t["master"] + t["moments"]
    grads = t["grads_fp32"] + t["grads_bf16"]
    r.moments = {
        "forward/backward": {
            "params": t["weights"],
            "grads": t["grads_fp32"],
            "optimizer": optimizer,
            "activations": act,
        },
        "end of backward": {
            "params": t["weights"],
            "grads": grads,
            "optimizer": optimizer,
            "buffers": t["allreduce_flat"],
        },
        "optimizer step": {"params": t["weights"], "grads": grads, "optimizer": optimizer},
    }


def _notes(r: Plan, acts: Activations) -> dict[str, str]:
    """One line per component: what it is made of."""
    s, t, k = r.setup, r.terms, r.knobs
    G = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    N, width = s.world, "bf16" if s.bytes == 2 else "fp32"
    notes = {
        "activations": (
            f"{r.model.n_layers} layers x {acts.tokens} tokens x {acts.per_layer / 1e3:.1f} kB "
            "+ output"
            if not s.activation_checkpointing
            else f"{r.model.n_layers} layer inputs + 1 layer recomputed + output"
        )
    }
    if s.zero == 0:
        notes["params"] = f"{width} weights, whole on every GPU"
        notes["grads"] = "whole" + (
            ", accumulated in bf16 (ZeRO-0 has no fp32)" if t["master"] else ""
        )
        notes["optimizer"] = "Adam m, v, whole"
        if t["master"]:
            notes["grads"] += f" + fp32 copy at the step {G(t['grads_fp32'])}"
            notes["optimizer"] = "Adam m, v + fp32 master weights, whole"
        notes["buffers"] = (
            f"gradients flattened for the all-reduce {G(t['allreduce_flat'])}"
            if t["allreduce_flat"]
            else "none"
        )
    elif "grads_bf16" in t:  # ZeRO-1, bf16 with fp32 gradients: DeepSpeed's BF16_Optimizer
        notes["params"] = "bf16 weights, whole on every GPU"
        notes["grads"] = (
            f"fp32 buffer of the whole model {G(t['grads_fp32'])} + the bf16 .grads until the "
            f"step {G(t['grads_bf16'])}"
        )
        notes["optimizer"] = f"fp32 master + Adam m, v of 1/{N}"
        notes["buffers"] = (
            f"fp32 gradients flattened for the all-reduce {G(t['allreduce_flat'])}"
            if t["allreduce_flat"]
            else "none"
        )
    elif s.zero in (1, 2):
        notes["params"] = f"{width} weights, whole on every GPU"
        notes["grads"] = (
            "on CPU (offloaded)"
            if s.offload
            else f"fp32 partition buffer {G(t['grad_buffer'])}"
            if s.wide_grads
            else f"partition buffer {G(t['grad_buffer'])} (whole parameters touching the "
            f"partition) + fp32 copy of one group at the step {G(t['grads_fp32'])}"
        )
        if t.get("grad_accum"):
            notes["grads"] = f"fp32 grad_accum of every parameter {G(t['grad_accum'])}"
        notes["optimizer"] = (
            "on CPU (offloaded)" if s.offload else f"fp32 master + Adam m, v of 1/{N}"
        )
        n_buckets = 2 if k["overlap_comm"] else 1
        notes["buffers"] = (
            f"{n_buckets} reduce bucket(s) of {k['reduce_bucket_size']:.3g} elements"
            + (f" + reduce scratch {G(t['reduce_scratch'])}" if t["reduce_scratch"] else "")
            + (" + offload staging" if s.offload else "")
        )
    else:
        window = (
            f"small params kept whole {G(t['persistent'])} + gathered params resident "
            f"{G(t['live'])} + prefetch in flight {G(t['prefetch'])}"
        )
        notes["params"] = (
            f"on CPU; on GPU: {window}" if s.offload else f"1/{N} shard {G(t['shard'])} + {window}"
        )
        notes["grads"] = (
            f"largest layer's full gradient {G(t['grad_in_flight'])} (partitions on CPU)"
            if s.offload
            else f"1/{N} partition {G(t['grad_partition'])}"
            + (" (fp32)" if s.wide_grads else f" + its fp32 copy at the step {G(t['grads_fp32'])}")
            + f"; largest layer's full gradient {G(t['grad_in_flight'])}"
            + (f" + its reduce copy {G(t['reduce_copy'])}" if t["reduce_copy"] else "")
        )
        notes["optimizer"] = (
            "on CPU (offloaded)" if s.offload else f"fp32 master + Adam m, v of 1/{N}"
        )
        notes["buffers"] = (
            f"reduce bucket of {k['reduce_bucket_size']:.3g} elements, kept + reduce scratch "
            f"{G(t['reduce_scratch'])}"
        )
    return notes
