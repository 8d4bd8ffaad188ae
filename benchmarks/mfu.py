"""Model FLOPs utilisation on CPU: model FLOP/s over the measured fp32 matmul peak.

For d_model 128, 512 and 1024 (Llama blocks, SwiGLU, vocab 4096, shapes below) this runs
kiln's training loop (`python -m launcher pretrain`, 1 process, ZeRO-0, fp32) eager and with
``train.compile=true``, beside the minimal plain PyTorch loop (``common.plain_steps``: fused
AdamW, clipping) eager and compiled, each in a fresh process, alternating. Model FLOPs per
token come from ``pretrain.model.flops_per_token`` (matmul FLOPs counted by torch's
FlopCounterMode, forward + backward, attention included); the peak is the best
``torch.mm`` of two 2048 x 2048 fp32 matrices measured just before each run in this process
(the same probe kiln's MFU metric uses on CPU). MFU = tokens/s x FLOPs/token / peak.

    python benchmarks/mfu.py [--steps 8] [--rounds 1] [--sizes 128 512 1024]

About 9 minutes on 2 cores (compilation included: each compiled run compiles first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import in_subprocess, kiln_run, machine, matmul_peak, plain_steps, prepare
from common import write_config as _write

# d_model -> (n_layers, n_heads, ffn_size, micro-batch, seq_len): head dim 64, ffn ~ 8/3 d,
# micro-batch x seq_len tokens per step chosen for about 1-3 s per step here.
SHAPES = {
    128: (4, 2, 384, 8, 512),
    512: (8, 8, 1408, 8, 256),
    1024: (4, 16, 2816, 4, 256),
}
VOCAB = 4096
VARIANTS = ("plain", "plain-compiled", "kiln", "kiln-compiled")


def config_for(out: Path, d: int) -> Path:
    layers, heads, ffn, micro, seq = SHAPES[d]
    model = (
        f"{{vocab_size: {VOCAB}, d_model: {d}, n_layers: {layers}, n_heads: {heads}, "
        f"ffn_size: {ffn}, max_seq_len: {seq}, tie_embeddings: false}}"
    )
    return _write(out, f"d{d}", model=model, seq=seq, micro=micro, vocab=VOCAB)


def run(variant: str, d: int, config: Path, steps: int, round_: int) -> tuple[list[float], float]:
    """Seconds per step of one fresh run, and the MFU kiln itself logged (nan for plain)."""
    _, _, _, micro, seq = SHAPES[d]
    if variant.startswith("plain"):
        args = ["--worker", variant, "--d", str(d), "--steps", str(steps)]
        return in_subprocess(__file__, *args, "--out", str(config.parent)), float("nan")
    extra = ["dist.zero_stage=0", f"train.compile={variant == 'kiln-compiled'}"]
    lines = kiln_run(config, f"{variant}-d{d}-r{round_}", steps, *extra)
    times = [micro * seq / m["throughput/tokens_per_s"] for m in lines]
    return times, statistics.median(m["throughput/mfu"] for m in lines[ARGS.warmup :])


def main() -> None:
    from pretrain.model import flops_per_token, param_count

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps dropped (compilation, caches)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="*", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--only", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("/tmp/kiln-bench-mfu"))
    p.add_argument("--worker", choices=("plain", "plain-compiled"), help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    global ARGS
    ARGS = args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        _, _, _, micro, seq = SHAPES[args.d]
        config = config_for(args.out, args.d)
        compiled = args.worker == "plain-compiled"
        print(json.dumps(plain_steps(config, args.steps, micro, seq, compile=compiled)))
        return

    started = time.time()
    configs = {d: config_for(args.out, d) for d in args.sizes}
    prepare(configs[args.sizes[0]])  # one corpus and tokenizer serve every size
    rows = []
    for r in range(args.rounds):
        for d in args.sizes:
            cfg = _model(configs[d])
            _, _, _, micro, seq = SHAPES[d]
            fpt = flops_per_token(cfg, seq)
            for v in args.only:
                peak = matmul_peak()
                times, logged = run(v, d, configs[d], args.steps, r)
                step = statistics.median(times[args.warmup :])
                tps = micro * seq / step
                rows.append((d, v, r, step, tps, tps * fpt, peak, logged, param_count(cfg)))
                print(
                    f"d{d} {v} r{r}: {step:.3f}s/step MFU {tps * fpt / peak:.1%}", file=sys.stderr
                )
    report(rows, args, time.time() - started)


def _model(config: Path):
    from common import model_config

    return model_config(config)


def report(rows, args, seconds: float) -> None:
    print(f"\n{machine()}")
    print(
        f"{args.rounds} round(s) x {args.steps} steps (first {args.warmup} dropped), "
        f"{seconds / 60:.1f} min; 1 process, fp32, fused AdamW, clip 1.0\n"
    )
    print(
        "| d_model | shape (layers, heads, ffn; batch x seq) | params | variant | s/step "
        "| tokens/s | model GFLOP/s | matmul peak GFLOP/s | MFU | MFU kiln logged |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    grouped: dict[tuple[int, str], list] = {}
    for row in rows:
        grouped.setdefault(row[:2], []).append(row)
    for (d, v), runs in grouped.items():
        layers, heads, ffn, micro, seq = SHAPES[d]
        step = statistics.median(x[3] for x in runs)
        tps = statistics.median(x[4] for x in runs)
        achieved = statistics.median(x[5] for x in runs)
        peak = statistics.median(x[6] for x in runs)
        mfu = statistics.median(x[5] / x[6] for x in runs)
        logged = statistics.median(x[7] for x in runs)
        logged_s = "-" if logged != logged else f"{logged:.1%}"
        print(
            f"| {d} | {layers}, {heads}, {ffn}; {micro} x {seq} | {runs[0][8] / 1e6:.1f}M | {v} "
            f"| {step:.3f} | {tps:,.0f} | {achieved / 1e9:.1f} | {peak / 1e9:.1f} | {mfu:.1%} "
            f"| {logged_s} |"
        )


if __name__ == "__main__":
    main()
