"""How much memory does each ZeRO stage save per rank? Measured through the real training path,
compared with the planner (`python -m launcher plan`).

For ZeRO 0, 1, 2, 3 on 1 and 2 ranks, torchrun starts the ranks (gloo, fp32 on CPU), each
builds the runtime (`launcher.runtime.build_runtime`, which refuses a world it was not
validated for; we also assert the world size we asked for, the Accelerate-on-CPU trap), a
`PretrainTask` and a `Trainer`, runs `Trainer.setup()` (model, our AdamW from
launcher/optim.py, DeepSpeed through Accelerate) and two `Trainer.train_step()`s of the
`125m` preset at micro-batch 1 x 32 tokens, so that model states dominate.

CPU has no `torch.cuda.max_memory_allocated`, so during the second step every rank takes a
census of live tensor storages (deduplicated by storage pointer) at the moments where memory
peaks: forward pre-hooks and backward pre-hooks of a few decoder layers and the embedding,
inside every large collective (ZeRO-0's flattened all-reduce, ZeRO-3's reduce-scatter),
right before ZeRO-1/2 free their reduce buckets, after backward, before each call of our
optimizer's step (DeepSpeed calls it per group), and after the step. Storages are sorted into

* params:    model parameters (ZeRO-1/2 flat buffer, ZeRO-3 shards, gathered ZeRO-3 params)
* grads:     `.grad`s, DeepSpeed's gradient partitions and the fp32 gradient copies
* optimizer: Adam's exp_avg/exp_avg_sq and DeepSpeed's fp32 master partitions
* buffers:   DeepSpeed's reduce buckets (`ipg_buckets`): fixed-size, see the table notes
* other:     every other live tensor found by `gc` (activations, autograd's in-flight grads)

and the peak is the largest census. As a cross-check, the RSS high-water mark
(`ru_maxrss`) minus the RSS before `Trainer.setup()`. About 5 minutes on 2 cores, < 4 GB
per rank:

    python benchmarks/zero_memory.py [--model 125m] [--seq-len 32] [--root /tmp/kiln-zero-memory]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from launcher.config import CONFIG_ROOT, load_config
from pretrain.memory import Setup, knobs_from, plan

STAGES, WORLDS = (0, 1, 2, 3), (1, 2)
KINDS = ("buffers", "optimizer", "params", "grads", "other")
# When a storage is reachable in several ways the first kind here wins: a ZeRO-0 parameter is
# also in the optimizer's param_groups, while DeepSpeed's fp32 masters ("master", counted as
# optimizer) are only there.
# A tensor handed to a big collective and known in no other way ("comm": ZeRO-0's flattened
# gradients) is a communication buffer too.
PRIORITY = {
    k: i
    for i, k in enumerate(("buffers", "optimizer", "params", "master", "grads", "comm", "other"))
}
MiB = 2**20
GOAL = 0.55  # ZeRO-3 on 2 ranks should need at most this fraction of 1 rank's states


def run_config(root: Path, model: str, seq_len: int, stage: int, world: int):
    from pretrain.config import PretrainConfig

    overrides = [
        f"model={model}",
        f"run.output_dir={root}",
        "run.name=zero-memory",
        f"data.builtin.dir={root / 'corpus'}",
        f"data.seq_len={seq_len}",
        "data.num_workers=0",  # no extra processes in the RSS picture
        "train.micro_batch_size=1",
        f"train.global_batch_size={world}",  # no accumulation: one micro-batch per step
        "train.max_steps=3",
        "train.precision=fp32",
        "schedule.warmup_steps=1",
        f"dist.zero_stage={stage}",
        f"dist.num_processes={world}",
        "metrics.wandb=false",
        "metrics.progress_bar=false",
        "metrics.peak_flops=1e12",  # skip the matmul probe
        "eval.every=null",
        "checkpoint.resume=none",
        "checkpoint.every=null",
    ]
    return load_config(PretrainConfig, CONFIG_ROOT / "pretrain" / "tiny.yaml", overrides)


# ------------------------------------------------------------------------------ the census


class Census:
    """Live tensor storages by kind, each counted once (keyed by its data pointer)."""

    def __init__(self):
        self.storages: dict[int, tuple[int, str, str]] = {}

    def add(self, t, kind: str, label: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes or not ptr:
            return
        old = self.storages.get(ptr)
        if old is None or PRIORITY[kind] < PRIORITY[old[1]]:
            self.storages[ptr] = (nbytes, kind, label)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for nbytes, kind, _ in self.storages.values():
            out[{"master": "optimizer", "comm": "buffers"}.get(kind, kind)] += nbytes
        return out


def _walk(obj, path: str, depth: int, seen: set, out: list) -> None:
    """Every tensor reachable from a DeepSpeed object through attributes and containers."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.is_leaf and obj.requires_grad and obj.grad is not None:
            out.append((path + ".grad", obj.grad))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(k, f"{path}.key", depth + 1, seen, out)
            _walk(v, f"{path}[{k if isinstance(k, str | int) else '.'}]", depth + 1, seen, out)
    elif isinstance(obj, list | tuple | set):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", depth + 1, seen, out)
    elif not isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith("deepspeed"):
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", depth + 1, seen, out)


