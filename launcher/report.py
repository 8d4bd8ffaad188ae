"""The pipeline's report: ``<pipeline>/report.md`` and one PNG of curves per stage, built only
from what the stages left behind (each run's ``metrics.jsonl``, ``hf/kiln.json``, a
classification run's ``report.json``) and ``pipeline.json`` (seconds per stage), so it can be
rebuilt at any time and says nothing a run did not record.

Per stage, the curves its metrics hold: the training loss and every logged validation metric
of the stage's kind (pretraining against tokens seen, the others against steps), and for the
RL stages the mean score or reward and the KL per rollout. The table gives each stage's
steps, time, final training loss and its first -> last value of the stage's headline metric
(validation bits per byte, validation loss, pairwise accuracy, macro-F1 on the test set
against the untrained head, mean score per rollout).
"""

from __future__ import annotations

import json
from pathlib import Path

HEADLINE = {
    "pretrain": "eval/bits_per_byte",
    "sft": "eval/loss",
    "reward": "eval/accuracy",
    "dpo": "eval/accuracy",
    "classify": "eval/macro_f1",
    "ppo": "ppo/score",
    "grpo": "grpo/reward_mean",
}
PANELS = {  # stage -> panels, each a list of metrics drawn together
    "ppo": [["ppo/score", "ppo/reward"], ["ppo/kl"]],
    "grpo": [["grpo/reward_mean"], ["grpo/completion_length"]],
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def panels_of(stage: str, rows: list[dict]) -> list[list[str]]:
    """The metrics to draw, panel by panel: the stage's own, else the training loss and the
    validation metrics it logged (losses together, each other metric alone)."""
    present = {k for r in rows for k in r}
    if stage in PANELS:
        return [[m for m in p if m in present] for p in PANELS[stage] if set(p) & present]
    evals = sorted(k for k in present if k.startswith("eval/") and not k.endswith("_tokens"))
    losses = ["train/loss"] + [k for k in evals if k.endswith("loss")]
    out = [[m for m in losses if m in present]]
    out += [[k] for k in evals if not k.endswith("loss") and k != "eval/perplexity"]
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


def headline(stage: str, run_dir: Path, rows: list[dict]) -> tuple[str, str]:
    """(metric, "first -> last") of the stage's headline metric."""
    if stage == "classify" and (run_dir / "report.json").is_file():
        report = json.loads((run_dir / "report.json").read_text())
        after, before = report.get("test") or {}, report.get("untrained_test") or {}
        if "macro_f1" in after and "macro_f1" in before:
            return "test macro-F1, untrained head -> trained", (
                f"{before['macro_f1']:.3f} -> {after['macro_f1']:.3f}"
            )
    metric = HEADLINE.get(stage)
    values = [r[metric] for r in rows if metric in r]
    if not values:
        return metric or "-", "-"
    return metric, f"{values[0]:.4g} -> {values[-1]:.4g}"


def write_report(root: Path, stages: list[tuple[str, str]]) -> Path:
    """``root/report.md`` and ``root/<id>.png`` for ``stages`` [(id, stage kind)] in order."""
    import matplotlib.pyplot as plt

    state_file = root / "pipeline.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    lines = [
        f"# Pipeline {root.name}",
        "",
        "| stage | kind | steps | seconds | final train loss | headline | first -> last | parent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sections = []
    for sid, stage in stages:
        run_dir = root / sid
        rows = read_metrics(run_dir)
        lineage_file = run_dir / "hf" / "kiln.json"
        lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        metric, change = headline(stage, run_dir, rows)
        parent = (lineage.get("parent") or {}).get("path", "-")
        seconds = state.get(sid, {}).get("seconds", "-")
        loss = f"{losses[-1]:.4f}" if losses else "-"
        lines.append(
            f"| {sid} | {stage} | {lineage.get('step', '-')} | {seconds} | {loss} | {metric} | "
            f"{change} | {parent} |"
        )
        fig = figure(stage, rows)
        if fig is not None:
            fig.savefig(root / f"{sid}.png", dpi=90)
            plt.close(fig)
            sections += ["", f"## {sid} ({stage})", "", f"![{sid}]({sid}.png)"]
    out = root / "report.md"
    out.write_text("\n".join([*lines, *sections]) + "\n")
    return out
