"""What does the framework cost per training step? Prints a markdown table.

Compared, on the same model (`small` shape, vocab 4096), the same micro-batch (8 x 256 tokens)
and the same optimizer (AdamW, fused, clipping at 1.0):

- ``plain``: the minimal PyTorch loop of ``common.plain_steps`` (forward, cross-entropy,
  backward, ``clip_grad_norm_``, ``step``, ``zero_grad``) over one fixed batch: the floor;
- ``hf-trainer``: transformers' ``Trainer`` over the same batches;
- ``kiln-z0``: ``python -m launcher pretrain`` with 1 process, ZeRO-0 (the whole framework:
  streamed data with one DataLoader worker, DeepSpeed engine, metrics every step, the
  stop/save check every step);
- ``kiln-z0-w0``: the same with ``data.num_workers=0`` (the stream read and tokenized in the
  training process instead of a DataLoader worker process);
- ``kiln-z2x2``: the same with 2 processes and ZeRO-2 (gloo), compared per token: on this
  2-core machine, 2 ranks of 1 thread each against 1 process of 2 threads.

Every variant runs in its own fresh process; rounds alternate the variants (the machine may
be shared) and the table shows medians over rounds of each run's median step time after
``--warmup`` steps. Ratio = seconds per token / the plain loop's, of the medians and of the
best runs: on a shared host noise only ever adds time, so the best run is the estimate of a
variant's own cost (``timeit``'s reasoning) and the median says what a user sees. For kiln
runs, "loop's own" is what a step takes besides forward/backward, the optimizer step and the
data wait (all from the run's own ``time/*`` metrics): the framework's bookkeeping.

    python benchmarks/loop_overhead.py [--steps 14] [--rounds 3] [--out /tmp/kiln-bench-loop]
    python benchmarks/loop_overhead.py --profile   # + where a kiln-z0 run's time goes

About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

from common import (
    CLIP,
    LR,
    fixed_batch,
    in_subprocess,
    kiln_run,
    machine,
    model_config,
    plain_steps,
    prepare,
    step_seconds,
    write_config,
)

SEQ, MICRO, VOCAB = 256, 8, 4096
VARIANTS = ("plain", "hf-trainer", "kiln-z0", "kiln-z0-w0", "kiln-z2x2")
DATA_WAIT: dict[str, list[float]] = {}
OWN: dict[str, list[float]] = {}  # seconds per step outside compute, data wait included


def trainer_steps(config: Path, steps: int, out: Path) -> list[float]:
    """transformers' Trainer on the same model and batch; seconds per step from a callback."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pretrain.model import build_model

    model = build_model(model_config(config), seed=0)
    inputs, _ = fixed_batch(VOCAB, MICRO, SEQ)
    # Llama shifts labels itself: labels = input_ids gives the same next-token loss.
    rows = [{"input_ids": row, "labels": row} for row in inputs] * steps

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)

    args = TrainingArguments(
        output_dir=str(out / "hf-trainer"),
        per_device_train_batch_size=MICRO,
        max_steps=steps,
        learning_rate=LR,
        max_grad_norm=CLIP,
        optim="adamw_torch_fused",
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()]).train()
    return times


def measure(variant: str, config: Path, steps: int, out: Path, round_: int) -> float:
    """Median seconds per token of one fresh run of ``variant`` (for kiln runs, also notes
    the share of a step spent waiting for data, from the run's own ``time/data_wait``)."""
    if variant.startswith("kiln"):
        nproc = 2 if variant == "kiln-z2x2" else 1
        world = ["dist.zero_stage=2"] if nproc == 2 else ["dist.zero_stage=0"]
        world.append(f"train.global_batch_size={MICRO * nproc}")
        if variant.endswith("-w0"):  # tokenize in the training process: no worker process
            world.append("data.num_workers=0")
        lines = kiln_run(config, f"{variant}-r{round_}", steps, *world, nproc=nproc)
        times, tokens = step_seconds(lines, MICRO * SEQ * nproc), MICRO * SEQ * nproc
        waits = [m["time/data_wait"] / t for m, t in zip(lines, times, strict=True)]
        waits = waits[ARGS.warmup :]
        DATA_WAIT.setdefault(variant, []).append(statistics.median(waits))
        phases = [sum(v for k, v in m.items() if k.startswith("time/")) for m in lines]
        own = [t - p for t, p in zip(times, phases, strict=True)]
        OWN.setdefault(variant, []).append(statistics.median(own[ARGS.warmup :]))
    else:
        args = ["--worker", variant, "--steps", str(steps), "--out", str(out)]
        times, tokens = in_subprocess(__file__, *args), MICRO * SEQ
    return statistics.median(times[ARGS.warmup :]) / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/kiln-bench-loop"))
    p.add_argument("--only", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--profile", action="store_true", help="cProfile one more kiln-z0 run")
    p.add_argument("--worker", choices=("plain", "hf-trainer"), help=argparse.SUPPRESS)
    global ARGS
    ARGS = args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = write_config(
        args.out, "bench", model=f"{{extends: small, vocab_size: {VOCAB}}}", seq=SEQ, micro=MICRO
    )
    if args.worker == "plain":
        print(json.dumps(plain_steps(config, args.steps, MICRO, SEQ)))
        return
    if args.worker == "hf-trainer":
        print(json.dumps(trainer_steps(config, args.steps, args.out)))
        return

    started = time.time()
    prepare(config)
    per_token: dict[str, list[float]] = {v: [] for v in args.only}
    for r in range(args.rounds):
        for v in args.only:
            per_token[v].append(measure(v, config, args.steps, args.out, r))
            print(f"round {r} {v}: {per_token[v][-1] * 1e3:.3f} ms/token", file=sys.stderr)
    report(per_token, args, time.time() - started)
    if args.profile:
        path = args.out / "kiln-z0.prof"
        kiln_run(config, "kiln-z0-profiled", args.steps, "dist.zero_stage=0", profile=path)
        print("\ncProfile of one kiln-z0 run (whole process), top 25 by own time:\n```")
        pstats.Stats(str(path)).sort_stats("tottime").print_stats(25)
        print("```")


def report(per_token: dict[str, list[float]], args, seconds: float) -> None:
    base = statistics.median(per_token["plain"]) if "plain" in per_token else None
    best_base = min(per_token["plain"]) if "plain" in per_token else None
    print(f"\n{machine()}")
    print(
        f"{args.rounds} rounds x {args.steps} steps (first {args.warmup} dropped), "
        f"{seconds / 60:.1f} min\n"
    )
    print(
        "| variant | s/step (8x256 tokens per rank) | tokens/s | / plain | / plain, best runs "
        "| runs (ms/token) | data wait / step | loop's own ms/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for v, values in per_token.items():
        m = statistics.median(values)
        ranks = 2 if v == "kiln-z2x2" else 1
        ratio = f"{m / base:.3f}" if base else "-"
        best = f"{min(values) / best_base:.3f}" if best_base else "-"
        runs = ", ".join(f"{x * 1e3:.3f}" for x in values)
        wait = f"{statistics.median(DATA_WAIT[v]):.2%}" if v in DATA_WAIT else "-"
        own = f"{statistics.median(OWN[v]) * 1e3:.1f}" if v in OWN else "-"
        step = m * MICRO * SEQ * ranks
        print(f"| {v} | {step:.3f} | {1 / m:,.0f} | {ratio} | {best} | {runs} | {wait} | {own} |")


if __name__ == "__main__":
    main()