def census(engine, optimizer, in_flight=()) -> Census:
    """Sort every live storage into KINDS; ``in_flight`` are the tensors of the collective
    running now."""
    c = Census()
    # A tensor shaped like a whole parameter that is neither its weights nor its .grad is a
    # gradient on its way (autograd's buffer for a tied weight, a gradient too big for the
    # reduce bucket): a gradient, not an activation.
    shapes = {tuple(getattr(p, "ds_shape", p.shape)) for p in engine.module.parameters()}
    sizes = {math.prod(shape) for shape in shapes}
    zero = engine.optimizer if engine.optimizer is not optimizer else None
    found: list = []
    if zero is not None:  # ZeRO's own structures; our optimizer is walked below
        _walk(zero, "zero", 0, {id(optimizer)}, found)
    for path, t in found:
        if "ipg_bucket" in path:
            c.add(t, "buffers", path)
    for param, state in optimizer.state.items():
        for k, v in state.items():
            c.add(v, "optimizer", f"adam.{k}")
        c.add(param, "master", "fp32 master")  # DeepSpeed steps one group at a time
    for name, p in engine.module.named_parameters():
        c.add(p.data, "params", name)
        c.add(getattr(p, "ds_tensor", None), "params", name + " (ZeRO-3 shard)")
        c.add(p.grad, "grads", name + ".grad")
        c.add(getattr(p, "grad_accum", None), "grads", name + ".grad_accum")
    for group in optimizer.param_groups:  # under ZeRO: DeepSpeed's fp32 master partitions
        for p in group["params"]:
            c.add(p, "master", "fp32 master")
            c.add(p.grad, "grads", "fp32 master .grad")
    for path, t in found:
        low = path.lower()
        kind = "grads" if "grad" in low else "master" if "fp32" in low else "params"
        c.add(t, kind, path)
    for t in in_flight:
        whole_param = t.numel() in sizes
        c.add(t, "grads" if whole_param else "comm", "in the collective")
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            in_flight_grad = tuple(obj.shape) in shapes and obj.ndim > 1
            c.add(obj, "grads" if in_flight_grad else "other", "gc")
    return c


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ------------------------------------------------------------------------------ one rank


