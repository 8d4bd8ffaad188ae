"""What the step-time benchmarks share: a bench run config, real kiln runs, the plain loop.

Every measured thing runs in a fresh process with the same thread settings, so that a
benchmark can alternate them (the machine may be shared) and compare medians.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LR, CLIP = 1e-3, 1.0


def write_config(
    out: Path,
    name: str,
    *,
    model: str,
    seq: int,
    micro: int,
    vocab: int = 4096,
    docs: int = 4000,
) -> Path:
    """A kiln run config under ``out``: built-in corpus, a ``vocab``-token tokenizer, no
    evaluation or checkpoints during training, metrics every step, no wandb."""
    text = f"""\
run: {{name: {name}, output_dir: {out}/runs}}
model: {model}
tokenizer: {{vocab_size: {vocab}}}
data:
  builtin: {{docs: {docs}, shards: 4, dir: {out}/corpus}}
  seq_len: {seq}
train: {{global_batch_size: {micro}, micro_batch_size: {micro}, max_steps: 10}}
optim: {{lr: {LR}, grad_clip: {CLIP}}}
schedule: {{warmup_steps: 2}}
eval: {{every: null, max_batches: 1}}
checkpoint: {{every: null}}
metrics: {{wandb: false, progress_bar: false, log_every: 1}}
"""
    path = out / f"{name}.yaml"
    path.write_text(text)
    return path


def prepare(config: Path) -> None:
    """Corpus and tokenizer once, so that the timed runs only train."""
    cmd = [sys.executable, "-m", "launcher", "prepare", str(config)]
    subprocess.run(cmd, cwd=config.parent, check=True, capture_output=True)


def kiln_run(
    config: Path, run: str, steps: int, *overrides: str, nproc: int = 1, profile: Path | None = None
) -> list[dict]:
    """`python -m launcher pretrain` for ``steps`` steps; its per-step metrics lines.

    Asserts the world size the metrics report (Accelerate on CPU silently runs separate
    worlds of 1 when misconfigured)."""
    cmd = [sys.executable, "-m", "launcher", "pretrain", str(config)]
    if profile is not None:  # cProfile slows Python-heavy code: profiled runs are not timed
        cmd[1:1] = ["-m", "cProfile", "-o", str(profile)]
    cmd += [f"run.name={run}", f"train.max_steps={steps}", "checkpoint.resume=none", *overrides]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{run} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    path = config.parent / "runs" / run / "metrics.jsonl"
    lines = [json.loads(x) for x in path.open()]
    lines = [m for m in lines if "throughput/tokens_per_s" in m]
    assert {m["dist/world_size"] for m in lines} == {float(nproc)}, f"{run}: wrong world size"
    return lines


def stage_run(stage: str, config: Path, out: Path, run: str, *overrides: str) -> list[dict]:
    """`python -m launcher STAGE CONFIG --nproc 1` of any stage, run ``run`` under ``out``
    (fresh: no resume); its metrics lines that carry a throughput (one per step with
    ``metrics.log_every=1``). Asserts world size 1, as ``kiln_run`` does."""
    cmd = [sys.executable, "-m", "launcher", stage, str(config), "--nproc", "1"]
    cmd += [f"run.output_dir={out}", f"run.name={run}", "checkpoint.resume=none", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{run} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / run / "metrics.jsonl").open()]
    lines = [m for m in lines if "throughput/tokens_per_s" in m]
    assert {m["dist/world_size"] for m in lines} == {1.0}, f"{run}: wrong world size"
    return lines


def line_intervals(lines: list[dict]) -> list[tuple[float, float]]:
    """(tokens, seconds) of the interval each metrics line of a fresh run closes: the tokens it
    added to ``train/tokens_seen`` and those / its ``throughput/tokens_per_s``. With
    ``metrics.log_every=1`` an interval is one whole step of the loop, whatever its tokens
    (fine-tuning batches differ; ``step_seconds`` needs a fixed number)."""
    seen, out = 0.0, []
    for m in lines:
        tokens = m["train/tokens_seen"] - seen
        out.append((tokens, tokens / m["throughput/tokens_per_s"]))
        seen = m["train/tokens_seen"]
    return out


def step_seconds(lines: list[dict], tokens_per_step: int) -> list[float]:
    """Seconds per step from per-step metrics (log_every=1): tokens per step / tokens per s."""
    return [tokens_per_step / m["throughput/tokens_per_s"] for m in lines]


def model_config(config: Path):
    from launcher.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, str(config)).model


def fixed_batch(vocab: int, micro: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (micro, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def plain_steps(config: Path, steps: int, micro: int, seq: int, compile: bool = False):
    """The minimal PyTorch loop: the same model, one fixed batch, fused AdamW, clipping.
    Returns seconds per step."""
    import torch
    import torch.nn.functional as F

    from pretrain.model import build_model

    cfg = model_config(config)
    model = build_model(cfg, seed=0)
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    inputs, targets = fixed_batch(cfg.vocab_size, micro, seq)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = forward(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def in_subprocess(script: str, *args: str) -> list | dict:
    """Run ``script --worker ...`` in a fresh process; it prints a JSON list (or object) last."""
    cmd = [sys.executable, script, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_peak() -> float:
    """The fp32 matmul FLOP/s of this process (what kiln's MFU divides by on CPU), fresh."""
    import torch

    from launcher import flops

    flops._probe_cache.clear()
    return flops._probe(torch.device("cpu"), torch.float32)


def machine() -> str:
    import platform

    import torch

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return (
        f"{next(names, platform.processor() or '?')}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}"
    )
