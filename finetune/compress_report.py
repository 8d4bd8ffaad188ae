"""The compress stage's table (``compress.md``, ``compress.json``: the same numbers) and its
plot of quality against bytes on disk (``compress.png``), plus the size accounting of
quantized layers read from safetensors headers."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from launcher import atomic


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Each stored tensor's bytes, by name, from the safetensors headers (no weights read)."""
    out: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                out[name] = end - start
    return out


def quantized_share(original: Path, variant: Path) -> float:
    """Bytes of the quantized layers' stored weights (torchao writes ``<layer>._weight_qdata``,
    ``_weight_scale``, ``_weight_zero_point``) over the same layers' full-precision
    ``<layer>.weight`` in the original."""
    before, after = tensor_bytes(original), tensor_bytes(variant)
    layers = {name.split("._weight_")[0] for name in after if "._weight_" in name}
    if not layers:
        raise ValueError(f"{variant}: no torchao-quantized weights in its safetensors")
    quantized = sum(b for name, b in after.items() if name.split("._weight_")[0] in layers)
    full = sum(before[f"{layer}.weight"] for layer in layers)
    return quantized / full


METRICS = {
    "bits_per_byte": ("bits per byte", "lower is better"),
    "macro_f1": ("macro-F1", "higher is better"),
}
"""The quality column: a causal LM's validation bits per byte, a classifier's macro-F1."""


def change(value: float, base: float, metric: str) -> str:
    """Against the original: relative for bits per byte, absolute for macro-F1 (a score)."""
    if metric == "macro_f1":
        return f"{value - base:+.3f}"
    return f"{(value / base - 1) * 100:+.1f}%"


def markdown(table: dict) -> str:
    head = table["header"]
    rows = table["models"]
    metric = head["metric"]
    name, better = METRICS[metric]
    base = rows["original"][metric]
    lines = [
        "# Compressed variants",
        "",
        f"Machine: {head['machine']} ({head['processor']}); Python {head['python']}, torch "
        f"{head['torch']}, torchao {head['torchao']}, transformers {head['transformers']}.",
        f"Latency: one forward of 1 x {head['seq_len']} tokens, {head['threads']} thread(s), "
        f"after warm-ups; median and p10-p90. Quality: {name} on {head['scored_on']} "
        f"({better}). Peak memory: the measuring process's peak resident set while loading "
        "and running the model, above its resident set after the imports.",
        "",
        "| model | parameters | MB on disk | latency ms (p10-p90, runs) | peak MiB | "
        f"{name} (vs original) | notes |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for label, r in rows.items():
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "n/a"
        lines.append(
            f"| {label} | {r['parameters']:,} | {r['bytes_on_disk'] / 1e6:.2f} | "
            f"{r['latency_ms']:.2f} ({r['latency_p10_ms']:.2f}-{r['latency_p90_ms']:.2f}, "
            f"{r['latency_runs']}) | {peak} | {r[metric]:.4f} ({change(r[metric], base, metric)}) "
            f"| {r['note']} |"
        )
    lines += [
        "",
        "No speed-up should be expected of tiny models: their forward is dominated by "
        "overheads, not by the matmuls that int8 or sparsity could speed up (unstructured "
        "zeros are stored and multiplied like any other value).",
        "",
    ]
    return "\n".join(lines)


def plot(table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = table["header"]["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in table["models"].items():
        ax.scatter(r["bytes_on_disk"] / 1e6, r[metric])
        ax.annotate(label, (r["bytes_on_disk"] / 1e6, r[metric]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("MB on disk (weights)")
    ax.set_ylabel(f"{METRICS[metric][0]} ({METRICS[metric][1]})")
    ax.set_title("Quality against size")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(table: dict, run_dir: Path) -> list[Path]:
    """``compress.json``, ``compress.md`` and ``compress.png`` in ``run_dir``, each replaced
    whole (written beside, then renamed)."""
    paths = [run_dir / "compress.json", run_dir / "compress.md", run_dir / "compress.png"]
    atomic.write_text(paths[0], json.dumps(table, indent=2) + "\n")
    atomic.write_text(paths[1], markdown(table))
    tmp = run_dir / "compress.tmp.png"
    plot(table, tmp)
    os.replace(tmp, paths[2])
    return paths
