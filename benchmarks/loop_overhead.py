"""What does the framework cost per training step? Prints a markdown table.

Compared, on the same model (`small` shape, vocab 4096), the same micro-batch (8 x 256 tokens)
and the same optimizer (AdamW, fused, clipping at 1.0):

- ``plain``: the minimal PyTorch loop this script contains (forward, cross-entropy, backward,
  ``clip_grad_norm_``, ``step``, ``zero_grad``) over one fixed batch: the floor;
- ``hf-trainer``: transformers' ``Trainer`` over the same batches;
- ``kiln-z0``: ``python -m launcher pretrain`` with 1 process, ZeRO-0 (the whole framework:
  streamed data, DeepSpeed engine, metrics, stop/save checks every step);
- ``kiln-z2x2``: the same with 2 processes and ZeRO-2 (gloo), compared per token: on this
  2-core machine, 2 ranks of 1 thread against 1 process of 2 threads.

Every variant runs in its own fresh process (same thread settings); rounds alternate the
variants (the machine may be shared) and the table shows medians over rounds of each run's
median step time after ``--warmup`` steps. Ratio = seconds per token / the plain loop's.

    python benchmarks/loop_overhead.py [--steps 14] [--rounds 3] [--out /tmp/kiln-bench-loop]
    python benchmarks/loop_overhead.py --profile   # + where a kiln step's time goes

About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ, MICRO, VOCAB, LR, CLIP = 256, 8, 4096, 1e-3, 1.0
VARIANTS = ("plain", "hf-trainer", "kiln-z0", "kiln-z2x2")


def bench_config(out: Path) -> Path:
    """The run config every kiln variant uses (and the others mirror)."""
    text = f"""\
run: {{name: bench, output_dir: {out}/runs}}
model: {{extends: small, vocab_size: {VOCAB}}}
tokenizer: {{vocab_size: {VOCAB}}}
data:
  builtin: {{docs: 4000, shards: 4, dir: {out}/corpus}}
  seq_len: {SEQ}
train: {{global_batch_size: {MICRO}, micro_batch_size: {MICRO}, max_steps: 10}}
optim: {{lr: {LR}, grad_clip: {CLIP}}}
schedule: {{warmup_steps: 2}}
eval: {{every: null, max_batches: 1}}
checkpoint: {{every: null}}
metrics: {{wandb: false, progress_bar: false, log_every: 1}}
"""
    path = out / "bench.yaml"
    path.write_text(text)
    return path


def model_config():
    from launcher.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, str(Path(os.environ["KILN_BENCH_CONFIG"]))).model


def fixed_batch():
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def worker_plain(steps: int) -> list[float]:
    import torch
    import torch.nn.functional as F

    from pretrain.model import build_model

    model = build_model(model_config(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    inputs, targets = fixed_batch()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def worker_trainer(steps: int, out: Path) -> list[float]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pretrain.model import build_model

    model = build_model(model_config(), seed=0)
    inputs, _ = fixed_batch()
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


def run_kiln(variant: str, steps: int, out: Path, round_: int, profile: bool) -> list[float]:
    """A real launcher run; step times from its metrics (tokens per step / tokens per s)."""
    name = f"{variant}-r{round_}"
    nproc = 2 if variant == "kiln-z2x2" else 1
    cmd = [sys.executable, "-m", "launcher", "pretrain", os.environ["KILN_BENCH_CONFIG"]]
    if profile:  # cProfile slows Python-heavy code: profiled runs are not in the table
        cmd[1:1] = ["-m", "cProfile", "-o", str(out / f"{name}.prof")]
    cmd += [f"run.name={name}", f"train.max_steps={steps}", "checkpoint.resume=none"]
    cmd += [f"train.global_batch_size={MICRO * nproc}"]
    cmd += ["dist.zero_stage=2", "--nproc", "2"] if nproc == 2 else ["dist.zero_stage=0"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").open()]
    lines = [m for m in lines if "throughput/tokens_per_s" in m]
    assert {m["dist/world_size"] for m in lines} == {float(nproc)}, "wrong world size"
    tokens = MICRO * SEQ * nproc
    return [tokens / m["throughput/tokens_per_s"] for m in lines]


def run_worker(variant: str, steps: int, out: Path) -> list[float]:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(steps), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if done.returncode:
        sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/kiln-bench-loop"))
    p.add_argument("--only", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--profile", action="store_true", help="cProfile one kiln-z0 run")
    p.add_argument("--worker", choices=("plain", "hf-trainer"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["KILN_BENCH_CONFIG"] = str(bench_config(args.out))
    if args.worker:
        fn = worker_plain if args.worker == "plain" else worker_trainer
        times = fn(args.steps) if args.worker == "plain" else fn(args.steps, args.out)
        print(json.dumps(times))
        return

    started = time.time()
    cfg = os.environ["KILN_BENCH_CONFIG"]
    prep = [sys.executable, "-m", "launcher", "prepare", cfg]
    subprocess.run(prep, cwd=args.out, check=True, capture_output=True)
    medians: dict[str, list[float]] = {v: [] for v in args.only}
    for r in range(args.rounds):
        for v in args.only:
            if v.startswith("kiln"):
                times = run_kiln(v, args.steps, args.out, r, profile=False)
                per_token = MICRO * SEQ * (2 if v == "kiln-z2x2" else 1)
            else:
                times = run_worker(v, args.steps, args.out)
                per_token = MICRO * SEQ
            medians[v].append(statistics.median(times[args.warmup :]) / per_token)
            print(f"round {r} {v}: {medians[v][-1] * 1e3:.3f} ms/token", file=sys.stderr)
    report(medians, args, time.time() - started)
    if args.profile:
        run_kiln("kiln-z0", args.steps, args.out, 99, profile=True)
        import pstats

        print("\ncProfile of one kiln-z0 run (whole process), top 25 by own time:\n```")
        stats = pstats.Stats(str(args.out / "kiln-z0-r99.prof"))
        stats.sort_stats("tottime").print_stats(25)
        print("```")


def report(medians: dict[str, list[float]], args, seconds: float) -> None:
    import torch

    base = statistics.median(medians["plain"]) if "plain" in medians else None
    print(
        f"\n{args.rounds} rounds x {args.steps} steps (first {args.warmup} dropped), "
        f"{seconds / 60:.1f} min; torch {torch.__version__}, {os.cpu_count()} cores\n"
    )
    print("| variant | s/step (8x256 tokens per rank) | tokens/s | / plain | runs (ms/token) |")
    print("|---|---|---|---|---|")
    for v, values in medians.items():
        m = statistics.median(values)
        ranks = 2 if v == "kiln-z2x2" else 1
        ratio = f"{m / base:.3f}" if base else "-"
        runs = ", ".join(f"{x * 1e3:.3f}" for x in values)
        print(f"| {v} | {m * MICRO * SEQ * ranks:.3f} | {1 / m:,.0f} | {ratio} | {runs} |")


if __name__ == "__main__":
    main()
