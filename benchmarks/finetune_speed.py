"""kiln's fine-tuning stages against the reference libraries, per step. Prints a markdown table.

Compared, one process on the CPU, fp32, on the same parent (kiln's ``tiny`` model pretrained
for 20 steps by ``kiln pretrain configs/pretrain/tiny.yaml``, with kiln's own tokenizer, whose
pad token is not EOS), the same training examples in the same order, micro-batch 8 without
accumulation and the same optimizer (fused AdamW with the stage config's learning rate, betas,
eps and weight decay, clipping at 1.0, the learning rate constant):

- ``sft``: ``kiln sft`` (``configs/finetune/sft-tiny.yaml``: the chats of
  ``finetune.format_task``, right-padded, the assistant turns trained) against TRL's
  ``SFTTrainer`` (``completion_only_loss``, no packing);
- ``sft-packed``: the same kiln run with ``data.packing=true`` (8 rows of 128 tokens filled
  best-fit with whole chats): more chats per step, so compared with ``sft`` in tokens/s;
- ``reward``: ``kiln reward`` (``reward-tiny.yaml``) against TRL's ``RewardTrainer`` on the
  synthetic preference pairs of ``tests/finetune/fixtures.py``;
- ``dpo``: ``kiln dpo`` (``dpo-tiny.yaml``, sigmoid loss) against TRL's ``DPOTrainer`` on the
  same pairs, the reference model a frozen copy of the parent in both;
- ``classify``: ``kiln classify`` (``classify-tiny.yaml``: the corpus's genres, texts cut to
  128 tokens) against transformers' ``Trainer`` with ``AutoModelForSequenceClassification``,
  both for one whole epoch (``--steps`` does not apply): epoch time is its acceptance number.

The references train on what kiln trains on: the worker reads the records with kiln's readers
and encoders under the run's own config and hands the token ids over; the models come from
kiln's loaders (the parent, or the parent with kiln's seeded head); kiln runs with
``data.shuffle=false`` and the references with the sequential sampler (classification always
shuffles: its reference gets kiln's permutation of the epoch). So every step of both sees the
same batch, padded to the same width.

A step is everything a loop does from the end of one optimizer step to the end of the next:
draw and collate the batch, forward, backward, clip, AdamW, bookkeeping. kiln: the interval
between consecutive metrics lines (``metrics.log_every=1``; that includes writing the line,
which the references, ``logging_strategy="no"``, do not do). References: the interval between
consecutive ``on_step_end`` callbacks. "In-step" is the compute alone (kiln's
``time/forward_backward + time/optimizer``; the references' ``on_step_begin`` to
``on_step_end``, which starts after their batch is drawn), "outside" the rest of a step.

Every run is a fresh process (kiln: ``python -m launcher STAGE CONFIG --nproc 1``; the
references: ``--worker`` processes of this script); rounds alternate kiln and the reference,
in turn first (the machine may be shared), and the table shows the median over rounds of each
run's median step after ``--warmup`` steps, and the ratio kiln / reference of the medians and
of the best runs (noise only adds time: the best run estimates a trainer's own cost).
Acceptance: kiln / reference <= 1.0.

    python benchmarks/finetune_speed.py [--steps 14] [--warmup 4] [--rounds 3] [--only sft dpo]

The parent is made once under ``--out`` (default /tmp/kiln-bench-finetune) and reused.
About 7 minutes on 2 cores (1 more to make the parent). It needs the machine to itself: beside
another busy process, torch's 2 OpenMP threads wait on each other and a step of this tiny
model takes 30x longer (2.2 s instead of 0.06 s seen here); ``OMP_NUM_THREADS=1`` then keeps
the comparison usable (every run, kiln's and the references', inherits it).
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

CONFIGS = REPO / "configs" / "finetune"
MICRO = 8
VARIANTS = ("sft", "sft-packed", "reward", "dpo", "classify")
STAGE = {v: v.removesuffix("-packed") for v in VARIANTS}  # the kiln stage of a variant
REFERENCE = {
    "sft": "TRL SFTTrainer",
    "reward": "TRL RewardTrainer",
    "dpo": "TRL DPOTrainer",
    "classify": "transformers Trainer",
}


def overrides(variant: str, out: Path, steps: int) -> list[str]:
    """The kiln run's settings beside its tiny config (the worker loads the same config)."""
    common = [
        f"init.path={out}/parent/hf",
        f"train.global_batch_size={MICRO}",
        f"train.micro_batch_size={MICRO}",
        "train.precision=fp32",
        "dist.zero_stage=0",
        "schedule.kind=constant",
        "schedule.warmup_steps=0",
        "checkpoint.every=null",
        "eval.every=null",
        "metrics.log_every=1",
        "metrics.wandb=false",
        "metrics.progress_bar=false",
    ]
    if variant == "classify":
        # early stopping counts evaluations, and there are none
        corpus = f"data.train=[{{paths: [{out}/corpus/shard-*.jsonl.gz]}}]"
        return [*common, corpus, "train.epochs=1", "classify.patience=null"]
    data = out / ("sft" if variant.startswith("sft") else "pairs") / "train.jsonl"
    common += [
        f"data.train=[{{paths: [{data}]}}]",
        "data.validation=null",
        "data.shuffle=false",
        "checkpoint.best=null",
        "train.epochs=null",
        f"train.max_steps={steps}",
    ]
    if variant.startswith("sft"):
        common.append(f"data.packing={str(variant == 'sft-packed').lower()}")
    return common


