"""Measure one model directory in a fresh process: ``python -m finetune.compress_measure
MODEL_DIR INPUTS.pt THREADS WARMUP RUNS`` prints one JSON line.

Why a process per model: the load is then what a user's fresh ``from_pretrained`` does (the
int8 and pruned exports must load with plain transformers, torchao installed), and the peak
memory is that model's alone (the process's peak resident set is reset after the imports).

``INPUTS.pt`` holds the model's kind (``causal`` or ``classifier``), the scored batches (a
causal LM's packed validation rows with their targets and the UTF-8 bytes of their text; a
classifier's padded test examples with their labels) and the one row the latency runs
forward.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _rss_kib(field: str) -> int | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, KiB (Linux only)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the peak resident set to the current one (Linux >= 4.0: ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@torch.inference_mode()
def bits_per_byte(model, batches: list[dict[str, torch.Tensor]], text_bytes: int) -> float:
    """Summed next-token losses (nats) over the validation targets / bytes / ln 2, as the
    pretraining stage's ``eval/bits_per_byte``."""
    from launcher.forward import forward_logits

    nats = 0.0
    for batch in batches:
        logits = forward_logits(model, batch).float()
        nats += float(
            F.cross_entropy(
                logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100, reduction="sum"
            )
        )
    return nats / text_bytes / math.log(2)


@torch.inference_mode()
def classifier_scores(model, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Accuracy and macro-F1 of the argmax predictions over the batches' real examples."""
    from finetune.classify_metrics import confusion, scores

    true, pred = [], []
    for batch in batches:
        real = batch["example_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        true.append(batch["label"][real])
        pred.append(logits[real].argmax(-1))
    matrix = confusion(torch.cat(true).numpy(), torch.cat(pred).numpy(), model.config.num_labels)
    s = scores(matrix)
    return {"macro_f1": s["macro_f1"], "accuracy": s["accuracy"]}


@torch.inference_mode()
def latency_ms(model, ids: torch.Tensor, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(folder: Path, inputs: Path, threads: int, warmup: int, runs: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    data = torch.load(inputs)
    torch.set_num_threads(threads)
    import torchao  # noqa: F401  (registers the int8 tensor types the loader needs)

    before = _rss_kib("VmRSS")
    reset = _reset_peak()
    classifier = data["kind"] == "classifier"
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = auto.from_pretrained(folder)
    model.eval()
    times = latency_ms(model, data["latency_ids"], warmup, runs)
    if classifier:
        quality = classifier_scores(model, data["batches"])
    else:
        quality = {"bits_per_byte": bits_per_byte(model, data["batches"], data["text_bytes"])}
    peak = _rss_kib("VmHWM")
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        **quality,
        "latency_ms": statistics.median(times),
        "latency_p10_ms": percentile(times, 0.1),
        "latency_p90_ms": percentile(times, 0.9),
        "latency_runs": len(times),
        "peak_mib": (peak - before) / 1024 if reset and peak and before else None,
    }


def main(argv: list[str]) -> int:
    from launcher import console

    console.setup()  # the same library-noise filters as every kiln process (torchao's too)
    folder, inputs, threads, warmup, runs = argv
    result = measure(Path(folder), Path(inputs), int(threads), int(warmup), int(runs))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
