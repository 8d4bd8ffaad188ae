"""Is the data pipeline fast enough to keep training fed? Prints one markdown report.

Measures, on the built-in corpus with a 4096-token tokenizer trained on it:

1. the raw tokenizer: ``TextTokenizer.encode`` one document at a time and ``encode_batch``
   on the same texts, in-process (the upper bound for the pipeline);
2. ``StreamLoader`` tokens/s (input tokens per second of wall time after a warm-up) with 0, 1
   and 2 DataLoader workers at seq_len 256, micro-batch 8, shuffle window 512, and the ratio
   per worker to the raw encode speed;
3. a CPU fp32 training step of the ``small`` preset (vocab 4096): forward, cross-entropy,
   backward and AdamW, on pre-built batches and fed live by a one-worker ``StreamLoader``;
   tokens/s and achieved model FLOP/s (``flops_per_token``);
4. the headroom pipeline / training and the implied data-wait share of a step;
5. the workers per GPU an 8-GPU node training the ``1b`` preset would need (assumptions stated);

plus the cost of the state that travels with every batch (pickled size and time of one
reader's state, ``StreamLoader.state_dict()`` time and JSON size). All rows are medians over
``--repeats`` rounds that alternate the compared things (the machine may be shared).

Run:  python benchmarks/data_pipeline.py [--docs 20000] [--seconds 6] [--out /tmp/kiln-bench]
      [--repeats 3] [--profile 200]   (--profile N: cProfile one reader over N batches)
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import math
import os
import pickle
import platform
import pstats
import statistics
import time
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import yaml

from launcher.config_files import CONFIG_ROOT
from pretrain.data.builtin import BuiltinCorpusConfig, write_builtin_corpus
from pretrain.data.config import DataConfig
from pretrain.data.loader import StreamLoader
from pretrain.data.plan import Layout
from pretrain.data.sources import resolve_corpus, sample_texts
from pretrain.data.stream import ReaderStream, fresh_state
from pretrain.model import ModelConfig, build_model, flops_per_token
from pretrain.tokenizer import TokenizerConfig, train_tokenizer

SEQ, MICRO, WINDOW, VOCAB = 256, 8, 512, 4096
WORKERS = (0, 1, 2)
WARMUP_BATCHES = 8
GPU_PEAK, GPU_MFU, GPU_SEQ = 989e12, 0.40, 2048  # H100 SXM dense bf16, assumed MFU, 1b seq


def preset(name: str, **overrides) -> ModelConfig:
    return ModelConfig(
        **{**yaml.safe_load((CONFIG_ROOT / "model" / f"{name}.yaml").read_text()), **overrides}
    )


def med(xs) -> float:
    return statistics.median(xs)


def fmt(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def machine() -> list[tuple[str, str]]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "?",
    )
    return [
        ("CPU", cpu),
        ("cores", f"{len(os.sched_getaffinity(0))} usable / {os.cpu_count()} online"),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)"),
        ("tokenizers", tokenizers.__version__),
    ]


def encode_rates(tok, texts) -> tuple[float, float]:
    """tokens/s of encode() one document at a time, then of encode_batch() (rayon threads)."""
    t0 = time.perf_counter()
    n1 = sum(len(tok.encode(t)) for t in texts)
    t1 = time.perf_counter()
    n2 = sum(len(ids) for ids in tok.encode_batch(texts))
    t2 = time.perf_counter()
    return n1 / (t1 - t0), n2 / (t2 - t1)


def make_loader(data: DataConfig, tok, corpus, workers: int) -> StreamLoader:
    cfg = data.model_copy(update={"num_workers": workers})
    return StreamLoader(cfg, tok, corpus, batch_size=MICRO, seed=0)


def pipeline_rate(data, tok, corpus, workers: int, seconds: float) -> float:
    """Input tokens delivered per second of wall time, after WARMUP_BATCHES batches."""
    it = iter(make_loader(data, tok, corpus, workers))
    try:
        for _ in range(WARMUP_BATCHES):
            next(it)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += next(it)["input_ids"].numel()
        return n / (time.perf_counter() - t0)
    finally:
        it.close()  # ends the DataLoader iterator and its worker processes


def train_step_times(model, opt, batches, steps: int) -> list[float]:
    """Wall time per step, including taking the next batch from ``batches``."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(batches)
        logits = model(input_ids=b["input_ids"]).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), b["targets"].view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def make_optimizer(model, batch) -> tuple[torch.optim.Optimizer, str]:
    for kind in ("fused", "foreach"):
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **{kind: True})
            train_step_times(model, opt, itertools.repeat(batch), 1)  # fails here if unsupported
            return opt, kind
        except (RuntimeError, TypeError):
            continue
    raise RuntimeError("no usable AdamW implementation")