def prepare(out: Path) -> None:
    """The parent (once: 20 steps of kiln pretraining, which also writes the corpus), the SFT
    chats and the preference pairs."""
    from finetune.format_task import write
    from tests.finetune.fixtures import write_preferences

    if not (out / "parent" / "hf" / "config.json").exists():
        print("pretraining the parent", file=sys.stderr)
        tiny = REPO / "configs" / "pretrain" / "tiny.yaml"
        stage_run(
            "pretrain", tiny, out, "parent", f"data.builtin.dir={out}/corpus",
            "train.max_steps=20", "checkpoint.every=null", "eval.every=null",
            "metrics.wandb=false", "metrics.progress_bar=false",
        )  # fmt: skip
    write(out / "sft")
    write_preferences(out / "pairs")


# ------------------------------------------------------------------------------ kiln runs


def kiln(variant: str, out: Path, steps: int, run: str) -> dict:
    """One kiln run: per step its seconds, its compute's seconds and its tokens."""
    config = CONFIGS / f"{STAGE[variant]}-tiny.yaml"
    lines = stage_run(STAGE[variant], config, out / "runs", run, *overrides(variant, out, steps))
    tokens, seconds = zip(*line_intervals(lines), strict=True)
    in_step = [m["time/forward_backward"] + m["time/optimizer"] for m in lines]
    return {"interval": list(seconds), "in_step": in_step, "tokens": [round(t) for t in tokens]}


# ------------------------------------------------------------------------ reference runs


def kiln_examples(variant: str, out: Path, steps: int):
    """(kiln's config of the run, its training examples in the order it draws them, the
    label names of classification): read by kiln's own readers and encoders."""
    from launcher.config import load_config
    from launcher.data.tokenizer import TextTokenizer

    settings = overrides(variant, out, steps)
    if variant == "classify":
        from finetune.classify_config import ClassifyConfig
        from finetune.classify_data import load_tokenizer, read_sets
        from launcher.data.batches import ExampleStream

        cfg = load_config(ClassifyConfig, CONFIGS / "classify-tiny.yaml", settings)
        tokenizer = load_tokenizer(cfg)
        sets = read_sets(cfg, tokenizer)
        train = sets.splits["train"]
        stream = ExampleStream(
            train, batch_size=MICRO, rank=0, world_size=1, seed=cfg.run.seed,
            pad_id=tokenizer.pad_id,
        )  # fmt: skip
        return cfg, [train[i] for i in stream.order(0)], sets.labels
    if variant == "sft":
        from finetune.config import SFTConfig
        from finetune.data import SFTEncoder, read_sft_sets

        cfg = load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", settings)
        encoder = SFTEncoder(TextTokenizer.load(cfg.init.path), cfg.data.max_seq_len)
        return cfg, read_sft_sets(cfg.data, encoder, cfg.run.seed)[0].examples, None
    from finetune.dpo_config import DPOConfig
    from finetune.reward_config import RewardConfig
    from finetune.reward_data import PairEncoder, read_pair_sets

    schema = RewardConfig if variant == "reward" else DPOConfig
    cfg = load_config(schema, CONFIGS / f"{variant}-tiny.yaml", settings)
    encoder = PairEncoder(TextTokenizer.load(cfg.init.path), cfg.data.max_seq_len)
    return cfg, read_pair_sets(cfg.data, encoder, cfg.run.seed)[0].examples, None


def training_args(kind, cfg, out: Path, variant: str, **extra):
    """HF/TRL arguments with kiln's optimizer settings: fused AdamW, constant learning rate,
    no accumulation, the data in order, nothing logged or saved; fp32 on the CPU (TRL's
    configs default to bf16 and gradient checkpointing)."""
    o = cfg.optim
    return kind(
        output_dir=str(out / "reference" / variant),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=1,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        max_grad_norm=o.grad_clip,
        optim="adamw_torch_fused",
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=cfg.run.seed,
        **extra,
    )


