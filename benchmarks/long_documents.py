"""Long documents: time to the first batch, throughput and memory of a one-document corpus.

For each size (default 100 kB, 1 MB and 30 MB of text on one JSON line, ``max_document_bytes:
null``) a fresh process builds a ``StreamLoader`` (in-process reader, seq_len 256, micro-batch
8, default shuffle window) and measures the time to its first batch, the time until the whole
document has gone through (its text MB/s and tokens/s), and its peak RSS above the same process
before reading. The raw tokenizer is measured the same way on the 30 MB text: ``encode()`` of
the whole text in one call, and ``encode()`` of the corpus's ordinary documents one at a time
(its usual speed). The goal: a long document flows at >= 0.5x the raw speed, with bounded
memory, and its first batch does not wait for the whole document.

The text is the built-in corpus's documents joined by blank lines; the tokenizer is the
project's sentencepiece (4096 tokens) trained on that corpus, or ``--tokenizer`` (a
tokenizer.json or a folder). Rates are per CPU second of the measured process, so that other
load on a shared machine moves them less than wall times. About 4.5 minutes on 2 cores (most
of it the one-call encode of 30 MB), 3 GB of memory:

    python benchmarks/long_documents.py [--sizes 100k,1M,30M] [--out /tmp/kiln-long]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
SEQ, MICRO, VOCAB = 256, 8, 4096
UNITS = {"k": 10**3, "M": 10**6}


class Meter:
    """Wall time, CPU time of this process and its peak RSS above the start, from now on.

    CPU time is what the comparisons use: other processes on a shared machine change wall
    times between runs, much less the CPU a run needs. The peak is the kernel's high-water
    mark, reset here (``/proc/self/clear_refs``) so that start-up does not count.
    """

    def __init__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.base = self._status("VmRSS")
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
        raise KeyError(key)

    def read(self) -> dict:
        return {
            "seconds": time.perf_counter() - self.wall,
            "cpu": time.process_time() - self.cpu,
            "rss": self._status("VmHWM") - self.base,
        }


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def child(args) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    from launcher.data.loader import StreamLoader
    from launcher.data.sources import resolve_corpus
    from launcher.data.tokenizer import TextTokenizer
    from pretrain.data.config import PretrainDataConfig

    tok = TextTokenizer.load(args.tokenizer)
    tok.encode("warm up")
    if args.child == "raw-whole":
        text = json.loads(Path(args.doc).read_text())["text"]
        meter = Meter()
        n = len(tok.encode(text))
        return {**meter.read(), "tokens": n, "bytes": len(text.encode())}
    if args.child == "raw-docs":
        texts = [json.loads(line)["text"] for line in Path(args.doc).read_text().splitlines()]
        meter = Meter()
        n = sum(len(tok.encode(t)) for t in texts)
        return {**meter.read(), "tokens": n, "bytes": sum(len(t.encode()) for t in texts)}
    data = PretrainDataConfig.model_validate(
        {
            "sources": [{"paths": [args.doc]}],
            "seq_len": SEQ,
            "num_workers": 0,
            "max_document_bytes": None,
            "validation": {"fraction": 0.0},
        }
    )
    meter = Meter()
    loader = StreamLoader(data, tok, resolve_corpus(data), batch_size=MICRO, seed=0)
    batches = iter(loader)
    next(batches)
    first = meter.read()
    # The document is through when the reader starts its next reading (epoch 1).
    n = 1
    while loader._states[0]["counters"]["documents"] < 2:
        next(batches)
        n += 1
    through = meter.read()
    state = len(json.dumps(loader.state_dict()))
    text = json.loads(Path(args.doc).read_text())["text"]
    return {
        **through,
        "first": first["seconds"],
        "tokens": n * MICRO * SEQ,
        "bytes": len(text.encode()),
        "state_bytes": state,
    }


def run_child(kind: str, doc: Path, tokenizer: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--doc",
        str(doc),
        "--tokenizer",
        str(tokenizer),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{kind} {doc} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(
    out: Path, sizes: list[int], tokenizer: str | None
) -> tuple[Path, dict[int, Path], Path]:
    """The built-in corpus, a tokenizer, one single-line document per size."""
    from launcher.data.sources import sample_texts
    from launcher.data.tokenizer import TokenizerConfig
    from launcher.data.tokenizer_training import train_tokenizer
    from pretrain.data.builtin import BuiltinCorpusConfig, write_builtin_corpus
    from pretrain.data.config import PretrainDataConfig

    builtin = BuiltinCorpusConfig(docs=20000, dir=str(out / "corpus"))
    write_builtin_corpus(builtin)
    sources = PretrainDataConfig(builtin=builtin).all_sources()
    texts = list(sample_texts(sources, 10**9, 10**10, 0))
    if tokenizer is None:
        tcfg = TokenizerConfig(vocab_size=VOCAB)
        train_tokenizer(tcfg, iter(texts), out / "tokenizer")
        tok_path = out / "tokenizer"
    else:
        tok_path = Path(tokenizer)
    docs = out / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2000]))
    joined = "\n\n".join(texts)
    while len(joined) < max(sizes):
        joined = joined + "\n\n" + joined
    files = {}
    for size in sizes:
        files[size] = out / f"one-{size}.jsonl"
        files[size].write_text(json.dumps({"text": joined[:size]}) + "\n")
    return tok_path, files, docs


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3g} MB" if n >= 1e6 else f"{n / 1e3:.3g} kB"


def median_run(runs: list[dict]) -> dict:
    """The run of median CPU time (its other numbers with it)."""
    return sorted(runs, key=lambda r: r["cpu"])[len(runs) // 2]


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    found = (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return next(found, platform.processor() or "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100k,1M,30M", help="document sizes (characters)")
    ap.add_argument("--out", default="/tmp/kiln-long", help="corpus, tokenizer and documents")
    ap.add_argument("--tokenizer", default=None, help="an HF tokenizer instead of the trained one")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (medians are over these)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--doc", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    tok_path, files, docs = prepare(out, sizes, args.tokenizer)
    setup = time.perf_counter() - t0

    # Rounds alternate the pipeline and the raw tokenizer (the machine may be shared).
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for size in sizes:
            runs.setdefault(f"stream {size}", []).append(run_child("stream", files[size], tok_path))
        runs.setdefault("whole", []).append(run_child("raw-whole", files[max(sizes)], tok_path))
        runs.setdefault("docs", []).append(run_child("raw-docs", docs, tok_path))
    whole, usual = median_run(runs["whole"]), median_run(runs["docs"])
    raw_whole = whole["bytes"] / whole["cpu"]
    raw_docs = usual["bytes"] / usual["cpu"]

    import tokenizers
    import torch

    name = f"trained sentencepiece, {VOCAB} tokens" if args.tokenizer is None else "given"
    print(f"\n## kiln long documents benchmark\n\nsetup {setup:.1f}s in {out};")
    print(f"tokenizer {tok_path} ({name}); seq_len {SEQ}, micro-batch {MICRO}, one in-process")
    print("reader (num_workers=0), default shuffle window; every run in a fresh process;")
    print(f"medians over {args.repeats} alternating rounds. Rates are per CPU second of the")
    print("process (wall times vary with the machine's other load); memory is the peak RSS")
    print("above the process before reading.\n")
    print("| machine | |\n|---|---|")
    print(f"| CPU | {cpu_model()} |\n| torch | {torch.__version__} |")
    print(f"| tokenizers | {tokenizers.__version__} |\n| python | {platform.python_version()} |\n")
    head = [
        "document",
        "first batch (wall)",
        "all through (wall / CPU)",
        "text MB/s",
        "tokens/s",
        "vs raw, whole text",
        "vs raw, per document",
        "peak RSS",
        "state (JSON)",
    ]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    rows = [(f"{fmt_bytes(median_run(runs[f'stream {n}'])['bytes'])} on one line", f"stream {n}")
            for n in sizes]  # fmt: skip
    rows += [
        (f"raw `encode()`, the whole {fmt_bytes(whole['bytes'])} text in one call", "whole"),
        (f"raw `encode()`, {fmt_bytes(usual['bytes'])} as documents one at a time", "docs"),
    ]
    for label, key in rows:
        r = median_run(runs[key])
        rate = r["bytes"] / r["cpu"]
        first = median(x["first"] for x in runs[key]) if "first" in r else None
        cells = [
            label,
            "-" if first is None else f"{first:.2f} s",
            f"{r['seconds']:.2f} s / {r['cpu']:.2f} s",
            f"{rate / 1e6:.2f}",
            f"{r['tokens'] / r['cpu'] / 1e6:.2f}M",
            f"{rate / raw_whole:.2f}x",
            f"{rate / raw_docs:.2f}x",
            f"{max(x['rss'] for x in runs[key]):.0f} MB",
            f"{r['state_bytes'] / 1e3:.1f} kB" if "state_bytes" in r else "-",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