def state_costs(data, tok, corpus) -> dict[str, float]:
    loader = make_loader(data, tok, corpus, 0)
    it = iter(loader)
    batch = [next(it) for _ in range(WARMUP_BATCHES)][-1]
    state = next(iter(loader._states.values()))
    blob = pickle.dumps(state)
    out = {
        "pickle_bytes": len(blob),
        "batch_bytes": sum(t.nbytes for t in batch.values()),
        "window_docs": len(state["window"]),
    }
    out["pickle_s"] = med(timed(lambda: pickle.loads(pickle.dumps(state))) for _ in range(7))
    out["state_dict_s"] = med(timed(loader.state_dict) for _ in range(7))
    out["json_bytes"] = len(json.dumps(loader.state_dict()))
    it.close()
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile_reader(data, tok, corpus, batches: int, top: int = 18) -> None:
    """cProfile one reader (what one DataLoader worker runs) over ``batches`` batches."""
    reader = ReaderStream(corpus, data, tok, 0, fresh_state(Layout(0, 1), 1, 0))
    gen = reader.batches(MICRO)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(batches):
        next(gen)
    prof.disable()
    print(f"\ncProfile of one reader over {batches} batches (top {top} by cumulative time):\n")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20000, help="built-in corpus documents")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per pipeline run")
    ap.add_argument("--out", default="/tmp/kiln-bench", help="corpus and tokenizer folder")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (medians are over these)")
    ap.add_argument("--train-steps", type=int, default=3, help="timed train steps per round")
    ap.add_argument("--profile", type=int, default=0, help="cProfile a reader over N batches")
    args = ap.parse_args()
    out = Path(args.out)

    t_setup = time.perf_counter()
    builtin = BuiltinCorpusConfig(docs=args.docs, dir=str(out / "corpus"))
    info = write_builtin_corpus(builtin)
    data = DataConfig(builtin=builtin, seq_len=SEQ, shuffle_window=WINDOW)
    corpus = resolve_corpus(data)
    tcfg = TokenizerConfig(vocab_size=VOCAB)
    texts = sample_texts(
        data.all_sources(), tcfg.sample_docs, tcfg.sample_bytes, 0, holdout=data.validation.fraction
    )
    tok = train_tokenizer(tcfg, texts, out / "tokenizer").tokenizer
    docs = list(sample_texts(data.all_sources(), 2000, 10**9, 1))

    mcfg = preset("small", vocab_size=VOCAB)
    model = build_model(mcfg, seed=0, dtype=torch.float32).train()
    it = iter(make_loader(data, tok, corpus, 0))
    fixed = [next(it) for _ in range(4)]
    it.close()
    opt, opt_kind = make_optimizer(model, fixed[0])
    setup_s = time.perf_counter() - t_setup

    # Rounds alternate everything compared: tokenizer modes, worker counts, training feeds.
    single, batched, steps, live_steps = [], [], [], []
    pipe = {w: [] for w in WORKERS}
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # encode_batch's threads, in-process only
    for r in range(args.repeats):
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        s, b = encode_rates(tok, docs)
        single.append(s)
        batched.append(b)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as StreamLoader runs it; no fork warning
        for w in WORKERS if r % 2 == 0 else WORKERS[::-1]:
            pipe[w].append(pipeline_rate(data, tok, corpus, w, args.seconds))
        steps += train_step_times(model, opt, itertools.cycle(fixed), args.train_steps)
        live = iter(make_loader(data, tok, corpus, 1))
        next(live)  # worker start-up and shuffle-window fill are not a step's cost
        live_steps += train_step_times(model, opt, live, args.train_steps)
        live.close()
    state = state_costs(data, tok, corpus)

    enc1, encb = med(single), med(batched)
    rates = {w: med(v) for w, v in pipe.items()}
    best = max(rates, key=rates.get)
    tokens_per_step = MICRO * SEQ
    train_rate, live_rate = tokens_per_step / med(steps), tokens_per_step / med(live_steps)
    fpt = flops_per_token(mcfg, SEQ)
    big = preset("1b")
    fpt_1b = flops_per_token(big, GPU_SEQ)
    gpu_rate = GPU_MFU * GPU_PEAK / fpt_1b
    per_worker = rates[1]
    need = math.ceil(gpu_rate / per_worker)
    sync_wait = train_rate / (rates[0] + train_rate)  # loading in the training process
    bg_wait = max(0.0, 1 - rates[best] / train_rate)  # workers in the background

    print(
        f"\n## kiln data pipeline benchmark\n\nsetup {setup_s:.1f}s: corpus {info.docs} docs "
        f"({info.text_bytes / 1e6:.1f} MB text, {'reused' if info.reused else 'generated'}) "
        f"in {out}; tokenizer {tok.vocab_size} tokens; {len(docs)} docs for raw encoding; "
        f"medians over {args.repeats} rounds\n"
    )
    print("| machine | |\n|---|---|")
    for k, v in machine():
        print(f"| {k} | {v} |")
    rows = [
        ("1. raw encode(), one doc at a time", f"{fmt(enc1)} tok/s", "1 thread, in-process"),
        ("1. raw encode_batch()", f"{fmt(encb)} tok/s", "rayon threads, in-process"),
    ]
    for w in WORKERS:
        ratio = rates[w] / max(w, 1) / enc1
        rows.append(
            (
                f"2. StreamLoader num_workers={w}",
                f"{fmt(rates[w])} tok/s",
                f"{ratio:.0%} of raw encode() per worker; runs: "
                + ", ".join(fmt(x) for x in pipe[w]),
            )
        )
    rows += [
        (
            "3. train step, small (vocab 4096), fp32 CPU",
            f"{fmt(train_rate)} tok/s",
            f"{tokens_per_step} tok/step, median step {med(steps):.2f}s, AdamW {opt_kind}",
        ),
        (
            "3. achieved model FLOP/s",
            f"{fmt(fpt * train_rate)}FLOP/s",
            f"flops_per_token = {fmt(fpt)} at seq {SEQ}",
        ),
        (
            "3. train step fed live by StreamLoader(1 worker)",
            f"{fmt(live_rate)} tok/s",
            f"median step {med(live_steps):.2f}s (includes next(batch) and CPU contention)",
        ),
        (
            "4. headroom: best pipeline / training",
            f"{rates[best] / train_rate:.0f}x",
            f"best = {best} workers",
        ),
        (
            "4. implied data-wait share of a step",
            f"{bg_wait:.1%} with workers",
            f"{sync_wait:.1%} if loaded in-process (num_workers=0)",
        ),
        (
            "5. 1b on 8 GPUs: workers per GPU",
            f"{need} (>= {gpu_rate / per_worker:.2f})",
            f"assumes H100 bf16 {GPU_MFU:.0%} MFU of {fmt(GPU_PEAK)}FLOP/s, 1b flops_per_token "
            f"{fmt(fpt_1b)} at seq {GPU_SEQ} -> {fmt(gpu_rate)} tok/s/GPU, "
            f"{fmt(8 * gpu_rate)} tok/s/node; / {fmt(per_worker)} tok/s per worker (1-worker run; "
            f"this 4096-token tokenizer, not 1b's 32000)",
        ),
        (
            "state: pickle of one reader's state",
            f"{state['pickle_bytes'] / 1e3:.0f} kB",
            f"vs {state['batch_bytes'] / 1e3:.0f} kB of batch tensors; window holds "
            f"{state['window_docs']} docs; dumps+loads {state['pickle_s'] * 1e3:.2f} ms/batch",
        ),
        (
            "state: StreamLoader.state_dict()",
            f"{state['state_dict_s'] * 1e3:.1f} ms",
            f"JSON {state['json_bytes'] / 1e6:.2f} MB (base64 token arrays)",
        ),
    ]
    print("\n| measurement | result | notes |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.profile:
        profile_reader(data, tok, corpus, args.profile)


if __name__ == "__main__":
    main()