def reference(variant: str, out: Path, steps: int) -> dict:
    """Train the reference on kiln's examples; its step times and tokens per step."""
    import numpy as np
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from finetune.peft_setup import load_parent

    cfg, examples, labels = kiln_examples(variant, out, steps)
    parent = cfg.init.path
    tokenizer = AutoTokenizer.from_pretrained(parent)
    pad_id, seed = tokenizer.pad_token_id, cfg.run.seed
    clock = {"interval": [], "in_step": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            clock["interval"].append(now - self.last)
            clock["in_step"].append(now - self.begin)
            self.last = now

    common = {"processing_class": tokenizer, "callbacks": [Clock()]}
    if variant == "sft":
        rows = [
            {"input_ids": e.tokens.tolist(), "completion_mask": e.loss_mask.astype(int).tolist()}
            for e in examples
        ]
        args = training_args(
            trl.SFTConfig, cfg, out, variant, max_steps=steps, completion_only_loss=True,
            packing=False, max_length=cfg.data.max_seq_len,
        )  # fmt: skip
        model = load_parent(parent, None, seed)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), **common
        )
    elif variant == "reward":
        from finetune.reward_model import load_reward_model

        rows = [
            {"chosen_ids": e.tokens.tolist(), "rejected_ids": e.extras["rejected"].tokens.tolist()}
            for e in examples
        ]
        args = training_args(
            trl.RewardConfig, cfg, out, variant, max_steps=steps, max_length=cfg.data.max_seq_len,
            center_rewards_coefficient=cfg.reward.center_coef,
        )  # fmt: skip
        model, _ = load_reward_model(parent, pad_id, seed, cfg.reward.head_init_std)
        trainer = trl.RewardTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), **common
        )
    elif variant == "dpo":
        rows = []
        for e in examples:
            split = int(np.argmax(e.loss_mask))  # the response (and its EOS) is what is trained
            rejected = e.extras["rejected"]
            assert rejected.tokens[:split].tolist() == e.tokens[:split].tolist(), e.where
            rows.append(
                {
                    "prompt_ids": e.tokens[:split].tolist(),
                    "chosen_ids": e.tokens[split:].tolist(),
                    "rejected_ids": rejected.tokens[split:].tolist(),
                }
            )
        args = training_args(
            trl.DPOConfig, cfg, out, variant, max_steps=steps, beta=cfg.dpo.beta,
            loss_type=[cfg.dpo.loss], max_length=cfg.data.max_seq_len,
        )  # fmt: skip
        # DPOTrainer 1.16 tokenizes text itself (it has no path for token ids); its collator
        # takes prompt/chosen/rejected ids, so kiln's go in as its training set after set-up.
        text = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        trainer = trl.DPOTrainer(
            model=load_parent(parent, None, seed),
            ref_model=load_parent(parent, None, seed),
            args=args,
            train_dataset=text,
            **common,
        )
        trainer.train_dataset = Dataset.from_list(rows)
    else:
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        from finetune.classify_model import load_classifier

        rows = [{"input_ids": e.tokens.tolist(), "labels": e.extras["label"]} for e in examples]
        args = training_args(
            TrainingArguments, cfg, out, variant, num_train_epochs=1,
            label_smoothing_factor=cfg.classify.label_smoothing,
        )  # fmt: skip
        model, _ = load_classifier(parent, labels, pad_id, seed, cfg.classify.head_init_std)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            data_collator=DataCollatorWithPadding(tokenizer),
            **common,
        )
    trainer.train()
    sizes = [len(e) + len(e.extras.get("rejected", ())) for e in examples]
    tokens = [sum(sizes[i * MICRO : (i + 1) * MICRO]) for i in range(len(clock["interval"]))]
    return {**clock, "tokens": tokens}


# ----------------------------------------------------------------------------------- main


