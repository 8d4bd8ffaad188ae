"""The pipeline's report: ``<pipeline>/report.md`` and one PNG of curves per stage, built only
from what the stages left behind (each run's ``metrics.jsonl``, ``hf/kiln.json``, a
classification run's ``report.json``) and ``pipeline.json`` (seconds per stage), so it can be
rebuilt at any time and says nothing a run did not record.

Per stage, the curves its metrics hold: the training loss and every logged validation metric
of the stage's kind (pretraining against tokens seen, the others against steps), and for the
RL stages the mean score or reward and the KL per rollout. The table gives each stage's
steps, time, final training loss and the before -> after of its headline measure (with
``eval.at_start`` a stage's first evaluation is its parent's): pretraining's validation bits
per byte against the unigram baseline of the same tokens, SFT's held-out exact match (else its
validation loss), the reward model's pairwise accuracy, DPO's and PPO's held-out reward by the
judge's reward model (the change in standard deviations of the parent's rewards, and the KL to
the parent), classification's test macro-F1 against the untrained head.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher import atomic
from launcher.sinks import read_jsonl

HEADLINE = {  # a stage's measure when before_after has no better one
    "pretrain": "eval/bits_per_byte",
    "sft": ("eval/exact_match", "eval/loss"),
    "reward": "eval/accuracy",
    "dpo": "eval/accuracy",
    "classify": "eval/macro_f1",
    "ppo": "ppo/score",
    "grpo": "grpo/reward_mean",
}
PANELS = {  # stage -> panels, each a list of metrics drawn together
    "ppo": [["ppo/score", "ppo/reward"], ["ppo/kl", "eval/kl"], ["eval/reward_mean"]],
    "grpo": [["grpo/reward_mean"], ["grpo/completion_length"]],
}


PAIRED = {"eval/bits_per_byte": "eval/unigram_bits_per_byte"}
"""A metric drawn with the one it is compared with."""
UNDRAWN = {"eval/perplexity", "eval/pairs", "eval/reward_std"}


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def panels_of(stage: str, rows: list[dict]) -> list[list[str]]:
    """The metrics to draw, panel by panel: the stage's own, else the training loss and the
    validation metrics it logged (losses together, each other metric alone)."""
    present = {k for r in rows for k in r}
    if stage in PANELS:
        return [[m for m in p if m in present] for p in PANELS[stage] if set(p) & present]
    evals = sorted(k for k in present if k.startswith("eval/") and not k.endswith("_tokens"))
    losses = ["train/loss"] + [k for k in evals if k.endswith("loss")]
    out = [[m for m in losses if m in present]]
    for k in evals:
        if k.endswith("loss") or k in UNDRAWN or k in PAIRED.values():
            continue
        out.append([k] + [m for m in [PAIRED.get(k)] if m in present])
    return [p for p in out if p]


def figure(stage: str, rows: list[dict]):
    """The stage's curves as a matplotlib figure (axes labelled), or None without metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_of(stage, rows)
    if not panels:
        return None
    by_tokens = stage == "pretrain"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, metrics in zip(axes[0], panels, strict=True):
        for metric in metrics:
            points = [r for r in rows if metric in r]
            xs = [r.get("train/tokens_seen", r["step"]) if by_tokens else r["step"] for r in points]
            ax.plot(xs, [r[metric] for r in points], marker="." if len(points) < 40 else None,
                    label=metric)  # fmt: skip
        ax.set_xlabel("tokens seen" if by_tokens else "step")
        ax.set_ylabel(metrics[0] if len(metrics) == 1 else "value")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(stage)
    fig.tight_layout()
    return fig


def _values(rows: list[dict], metric: str) -> list[float]:
    return [r[metric] for r in rows if metric in r]


def before_after(stage: str, run_dir: Path, rows: list[dict]) -> tuple[str, str, str, str]:
    """(measure, before, after, change) of the stage's headline: its first and last
    evaluation (with ``eval.at_start`` the first is the parent's), or the reference it is
    compared with (pretraining: the unigram baseline; classification: the untrained head)."""
    if stage == "classify" and (run_dir / "report.json").is_file():
        report = json.loads((run_dir / "report.json").read_text())
        after, before = report.get("test") or {}, report.get("untrained_test") or {}
        if "macro_f1" in after and "macro_f1" in before:
            a, b = after["macro_f1"], before["macro_f1"]
            return "test macro-F1 (untrained head)", f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}"
    if stage == "pretrain":
        bpb, unigram = (
            _values(rows, "eval/bits_per_byte"),
            _values(rows, "eval/unigram_bits_per_byte"),
        )
        if bpb and unigram:
            a, b = bpb[-1], unigram[-1]
            return "bits per byte (unigram baseline)", f"{b:.4f}", f"{a:.4f}", f"{a / b - 1:+.1%}"
    if stage in ("dpo", "ppo"):
        means, stds = _values(rows, "eval/reward_mean"), _values(rows, "eval/reward_std")
        kls = _values(rows, "eval/kl")
        if len(means) > 1 and stds and stds[0] > 0:
            shift = (means[-1] - means[0]) / stds[0]
            kl = f", KL {kls[-1]:.2f}" if kls else ""
            return "held-out reward", f"{means[0]:.3f}", f"{means[-1]:.3f}", f"{shift:+.2f} sd{kl}"
    wanted = HEADLINE.get(stage)
    candidates = wanted if isinstance(wanted, tuple) else (wanted,) if wanted else ()
    metric = next((m for m in candidates if _values(rows, m)), None)
    values = _values(rows, metric) if metric else []
    if not values:
        return metric or "-", "-", "-", "-"
    first, last = values[0], values[-1]
    return metric, f"{first:.4g}", f"{last:.4g}", f"{last - first:+.4g}"


def write_report(root: Path, stages: list[tuple[str, str]]) -> Path:
    """``root/report.md`` and ``root/<id>.png`` for ``stages`` [(id, stage kind)] in order."""
    import matplotlib.pyplot as plt

    state_file = root / "pipeline.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    lines = [
        f"# Pipeline {root.name}",
        "",
        "| stage | kind | steps | seconds | final train loss | measure | before | after | change "
        "| parent |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sections = []
    for sid, stage in stages:
        run_dir = root / sid
        rows = read_metrics(run_dir)
        lineage_file = run_dir / "hf" / "kiln.json"
        lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        measure, before, after, change = before_after(stage, run_dir, rows)
        parent = (lineage.get("parent") or {}).get("path", "-")
        if parent != "-" and Path(parent).is_relative_to(root.resolve()):
            parent = str(Path(parent).relative_to(root.resolve()))  # another stage's export
        seconds = state.get(sid, {}).get("seconds", "-")
        loss = f"{losses[-1]:.4f}" if losses else "-"
        lines.append(
            f"| {sid} | {stage} | {lineage.get('step', '-')} | {seconds} | {loss} | {measure} | "
            f"{before} | {after} | {change} | {parent} |"
        )
        fig = figure(stage, rows)
        if fig is not None:
            fig.savefig(root / f"{sid}.png", dpi=90)
            plt.close(fig)
            sections += ["", f"## {sid} ({stage})", "", f"![{sid}]({sid}.png)"]
    return atomic.write_text(root / "report.md", "\n".join([*lines, *sections]) + "\n")