def worker(args) -> None:
    import torch.distributed as dist

    measuring = {"on": False}
    snaps: list[dict] = []
    ctx: dict = {}

    def snap(where: str, in_flight=()) -> None:
        if not measuring["on"]:
            return
        measuring["on"] = False  # no census of the census' own collectives
        gc.collect()
        c = census(ctx["engine"], ctx["optimizer"], in_flight)
        totals = c.totals()
        snaps.append({"where": where, **totals, "rss": rss_bytes()})
        if args.debug and dist.get_rank() == 0:
            print(where, {k: round(v / MiB, 1) for k, v in totals.items()}, file=sys.stderr)
            for nbytes, kind, label in sorted(c.storages.values(), reverse=True)[:12]:
                print(f"    {nbytes / MiB:9.2f} MiB {kind:9s} {label}", file=sys.stderr)
        measuring["on"] = True

    # Collectives on big tensors are where transient copies live (ZeRO-0 flattens all
    # gradients into one all-reduce bucket); patch before DeepSpeed binds them.
    big = {"numel": 0}
    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor"):
        original = getattr(dist, name)

        def wrapped(*a, _original=original, _name=name, **k):
            tensors = [x for x in (*a, *k.values()) if isinstance(x, torch.Tensor)]
            if big["numel"] and any(t.numel() >= big["numel"] for t in tensors):
                snap(f"in {_name}", tensors)
            return _original(*a, **k)

        setattr(dist, name, wrapped)

    from launcher.loop import Trainer
    from launcher.runtime import build_runtime, seed_everything
    from pretrain.model import param_count
    from pretrain.task import PretrainTask

    cfg = run_config(Path(args.root), args.model, args.seq_len, args.stage, args.world)
    rt = build_runtime(cfg)  # raises if the world differs from dist.num_processes
    world = dist.get_world_size() if dist.is_initialized() else 1
    assert world == rt.world_size == args.world, f"asked for {args.world} ranks, got {world}"
    seed_everything(cfg.run.seed, rt.rank)
    trainer = Trainer(cfg, rt, PretrainTask(cfg, rt), callbacks=[])
    gc.collect()
    rss_before = rss_bytes()
    trainer.setup()
    engine, optimizer = trainer.engine, trainer.optimizer
    ctx.update(engine=engine, optimizer=optimizer)
    big["numel"] = param_count(cfg.model) // 10

    optimizer.register_step_pre_hook(lambda *a, **k: snap("optimizer step"))
    layers = engine.module.model.layers
    for i in sorted({0, len(layers) - 1}):
        layers[i].register_forward_pre_hook(lambda *a, i=i: snap(f"forward layer {i}"))
        layers[i].register_full_backward_pre_hook(lambda *a, i=i: snap(f"backward layer {i}"))
    engine.module.get_input_embeddings().register_full_backward_pre_hook(
        lambda *a: snap("backward embedding")
    )
    zero = engine.optimizer
    if hasattr(zero, "_release_ipg_buffers"):  # ZeRO-1/2: buckets + gradient partition, together
        release = zero._release_ipg_buffers

        def measured_release(*a, **k):
            snap("end of backward (buckets still held)")
            return release(*a, **k)

        zero._release_ipg_buffers = measured_release
    backward = engine.backward

    def measured_backward(loss, *a, **k):
        out = backward(loss, *a, **k)
        snap("after backward")
        return out

    engine.backward = measured_backward
    trainer.batches = iter(trainer.loader)
    trainer.train_step()  # the first step: Adam states and ZeRO-3's prefetch trace settle
    measuring["on"] = True
    trainer.train_step()
    snap("after the step")
    measuring["on"] = False
    result = {
        "rank": rt.rank,
        "world": world,
        "snaps": snaps,
        "rss_before": rss_before,
        "max_rss": max_rss_bytes(),
    }
    Path(args.out, f"rank{rt.rank}.json").write_text(json.dumps(result))
    rt.close()