def summary(run: dict, warmup: int) -> dict[str, float]:
    """One run: median seconds per step, in the step's compute and outside it, and tokens/s,
    after the warm-up steps; the seconds of the whole run (classification: one epoch)."""
    intervals, in_step, tokens = run["interval"], run["in_step"], run["tokens"]
    kept = slice(warmup, None)
    outside = [i - c for i, c in zip(intervals[kept], in_step[kept], strict=True)]
    return {
        "step": statistics.median(intervals[kept]),
        "in_step": statistics.median(in_step[kept]),
        "outside": statistics.median(outside),
        "tokens_per_s": sum(tokens[kept]) / sum(intervals[kept]),
        "total": sum(intervals),
        "steps": len(intervals),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/kiln-bench-finetune"))
    p.add_argument("--only", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--worker", choices=sorted(REFERENCE), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out.resolve()
    if args.worker:
        print(json.dumps(reference(args.worker, args.out, args.steps)))
        return
    # kiln's launcher gives its one worker every core (OMP_NUM_THREADS); the references too
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(cores or 1))
    started = time.time()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    prepare(args.out)
    results: dict[str, dict[str, list[dict]]] = {v: {"kiln": [], "ref": []} for v in args.only}
    batches: dict[str, list[int]] = {}  # tokens per step: the same batches in every run
    for r in range(args.rounds):
        for v in args.only:
            sides = ["kiln", "ref"] if v in REFERENCE else ["kiln"]
            for side in sides if r % 2 == 0 else sides[::-1]:
                if side == "kiln":
                    run = kiln(v, args.out, args.steps, f"{v}-r{r}")
                else:
                    worker = ["--worker", v, "--steps", str(args.steps), "--out", str(args.out)]
                    run = in_subprocess(__file__, *worker)
                if batches.setdefault(v, run["tokens"]) != run["tokens"]:
                    sys.exit(f"{v}: {side} trained other batches (tokens per step {run['tokens']})")
                results[v][side].append(summary(run, args.warmup))
                step = results[v][side][-1]["step"]
                print(f"round {r} {v} {side}: {step * 1e3:.1f} ms/step", file=sys.stderr)
    report(results, args, time.time() - started)


def report(results: dict[str, dict[str, list[dict]]], args, seconds: float) -> None:
    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def ms(runs: list[dict]) -> str:
        return ", ".join(f"{r['step'] * 1e3:.1f}" for r in runs)

    print(f"\n{machine()}")
    print(
        f"{args.rounds} rounds x {args.steps} steps (first {args.warmup} dropped; classify: "
        f"one epoch), micro-batch {MICRO}, fp32, 1 process; {seconds / 60:.1f} min\n"
    )
    print(
        "| stage | reference | s/step kiln | s/step reference | kiln / ref | kiln / ref, best "
        "runs | in-step kiln / ref | outside the step, ms kiln / ref | tokens/s kiln / ref "
        "| runs kiln; ref (ms/step) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v, sides in results.items():
        k, ref = sides["kiln"], sides["ref"]
        if not ref:  # sft-packed: against kiln's unpacked sft, below
            cells = [v, "-", f"{med(k, 'step'):.4f}", "-", "-", "-", "-"]
            cells += [f"{med(k, 'outside') * 1e3:.1f} / -", f"{med(k, 'tokens_per_s'):,.0f} / -"]
            print("| " + " | ".join([*cells, ms(k)]) + " |")
            continue
        cells = [
            v,
            REFERENCE[v],
            f"{med(k, 'step'):.4f}",
            f"{med(ref, 'step'):.4f}",
            f"**{med(k, 'step') / med(ref, 'step'):.3f}**",
            f"{min(r['step'] for r in k) / min(r['step'] for r in ref):.3f}",
            f"{med(k, 'in_step') / med(ref, 'in_step'):.3f}",
            f"{med(k, 'outside') * 1e3:.1f} / {med(ref, 'outside') * 1e3:.1f}",
            f"{med(k, 'tokens_per_s'):,.0f} / {med(ref, 'tokens_per_s'):,.0f}",
            f"{ms(k)}; {ms(ref)}",
        ]
        print("| " + " | ".join(cells) + " |")
    if "sft-packed" in results and "sft" in results:
        packed, sft = results["sft-packed"]["kiln"], results["sft"]
        rate = med(packed, "tokens_per_s")
        print(
            f"\nPacking (kiln sft, tokens/s, medians): packed / unpacked "
            f"{rate / med(sft['kiln'], 'tokens_per_s'):.2f}x, packed kiln / unpacked TRL "
            f"{rate / med(sft['ref'], 'tokens_per_s'):.2f}x."
        )
    if "classify" in results:
        k, ref = results["classify"]["kiln"], results["classify"]["ref"]
        print(
            "\n| classify, one epoch | steps | s kiln | s reference | kiln / ref | kiln / ref, "
            "best runs | runs kiln; ref (s) |"
        )
        print("|---|---|---|---|---|---|---|")
        runs = ", ".join(f"{r['total']:.2f}" for r in k) + "; "
        runs += ", ".join(f"{r['total']:.2f}" for r in ref)
        cells = [
            REFERENCE["classify"],
            f"{k[0]['steps']}",
            f"{med(k, 'total'):.2f}",
            f"{med(ref, 'total'):.2f}",
            f"**{med(k, 'total') / med(ref, 'total'):.3f}**",
            f"{min(r['total'] for r in k) / min(r['total'] for r in ref):.3f}",
            runs,
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # tests.finetune.fixtures: the preference pairs
    main()
