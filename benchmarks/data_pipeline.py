"""Can the data pipeline keep training fed? Measures, and prints as a markdown report:

1. the raw tokenizer in-process: ``TextTokenizer.encode`` per document and ``encode_batch``;
2. ``StreamLoader`` input tokens/s (after a warm-up) with 0, 1 and 2 DataLoader workers at seq_len
   256, micro-batch 8, shuffle window 512, and its ratio per worker to the raw encode speed;
3. a CPU fp32 training step of the ``small`` preset (vocab 4096): forward, cross-entropy,
   backward, AdamW; tokens/s and model FLOP/s, on fixed batches and fed live by a loader;
4. the headroom pipeline / training and the implied data-wait share of a step;
5. the DataLoader workers per GPU an 8-GPU node training ``1b`` would need (assumptions shown);

plus the cost of the reader state: the change that travels with every batch, and the full
state a checkpoint saves. The built-in corpus and a
4096-token tokenizer are made in ``--out``. Medians over ``--repeats`` rounds, each alternating
everything compared (the machine may be shared). ``--profile N`` adds cProfile tables of one
reader and of the loader's main process over N batches. About 3 minutes on 2 cores:

    python benchmarks/data_pipeline.py [--docs 20000] [--seconds 6] [--out /tmp/kiln-bench]
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
import time
from pathlib import Path
from statistics import median as med

import tokenizers
import torch
import torch.nn.functional as F
import yaml

from launcher.config_files import CONFIG_ROOT
from launcher.data.loader import StreamLoader
from launcher.data.plan import Layout
from launcher.data.sources import resolve_corpus, sample_texts
from launcher.data.stream import ReaderStream, fresh_state
from launcher.data.tokenizer import TokenizerConfig
from launcher.data.tokenizer_training import train_tokenizer
from pretrain.data.builtin import BuiltinCorpusConfig, write_builtin_corpus
from pretrain.data.config import PretrainDataConfig
from pretrain.model import ModelConfig, build_model, flops_per_token

SEQ, MICRO, WINDOW, VOCAB = 256, 8, 512, 4096
WORKERS = (0, 1, 2)
WARMUP_BATCHES = 8
GPU_PEAK, GPU_MFU, GPU_SEQ = 989e12, 0.40, 2048  # H100 SXM dense bf16, assumed MFU, 1b seq


def preset(name: str, **overrides) -> ModelConfig:
    return ModelConfig(
        **{**yaml.safe_load((CONFIG_ROOT / "model" / f"{name}.yaml").read_text()), **overrides}
    )


def fmt(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    found = (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return next(found, platform.processor() or "?")


def encode_rates(tok, texts) -> tuple[float, float]:
    """tokens/s of encode() one document at a time, then of encode_batch() (rayon threads)."""
    t0 = time.perf_counter()
    n1 = sum(len(tok.encode(t)) for t in texts)
    t1 = time.perf_counter()
    n2 = sum(len(ids) for ids in tok.encode_batch(texts))
    t2 = time.perf_counter()
    return n1 / (t1 - t0), n2 / (t2 - t1)


def make_loader(data: PretrainDataConfig, tok, corpus, workers: int) -> StreamLoader:
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
    """One reader's full state and per-batch change after a few batches: pickled sizes and
    time; state_dict() cost."""
    reader = ReaderStream(corpus, data, tok, 0, fresh_state(Layout(0, 1), len(corpus.sources), 0))
    deltas = [d for _, (_, d) in zip(range(WARMUP_BATCHES * 4), reader.batches(8), strict=False)]
    loader = make_loader(data, tok, corpus, 0)
    it = iter(loader)
    batch = [next(it) for _ in range(WARMUP_BATCHES)][-1]
    state = next(iter(loader._states.values()))
    out = {"pickle_bytes": len(pickle.dumps(state)), "window_docs": len(state["window"])}
    out["delta_bytes"] = med(len(pickle.dumps(d)) for d in deltas[WARMUP_BATCHES:])
    out["batch_bytes"] = sum(t.nbytes for t in batch.values())
    out["pickle_s"] = med(timed(lambda: pickle.loads(pickle.dumps(state))) for _ in range(7))
    out["state_dict_s"] = med(timed(loader.state_dict) for _ in range(7))
    out["json_bytes"] = len(json.dumps(loader.state_dict()))
    it.close()
    return out


def profile(batches, n: int, title: str, sort: str, top: int = 14) -> None:
    """cProfile ``n`` batches of the iterator ``batches`` (after WARMUP_BATCHES untimed)."""
    for _ in range(WARMUP_BATCHES):
        next(batches)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        next(batches)
    prof.disable()
    print(f"\n### cProfile: {title}, {n} batches, top {top} by {sort}\n")
    pstats.Stats(prof).sort_stats(sort).print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=20000, help="built-in corpus documents")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per pipeline run")
    ap.add_argument("--out", default="/tmp/kiln-bench", help="corpus and tokenizer folder")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (medians are over these)")
    ap.add_argument("--train-steps", type=int, default=3, help="timed train steps per round")
    ap.add_argument("--profile", type=int, default=0, help="cProfile over N batches")
    args = ap.parse_args()
    out = Path(args.out)

    t_setup = time.perf_counter()
    builtin = BuiltinCorpusConfig(docs=args.docs, dir=str(out / "corpus"))
    info = write_builtin_corpus(builtin)
    data = PretrainDataConfig(builtin=builtin, seq_len=SEQ, shuffle_window=WINDOW)
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
    for r in range(args.repeats):
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # encode_batch's threads (in-process)
        s, b = encode_rates(tok, docs)
        single.append(s)
        batched.append(b)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as StreamLoader runs it; no fork warning
        for w in WORKERS if r % 2 == 0 else WORKERS[::-1]:
            pipe[w].append(pipeline_rate(data, tok, corpus, w, args.seconds))
        steps += train_step_times(model, opt, itertools.cycle(fixed), args.train_steps)
        live = iter(make_loader(data, tok, corpus, 1))
        train_step_times(model, opt, live, 1)  # worker start-up and window fill: not timed
        live_steps += train_step_times(model, opt, live, args.train_steps)
        live.close()
    state = state_costs(data, tok, corpus)

    enc1, encb = med(single), med(batched)
    rates = {w: med(v) for w, v in pipe.items()}
    best = max(rates, key=rates.get)
    per_step = MICRO * SEQ
    train_rate, live_rate = per_step / med(steps), per_step / med(live_steps)
    fpt, fpt_1b = flops_per_token(mcfg, SEQ), flops_per_token(preset("1b"), GPU_SEQ)
    gpu_rate = GPU_MFU * GPU_PEAK / fpt_1b  # tokens/s one GPU consumes
    sync_wait = train_rate / (rates[0] + train_rate)  # loading inside the training process
    bg_wait = max(0.0, 1 - rates[best] / train_rate)  # workers loading in the background

    print(f"\n## kiln data pipeline benchmark\n\nsetup {setup_s:.1f}s: corpus {info.docs} docs")
    print(f"({info.text_bytes / 1e6:.1f} MB of text) in {out}; {tok.vocab_size}-token tokenizer;")
    print(f"raw encoding on {len(docs)} docs; medians over {args.repeats} alternating rounds.\n")
    print("| machine | |\n|---|---|")
    print(f"| CPU | {cpu_model()} |\n| cores | {len(os.sched_getaffinity(0))} usable |")
    print(f"| torch | {torch.__version__} ({torch.get_num_threads()} intra-op threads) |")
    print(f"| tokenizers | {tokenizers.__version__} |\n| python | {platform.python_version()} |")
    print("\n| # | measurement | result | notes |\n|---|---|---|---|")

    def row(n, what, result, notes=""):
        print(f"| {n} | {what} | {result} | {notes} |")

    # fmt: off
    row(1, "raw `encode()`, one document at a time", f"{fmt(enc1)} tok/s", "1 thread")
    row(1, "raw `encode_batch()`", f"{fmt(encb)} tok/s", "rayon threads on all cores")
    for w in WORKERS:
        runs = ", ".join(fmt(x) for x in pipe[w])
        ratio = rates[w] / max(w, 1) / enc1
        row(2, f"StreamLoader num_workers={w}", f"{fmt(rates[w])} tok/s",
            f"{ratio:.0%} of raw `encode()` per worker; runs {runs}")
    row(3, "train step, `small` vocab 4096, fp32 CPU", f"{fmt(train_rate)} tok/s",
        f"{per_step} tok/step, median {med(steps):.2f} s/step, AdamW {opt_kind}")
    row(3, "achieved model FLOP/s", f"{fmt(fpt * train_rate)} FLOP/s",
        f"flops_per_token {fmt(fpt)} at seq {SEQ}")
    row(3, "train step fed live by StreamLoader(1 worker)", f"{fmt(live_rate)} tok/s",
        f"median {med(live_steps):.2f} s/step: next(batch) + worker CPU contention")
    row(4, "headroom: best pipeline / training", f"{rates[best] / train_rate:,.0f}x",
        f"best: num_workers={best}")
    row(4, "implied data-wait share of a step", f"{bg_wait:.1%} (workers)",
        f"{sync_wait:.2%} if loaded in the training process (num_workers=0)")
    row(5, "`1b` on an 8-GPU node: workers per GPU",
        f"{math.ceil(gpu_rate / rates[1])} (need {gpu_rate / rates[1]:.2f})",
        f"assumed: H100 bf16 at {GPU_MFU:.0%} MFU of {fmt(GPU_PEAK)}FLOP/s, 1b flops_per_token "
        f"{fmt(fpt_1b)} at seq {GPU_SEQ} = {fmt(gpu_rate)} tok/s/GPU ({fmt(8 * gpu_rate)}/node)"
        f" / {fmt(rates[1])} tok/s of one worker (this 4096-token tokenizer)")
    row("state", "per-batch state change (pickled)", f"{state['delta_bytes'] / 1e3:,.1f} kB",
        f"travels with every batch (batch arrays: {state['batch_bytes'] / 1e3:.0f} kB)")
    row("state", "pickle of one reader's full state", f"{state['pickle_bytes'] / 1e3:,.0f} kB",
        f"{state['window_docs']} window docs; dumps+loads {state['pickle_s'] * 1e3:.2f} ms")
    row("state", "`StreamLoader.state_dict()`", f"{state['state_dict_s'] * 1e3:.1f} ms",
        f"{state['json_bytes'] / 1e6:.2f} MB as JSON")
    # fmt: on
    if args.profile:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        reader = ReaderStream(
            corpus, data, tok, 0, fresh_state(Layout(0, 1), len(corpus.sources), 0)
        )
        profile(reader.batches(MICRO), args.profile, "one reader in-process", "cumulative")
        it = iter(make_loader(data, tok, corpus, 1))
        profile(it, args.profile, "main process of StreamLoader(num_workers=1)", "tottime")
        it.close()


if __name__ == "__main__":
    main()
