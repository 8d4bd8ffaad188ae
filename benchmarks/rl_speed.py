"""kiln's PPO and GRPO per iteration: where the time goes (generation / scoring / training), and
generation speed against plain ``model.generate`` on the same prompts. Prints a markdown table.

One process on the CPU, fp32, the parent of ``benchmarks/finetune_speed.py`` (kiln's ``tiny``
model pretrained 20 steps), the prompts of the synthetic preferences as chats, in file order
(``data.shuffle=false``), at most 16 new tokens:

- ``ppo``: ``configs/finetune/ppo-tiny.yaml`` (rule reward, value head): an iteration samples
  32 responses (4 generate calls of 8 prompts, temperature 0.7), scores them, runs the frozen
  reference and the trained model once over them, then 2 passes of 2 minibatches of 16;
- ``grpo``: ``configs/finetune/grpo-tiny.yaml``: 8 prompts x 4 completions (4 generate calls of
  2 prompts x 4, temperature 1.0), one optimizer step.

An iteration's seconds are the metrics intervals of its loop steps (``metrics.log_every=1``);
generation is the stage's ``time/generation``, scoring the rest of ``time/rollout`` (rewards,
reference, old log-probs and values, advantages), training the remainder (forward, backward,
optimizer, bookkeeping). Generated tokens count each response up to its first EOS.

The plain side (``--worker``, a fresh process) loads the same parent with
``AutoModelForCausalLM``, takes the same prompts in the same batches (left-padded, the same
sampling settings) and times ``generate`` alone. Rounds alternate the two, in turn first;
medians over rounds of each run's median iteration after ``--warmup``. Acceptance: kiln's
generation tokens/s >= 0.9x plain ``generate``'s.

    python benchmarks/rl_speed.py [--iterations 8] [--warmup 2] [--rounds 3] [--only ppo]

About 3 minutes on 2 cores once the parent exists (``finetune_speed.py`` makes it under the
same ``--out``, 1 more minute). It needs the machine to itself (see ``finetune_speed.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import REPO, in_subprocess, line_intervals, machine, stage_run
from finetune_speed import prepare

CONFIGS = REPO / "configs" / "finetune"
STAGES = ("ppo", "grpo")
NEW_TOKENS = 16
SHAPE = {  # per iteration: (generate calls, prompts per call, samples per prompt, temperature)
    "ppo": (4, 8, 1, 0.7),
    "grpo": (4, 2, 4, 1.0),
}
STEPS_PER_ITERATION = {"ppo": 4, "grpo": 1}


def overrides(stage: str, out: Path, iterations: int) -> list[str]:
    common = [
        f"init.path={out}/parent/hf",
        f"data.train=[{{paths: [{out}/prompts/train.jsonl]}}]",
        "data.shuffle=false",
        "train.precision=fp32",
        "dist.zero_stage=0",
        "checkpoint.every=null",
        "metrics.log_every=1",
        "metrics.wandb=false",
        "metrics.progress_bar=false",
        f"train.max_steps={iterations * STEPS_PER_ITERATION[stage]}",
        f"{stage}.max_new_tokens={NEW_TOKENS}",
        # The policy stays the parent (lr 1e-12: every step still computes its update): a trained
        # policy would change how long responses run before EOS, and so the tokens/s that
        # plain generate() with the parent is compared with.
        "optim.lr=1e-12",
    ]
    return common


def kiln(stage: str, out: Path, iterations: int, run: str) -> list[dict]:
    """Per iteration: seconds, generation and scoring seconds, generated tokens."""
    config = CONFIGS / f"{stage}-tiny.yaml"
    lines = stage_run(stage, config, out / "runs", run, *overrides(stage, out, iterations))
    seconds = [s for _, s in line_intervals(lines)]
    per = STEPS_PER_ITERATION[stage]
    rows = []
    for i in range(0, len(lines), per):
        first = lines[i]
        generation = first["time/generation"]
        rows.append(
            {
                "seconds": sum(seconds[i : i + per]),
                "generation": generation,
                "scoring": first["time/rollout"] - generation,
                "tokens": first["rollout/generation_tokens_per_s"] * generation,
            }
        )
    return rows


def plain(stage: str, out: Path, iterations: int) -> list[dict]:
    """The same prompts through ``model.generate`` alone: per iteration its seconds and
    tokens (generation and scoring/training columns: generation only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.chat import chosen_template
    from finetune.grpo import PromptEncoder
    from launcher.data.examples import ExampleSource, read_examples
    from launcher.data.tokenizer import TextTokenizer

    parent = out / "parent" / "hf"
    tok = TextTokenizer.load(parent)
    template = chosen_template("default", tok, parent)
    encoder = PromptEncoder(tok, 128 - NEW_TOKENS, template)
    source = ExampleSource(paths=[str(out / "prompts" / "train.jsonl")])
    prompts = [e.tokens.tolist() for e in read_examples([source], encoder, key="d").examples]
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    calls, per_call, samples, temperature = SHAPE[stage]
    torch.manual_seed(0)
    rows, at = [], 0
    for _ in range(iterations):
        seconds, tokens = 0.0, 0
        for _ in range(calls):
            batch = [prompts[(at + k) % len(prompts)] for k in range(per_call)]
            at += per_call
            batch = [ids for ids in batch for _ in range(samples)]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tok.pad_id)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(batch):
                ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
            started = time.perf_counter()
            with torch.no_grad():
                got = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                    do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                )  # fmt: skip
            seconds += time.perf_counter() - started
            new = got[:, width:]
            is_eos = new == tok.eos_id
            ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
            tokens += int(ends.sum())
        rows.append({"seconds": seconds, "generation": seconds, "scoring": 0.0, "tokens": tokens})
    return rows