# ---------------------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sized_template(root: Path, model: str) -> Path:
    """Our ZeRO-3 template with the fixed size knobs it had before they became "auto"
    (sized to the model by launcher.runtime.resolve_sizes): 5e8-element reduce bucket and
    prefetch, persistence threshold 1e6, 1e9 parameters kept resident or for reuse
    (DeepSpeed's defaults for the last two)."""
    ds = json.loads((CONFIG_ROOT / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"].update(
        reduce_bucket_size=5e8,
        stage3_prefetch_bucket_size=5e8,
        stage3_param_persistence_threshold=1e6,
        stage3_max_live_parameters=1e9,
        stage3_max_reuse_distance=1e9,
    )
    path = root / "zero3-sized.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def _preset(model: str) -> dict:
    import yaml

    return yaml.safe_load((CONFIG_ROOT / "model" / f"{model}.yaml").read_text())


def measure(args, label: str, stage: int, world: int, template: Path | None = None) -> dict:
    """Run one (stage, world) under torchrun; the worst rank's numbers."""
    out = Path(args.root) / "out" / f"zero{label.replace('*', '-sized')}-x{world}"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={world}",
        f"--master-port={_free_port()}",
        __file__,
        "--worker",
        f"--stage={stage}",
        f"--world={world}",
        f"--out={out}",
        f"--root={args.root}",
        f"--model={args.model}",
        f"--seq-len={args.seq_len}",
    ]
    # Allocations >= 1 MiB get their own mmap and go back to the OS when freed, so RSS follows
    # the live tensors instead of glibc's arenas.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB), "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join([str(CONFIG_ROOT.parent), env.get("PYTHONPATH", "")])
    if template is not None:  # the runtime takes the template the accelerate config names
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(template)
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    if done.returncode != 0:
        raise SystemExit(
            f"ZeRO-{stage} x {world} failed:\n{done.stdout[-3000:]}{done.stderr[-5000:]}"
        )
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert len(ranks) == world and all(r["world"] == world for r in ranks), "wrong world size"
    worst: dict = {"seconds": time.time() - started}
    for r in ranks:
        snaps = r["snaps"]
        states = lambda s: s["params"] + s["grads"] + s["optimizer"]  # noqa: E731
        row = {k: max(s[k] for s in snaps) for k in KINDS}
        row["states"] = max(states(s) for s in snaps)
        row["no_buffers"] = max(states(s) + s["other"] for s in snaps)
        row["total"] = max(states(s) + s["other"] + s["buffers"] for s in snaps)
        row["where"] = max(snaps, key=states)["where"]
        row["rss_delta"] = r["max_rss"] - r["rss_before"]
        row["snapshots"] = len(snaps)
        for k, v in row.items():
            if isinstance(v, int | float) and v > worst.get(k, -1):
                worst[k] = v
                if k == "states":
                    worst["where"] = row["where"]
    return worst


def predict(args, stage: int, world: int, template: Path | None = None) -> dict:
    cfg = run_config(Path(args.root), args.model, args.seq_len, stage, world)
    d_model = cfg.model.d_model
    knobs = knobs_from(template, stage, d_model=d_model) if template is not None else None
    p = plan(
        cfg.model,
        Setup(gpus=world, zero=stage, micro_batch=1, seq_len=args.seq_len, precision="fp32"),
        knobs=knobs,
        template=template,
    )
    return {
        "params": p.params,
        "grads": p.grads,
        "optimizer": p.optimizer,
        "buffers": p.buffers,
        "states": p.peak(without=("activations", "buffers")),
        "no_buffers": p.peak(without=("buffers",)),
        "total": p.total,
    }


def fmt(b: float) -> str:
    return f"{b / MiB:,.0f}"


def err(pred: float, meas: float) -> str:
    if meas == 0:
        return "exact" if pred == 0 else "n/a"
    return f"{(pred - meas) / meas:+.1%}"


