"""`kiln plan MODEL --gpus N --zero S ...`: the command line and the printed table."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from launcher.config import CONFIG_ROOT
from pretrain.memory.model import PlanError, load_model
from pretrain.memory.zero import CONTEXT_BYTES, FRAGMENTATION, GiB, Plan, Setup, plan

# ----------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_UNITS = {"": GiB, "k": 2**10, "m": 2**20, "g": GiB, "t": 2**40}


def parse_memory(text: str) -> float:
    """'80GB', '80 GiB', '80' (GiB), '81559MiB' -> bytes. GPU sizes are binary: an "80 GB"
    H100 reports 81559 MiB, so GB and GiB both mean 2**30 here."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 80GB, 40GiB or 24, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln plan",
        description="Per-GPU memory of a training run: parameters, gradients, optimizer "
        "states, activations, DeepSpeed buffers; and whether it fits.",
    )
    p.add_argument("model", metavar="MODEL_PRESET", help="a name in configs/model/ or a yaml")
    p.add_argument("--gpus", type=_positive_int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=_positive_int, default=1, help="nodes (default 1)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage")
    p.add_argument("--micro-batch", type=_positive_int, default=1, help="sequences per GPU")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="default: max_seq_len")
    p.add_argument(
        "--offload",
        action="store_true",
        help="optimizer states to CPU (ZeRO>=1), and parameters too under ZeRO-3",
    )
    p.add_argument("--gpu-memory", type=parse_memory, default=80 * GiB, help="default 80GB")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument(
        "--reduce-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 only: dtype gradients are accumulated and reduced in (dist.reduce_dtype)",
    )
    p.add_argument("--activation-checkpointing", action="store_true")
    return p


def format_plan(r: Plan) -> str:
    cfg, s = r.model, r.setup
    from pretrain.model import describe

    G = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    prec = (
        f"bf16 + fp32 master weights, gradients reduced in {s.reduce_dtype}"
        if s.precision == "bf16"
        else "fp32"
    )
    lines = [
        f"model     {describe(cfg, s.seq_len)}",
        f"setup     {s.world} GPUs ({s.nodes} node(s) x {s.gpus}), ZeRO-{s.zero}"
        + (" + offload" if s.offload else "")
        + f", {prec}, micro-batch {s.micro_batch} x {s.seq_len} tokens, activation "
        f"checkpointing {'on' if s.activation_checkpointing else 'off'}",
        f"deepspeed {_display(r.template)}",
        "",
        f"{'per GPU':26s}{'GiB':>8s}   what",
    ]
    for key, label in [
        ("params", "parameters"),
        ("grads", "gradients"),
        ("optimizer", "optimizer states"),
        ("activations", "activations"),
        ("buffers", "DeepSpeed buffers"),
    ]:
        lines.append(f"  {label:24s}{G(r.component(key))}   {r.notes.get(key, '')}")
    lines += ["  " + "-" * 32]
    for moment in r.moments:
        lines.append(f"  peak at {moment:16s}{G(sum(r.moments[moment].values()))}")
    lines += [
        f"  {'total (the largest)':24s}{G(r.total)}",
        f"  {'headroom':24s}{G(r.headroom)}   CUDA context, NCCL, cuBLAS "
        f"{CONTEXT_BYTES / GiB:.0f} GiB + {FRAGMENTATION:.0%} for allocator fragmentation",
        f"  {'GPU memory':24s}{G(s.gpu_memory)}",
        "",
        f"activations: {r.activations_plain / GiB:.2f} GiB without activation checkpointing, "
        f"{r.activations_checkpointed / GiB:.2f} GiB with",
    ]
    if r.cpu:
        lines.append(f"CPU memory per node: {r.cpu / GiB:.2f} GiB ({r.cpu_note})")
    spare = s.gpu_memory - r.headroom - r.total
    if r.fits:
        lines.append(f"fits: yes, {spare / GiB:.2f} GiB to spare")
    else:
        hints = []
        if not s.activation_checkpointing and r.peak_moment == "forward/backward":
            hints.append("--activation-checkpointing")
        if s.zero < 3:
            hints.append(f"--zero {s.zero + 1}")
        if not s.offload and s.zero:
            hints.append("--offload")
        if r.buffers > 0.2 * r.total:
            hints.append(f"a smaller reduce_bucket_size in {_display(r.template)}")
        hints.append("more GPUs")
        lines.append(f"fits: NO, {-spare / GiB:.2f} GiB short; try {', '.join(hints)}")
    return "\n".join(lines)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(CONFIG_ROOT.parent))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_model(args.model)
        seq = args.seq_len or cfg.max_seq_len
        if seq > cfg.max_seq_len:
            raise PlanError(
                f"--seq-len: {seq} is longer than the model's max_seq_len ({cfg.max_seq_len})"
            )
        if args.offload and args.zero == 0:
            raise PlanError("--offload: DeepSpeed offloads under ZeRO 1-3 only; add --zero 1")
    except PlanError as exc:
        print(f"kiln plan: error: {exc}", file=sys.stderr)
        return 2
    setup = Setup(
        gpus=args.gpus,
        nodes=args.nodes,
        zero=args.zero,
        micro_batch=args.micro_batch,
        seq_len=seq,
        offload=args.offload,
        precision=args.precision,
        reduce_dtype=args.reduce_dtype,
        activation_checkpointing=args.activation_checkpointing,
        gpu_memory=args.gpu_memory,
    )
    print(format_plan(plan(cfg, setup)))
    return 0