def summary(rows: list[dict], warmup: int) -> dict[str, float]:
    kept = rows[warmup:]
    generation = sum(r["generation"] for r in kept)
    return {
        "iteration": statistics.median(r["seconds"] for r in kept),
        "generation": statistics.median(r["generation"] for r in kept),
        "scoring": statistics.median(r["scoring"] for r in kept),
        "training": statistics.median(r["seconds"] - r["generation"] - r["scoring"] for r in kept),
        "tokens_per_s": sum(r["tokens"] for r in kept) / generation,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/kiln-bench-finetune"))
    p.add_argument("--only", nargs="*", choices=STAGES, default=list(STAGES))
    p.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out.resolve()
    if args.worker:
        print(json.dumps(plain(args.worker, args.out, args.iterations)))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(cores or 1))
    started = time.time()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    prepare(args.out)
    from tests.finetune.fixtures import write_preferences

    write_preferences(args.out / "prompts", train=400, chat=True)
    results = {s: {"kiln": [], "plain": []} for s in args.only}
    for r in range(args.rounds):
        for s in args.only:
            for side in ("kiln", "plain") if r % 2 == 0 else ("plain", "kiln"):
                if side == "kiln":
                    rows = kiln(s, args.out, args.iterations, f"{s}-r{r}")
                else:
                    worker = ["--worker", s, "--iterations", str(args.iterations)]
                    rows = in_subprocess(__file__, *worker, "--out", str(args.out))
                results[s][side].append(summary(rows, args.warmup))
                rate = results[s][side][-1]["tokens_per_s"]
                print(f"round {r} {s} {side}: {rate:.0f} generated tokens/s", file=sys.stderr)
    report(results, args, time.time() - started)


def report(results: dict, args, seconds: float) -> None:
    def med(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    print(f"## RL stages per iteration ({machine()}; {args.rounds} rounds, {args.iterations} "
          f"iterations, first {args.warmup} dropped; {seconds:.0f} s)\n")  # fmt: skip
    print("| stage | iteration s | generation s | scoring s | training s | kiln gen tok/s "
          "| plain generate tok/s | kiln / plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for stage, sides in results.items():
        k, g = sides["kiln"], sides["plain"]
        ratio = med(k, "tokens_per_s") / med(g, "tokens_per_s")
        print(
            f"| {stage} | {med(k, 'iteration'):.3f} | {med(k, 'generation'):.3f} | "
            f"{med(k, 'scoring'):.3f} | {med(k, 'training'):.3f} | "
            f"{med(k, 'tokens_per_s'):.0f} | {med(g, 'tokens_per_s'):.0f} | {ratio:.3f} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # finetune, tests.finetune.fixtures (the prompts)
    main()