def report(args, results: dict, predictions: dict, seconds: float) -> str:
    import platform

    from pretrain.model import describe

    cfg = run_config(Path(args.root), args.model, args.seq_len, 0, 1)
    lines = [
        f"model {args.model}: {describe(cfg.model, args.seq_len)}",
        f"micro-batch 1 x {args.seq_len} tokens, fp32, gloo, torch {torch.__version__}, "
        f"deepspeed {__import__('deepspeed').__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores; {seconds:.0f} s in all",
        "",
        "Measured peak per rank (worst rank), MiB. states = params + grads + optimizer at their "
        "joint peak; total adds other live tensors and DeepSpeed's reduce buckets; ratio = "
        "states / states on 1 rank; RSS = ru_maxrss - RSS before Trainer.setup().",
        "",
        "| ZeRO | ranks | params | grads | optimizer | states | ratio | other | buffers | total "
        "| ratio (total) | RSS delta | peak at |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (stage, world), m in results.items():
        one = results.get((stage, 1), m)
        lines.append(
            f"| {stage} | {world} | {fmt(m['params'])} | {fmt(m['grads'])} | "
            f"{fmt(m['optimizer'])} | {fmt(m['states'])} | {m['states'] / one['states']:.3f} | "
            f"{fmt(m['other'])} | {fmt(m['buffers'])} | {fmt(m['total'])} | "
            f"{m['total'] / one['total']:.3f} | {fmt(m['rss_delta'])} | {m['where']} |"
        )
    lines += [
        "",
        "Planner (`pretrain.memory`, fp32) beside the measurement, MiB (relative error). "
        "w/o buffers = states + activations/other at the peak.",
        "",
        "| ZeRO | ranks | params | grads | optimizer | states | w/o buffers | buffers | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst, small = 0.0, False
    for key, m in results.items():
        p = predictions[key]
        cells = []
        for k in ("params", "grads", "optimizer", "states", "no_buffers", "buffers", "total"):
            # a component under 1% of the total: its relative error says nothing
            negligible = max(p[k], m[k]) < max(0.01 * m["total"], MiB)
            cells.append(f"{fmt(p[k])} ({err(p[k], m[k])}{'*' if negligible else ''})")
            small |= negligible
            if m[k] and not negligible:
                worst = max(worst, abs(p[k] - m[k]) / m[k])
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    lines.append("")
    if small:
        lines.append("\\* under 1% of the total or 1 MiB: left out of the largest error")
    lines.append(f"largest planner error: {worst:.1%} (goal: within 15%)")
    for label, what in (("3", "our template, sized to the model"), ("3*", "fixed 5e8/1e9 knobs")):
        if (label, 1) in results and (label, 2) in results:
            r = results[label, 2]["states"] / results[label, 1]["states"]
            rt = results[label, 2]["total"] / results[label, 1]["total"]
            lines.append(
                f"ZeRO-3 ({what}), 2 ranks vs 1: states {r:.3f}x "
                f"({'met' if r <= GOAL else 'MISSED'}: goal <= {GOAL}); with DeepSpeed's "
                f"buffers {rt:.3f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="125m", help="model preset (default 125m)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--root", default="/tmp/kiln-zero-memory", help="work directory")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument(
        "--no-sized",
        dest="sized",
        action="store_false",
        help="skip ZeRO-3 with the former fixed 5e8/1e9 knobs (3* in the tables)",
    )
    # internal: one rank of one measurement
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from pretrain.prepare import prepare_inputs

    started = time.time()
    root = Path(args.root)
    prepare_inputs(run_config(root, args.model, args.seq_len, 0, 1))  # corpus + tokenizer
    results, predictions = {}, {}
    runs = [(s, int(s), None) for s in args.stages.split(",")]
    if args.sized and "3" in args.stages.split(","):
        runs.append(("3*", 3, sized_template(root, args.model)))
    for label, stage, template in runs:
        for world in (int(w) for w in args.worlds.split(",")):
            results[label, world] = measure(args, label, stage, world, template)
            predictions[label, world] = predict(args, stage, world, template)
            m = results[label, world]
            print(
                f"[zero_memory] ZeRO-{label} x {world}: states {fmt(m['states'])} MiB, total "
                f"{fmt(m['total'])} MiB ({m['snapshots']} censuses, {m['seconds']:.0f} s)",
                flush=True,
            )
    print()
    print(report(args, results, predictions, time.time() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
