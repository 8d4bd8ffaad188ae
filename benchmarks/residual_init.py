"""Residual-branch init: the first steps of a preset with and without it. Prints a table.

``model.init_scaled_residual`` (the default) starts the matrices that write into the residual
stream (attention ``o_proj``, MLP ``down_proj``) at init_std / sqrt(2 x n_layers), as GPT-2,
Megatron and torchtitan do; ``false`` starts them at init_std like every other matrix. Both
runs use kiln's training loop (1 process, fp32) with the same seed, so the same data
in the same order and the same values for every other weight; only those matrices differ.
No evaluation, checkpoint or export: each run only trains and logs every step.

    python benchmarks/residual_init.py [--model 125m] [--steps 200] [--seq 64] [--micro 4]
    python benchmarks/residual_init.py --report-only   # the table again, from --out

The defaults (125m as shipped, 4 x 64 tokens per step: a short sequence and a small batch, to
keep both runs near 10 minutes on 2 idle CPU cores) are the RESULTS.md table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import in_subprocess, machine, step_seconds, write_config

VARIANTS = {"scaled": "true", "plain": "false"}  # name -> model.init_scaled_residual
LR, WARMUP = 1e-3, 20
WINDOW = 10  # one step's loss on 256 tokens is noisy: also the mean of the last 10 steps


def train(config: Path, variant: str, steps: int) -> list[float]:
    """Train ``steps`` steps in this process; the loss of every step."""
    from launcher.callbacks import Log
    from launcher.config import load_config
    from launcher.loop import Trainer
    from launcher.runtime import build_runtime
    from pretrain.config import PretrainConfig
    from pretrain.prepare import prepare_inputs
    from pretrain.task import PretrainTask

    overrides = [
        f"run.name={variant}",
        f"model.init_scaled_residual={VARIANTS[variant]}",
        f"train.max_steps={steps}",
        f"schedule.warmup_steps={min(WARMUP, steps // 2)}",
        f"optim.lr={LR}",
        "checkpoint.resume=none",
    ]
    cfg = load_config(PretrainConfig, str(config), overrides)
    prepare_inputs(cfg)  # the tokenizer: trained on the same corpus, identical for both
    (cfg.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    runtime = build_runtime(cfg)
    try:
        trainer = Trainer(cfg, runtime, PretrainTask(cfg, runtime), [Log(1)])
        trainer.setup()
        trainer.fit()
    finally:
        runtime.close()
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").open()]
    assert {m["dist/world_size"] for m in lines} == {1.0}
    return [m["train/loss"] for m in lines if "train/loss" in m]


def preset_vocab(name: str) -> int:
    import yaml

    from launcher.config import CONFIG_ROOT

    return yaml.safe_load((CONFIG_ROOT / "model" / f"{name}.yaml").read_text())["vocab_size"]


def residual_init_std(config: Path, scaled: str) -> float:
    from launcher.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.model import residual_init_std as std_of

    cfg = load_config(PretrainConfig, str(config), [f"model.init_scaled_residual={scaled}"])
    return std_of(cfg.model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="125m", help="a preset of configs/model/")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro", type=int, default=4, help="sequences per step (one micro-batch)")
    p.add_argument("--out", type=Path, default=Path("/tmp/kiln-bench-residual"))
    p.add_argument("--report-only", action="store_true", help="the table of the runs in --out")
    p.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = min(4096, preset_vocab(args.model))  # what the built-in corpus supports
    config = write_config(
        args.out, "residual", model=args.model, seq=args.seq, micro=args.micro, vocab=vocab
    )
    if args.worker:
        print(json.dumps(train(config, args.worker, args.steps)))
        return
    for variant in [] if args.report_only else VARIANTS:  # fresh processes, one after the other
        t = time.time()
        in_subprocess(
            __file__,
            f"--worker={variant}",
            f"--model={args.model}",
            f"--steps={args.steps}",
            f"--seq={args.seq}",
            f"--micro={args.micro}",
            f"--out={args.out}",
        )
        print(f"{variant}: {time.time() - t:.0f}s", file=sys.stderr)
    report(args, config)


def report(args, config: Path) -> None:
    """The table, from the runs' metrics.jsonl (losses and the time of every step)."""
    from common import model_config

    cfg = model_config(config)
    losses, minutes = {}, {}
    for variant in VARIANTS:
        lines = [json.loads(x) for x in (args.out / "runs" / variant / "metrics.jsonl").open()]
        lines = [m for m in lines if "train/loss" in m]
        losses[variant] = [m["train/loss"] for m in lines]
        minutes[variant] = sum(step_seconds(lines, args.micro * args.seq)) / 60
    n = len(losses["scaled"])
    print(f"\n{machine()}")
    print(
        f"`{args.model}` ({cfg.n_layers} layers x {cfg.d_model}, vocab {cfg.vocab_size}; "
        f"tokenizer {min(4096, cfg.vocab_size)}), {args.micro} x {args.seq} tokens per step "
        f"(short sequences and a small batch: 2 CPU cores), AdamW lr {LR:g}, "
        f"{min(WARMUP, n // 2)} warmup steps then cosine to {n}, clip 1.0, seed 0, fp32, "
        f"1 process (ZeRO-2, kiln's default); training time "
        + ", ".join(f"{v} {m:.1f} min" for v, m in minutes.items())
        + "\n"
    )
    stds = {v: residual_init_std(config, flag) for v, flag in VARIANTS.items()}
    print(
        f"| step | loss, scaled (o_proj/down_proj std {stds['scaled']:.5f}) "
        f"| loss, plain (std {stds['plain']:.3f}) | scaled - plain "
        f"| mean of the {WINDOW} steps up to it: scaled | plain | scaled - plain |"
    )
    print("|---|---|---|---|---|---|---|")
    for step in sorted({1, *range(50, n + 1, 50), n}):
        a, b = losses["scaled"][step - 1], losses["plain"][step - 1]
        window = slice(max(0, step - WINDOW), step)
        ma = statistics.mean(losses["scaled"][window])
        mb = statistics.mean(losses["plain"][window])
        print(
            f"| {step} | {a:.4f} | {b:.4f} | {a - b:+.4f} | {ma:.4f} | {mb:.4f} | {ma - mb:+.4f} |"
        )


if __name__ == "__main__":
    main()
