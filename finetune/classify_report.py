"""What a classification run reports (main rank, after training): ``report.json``,
``report.md`` and ``curves.png`` in the run directory.

Per epoch: the training loss (the mean of the logged step losses of that epoch), the
validation loss and metrics (from ``metrics.jsonl``). Then the test set scored twice in this
process: by the exported model (``runs/<name>/hf/``, the best checkpoint) and by the parent
with the untrained seeded head, the baseline a fine-tuned model must beat.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from finetune.classify_metrics import scores
from launcher import atomic
from launcher.data.batches import evaluation_batches
from launcher.rundir import PREEMPTED
from launcher.sinks import read_jsonl

log = logging.getLogger(__name__)


def epoch_rows(metrics_file: Path, steps_per_epoch: int, metric: str) -> list[dict]:
    """One row per evaluation: epoch, step, train_loss and every ``eval/`` value."""
    rows, losses = [], []
    for line in read_jsonl(metrics_file):
        if "train/loss" in line:
            losses.append(line["train/loss"])
        if metric in line:
            row = {"epoch": round(line["step"] / max(steps_per_epoch, 1)), "step": line["step"]}
            row["train_loss"] = float(np.mean(losses)) if losses else None
            row |= {k: v for k, v in line.items() if k.startswith("eval/")}
            rows.append(row)
            losses = []
    return rows


def score_set(task, model: torch.nn.Module, examples: list) -> dict:
    """Accuracy, macro-F1, per-class scores and the confusion matrix of ``model`` on
    ``examples``, in this process alone."""
    from finetune.classify import tally

    batches = evaluation_batches(
        examples,
        rank=0,
        world_size=1,
        batch_size=task.cfg.train.micro_batch_size,
        pad_id=task.tokenizer.pad_id,
    )
    model.eval()
    with torch.no_grad():
        counts = tally(task, model, batches, torch.device("cpu"))
    classes = len(task.labels)
    matrix = counts[: classes * classes].reshape(classes, classes).long().numpy()
    s = scores(matrix)
    per_class = {
        label: {k: float(s[k][i]) for k in ("precision", "recall", "f1", "support")}
        for i, label in enumerate(task.labels)
    }
    return {
        "examples": len(examples),
        "loss": float(counts[-2] / counts[-1].clamp(min=1e-12)),
        "accuracy": s["accuracy"],
        "macro_f1": s["macro_f1"],
        "per_class": per_class,
        "confusion": matrix.tolist(),
    }


def exported_step(lineage_file: Path) -> int:
    """The step whose weights the export holds (``kiln.json``: a checkpoint, or the last)."""
    lineage = json.loads(lineage_file.read_text())
    found = re.findall(r"step-(\d+)", lineage.get("weights_from", ""))
    return int(found[-1]) if found else int(lineage["step"])


def build_report(cfg, task, stopper) -> dict:
    from transformers import AutoModelForSequenceClassification

    from finetune.classify_model import load_classifier

    c = cfg.classify
    rows = epoch_rows(cfg.run_dir / "metrics.jsonl", task.steps_per_epoch(), c.best_metric)
    best = None
    step = exported_step(cfg.run_dir / "hf" / "kiln.json")
    match = [r for r in rows if r["step"] == step]
    if match:
        best = {"epoch": match[0]["epoch"], "step": step, c.best_metric: match[0][c.best_metric]}
    stopped = stopper.stopped_after
    if stopped is None and rows and cfg.train.epochs and rows[-1]["epoch"] < cfg.train.epochs:
        stopped = rows[-1]["epoch"]
    report = {
        "labels": task.labels,
        "examples": {k: len(v) for k, v in task.sets.splits.items()},
        "data": dict(task.sets.counters),
        "class_weights": dict(zip(task.labels, task.sets.weights, strict=True)),
        "epochs": rows,
        "best": best,
        "early_stopped_after_epoch": stopped,
    }
    test = task.sets.splits["test"]
    if test:
        model = AutoModelForSequenceClassification.from_pretrained(cfg.run_dir / "hf")
        report["test"] = score_set(task, model, test)
        untrained, _ = load_classifier(
            cfg.init.path, task.labels, task.tokenizer.pad_id, cfg.run.seed, c.head_init_std
        )
        report["untrained_test"] = score_set(task, untrained, test)
    return report


def write_reports(cfg, task, stopper) -> dict | None:
    """Write the three reports unless the run stopped early (PREEMPTED: it resumes) or has no
    export; returns the report."""
    run_dir = cfg.run_dir
    if (run_dir / PREEMPTED).exists() or not (run_dir / "hf" / "kiln.json").exists():
        return None
    report = build_report(cfg, task, stopper)
    # replaced whole: the pipeline's report reads report.json
    atomic.write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic.write_text(run_dir / "report.md", markdown(report, cfg.classify.best_metric))
    plot_curves(report, run_dir / "curves.png")
    print(f"[kiln] report          {run_dir / 'report.md'} (and report.json, curves.png)")
    for name in ("test", "untrained_test"):
        if name in report:
            t = report[name]
            print(f"[kiln] {name:15s} accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}")
    return report


def markdown(report: dict, metric: str) -> str:
    out = ["# Classification report", ""]
    out += [f"Labels: {', '.join(report['labels'])}; examples: {report['examples']}.", ""]
    out += ["| epoch | step | train loss | validation loss | accuracy | macro-F1 |"]
    out += ["|---:|---:|---:|---:|---:|---:|"]
    for r in report["epochs"]:
        tl = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-"
        cells = [r.get(f"eval/{k}", float("nan")) for k in ("loss", "accuracy", "macro_f1")]
        out.append(
            f"| {r['epoch']} | {r['step']} | {tl} | " + " | ".join(f"{x:.4f}" for x in cells) + " |"
        )
    best = report["best"]
    if best:
        out += ["", f"Exported: epoch {best['epoch']} (step {best['step']}), {metric} "
                f"{best[metric]:.4f}."]  # fmt: skip
    if report["early_stopped_after_epoch"] is not None:
        out.append(
            f"Early stopping ended the run after epoch {report['early_stopped_after_epoch']}."
        )
    for name, title in (("test", "Test set (exported model)"), ("untrained_test", "Test set "
                        "(parent, untrained head)")):  # fmt: skip
        if name not in report:
            continue
        t = report[name]
        out += ["", f"## {title}", "", f"Accuracy {t['accuracy']:.4f}, macro-F1 "
                f"{t['macro_f1']:.4f}, {t['examples']} examples.", ""]  # fmt: skip
        out += ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        for label, s in t["per_class"].items():
            out.append(
                f"| {label} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | "
                f"{int(s['support'])} |"
            )
        out += ["", "Confusion (rows: true, columns: predicted):", "", "```"]
        out += [" ".join(f"{n:5d}" for n in row) for row in t["confusion"]]
        out.append("```")
    return "\n".join(out) + "\n"


def plot_curves(report: dict, path: Path) -> None:
    """Training and validation loss per epoch, the early-stop epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["epochs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train loss")
    ax.plot(epochs, [r.get("eval/loss") for r in rows], marker="o", label="validation loss")
    if report["early_stopped_after_epoch"] is not None:
        ax.axvline(report["early_stopped_after_epoch"], color="red", ls="--", label="early stop")
    if report["best"]:
        ax.axvline(report["best"]["epoch"], color="green", ls=":", label="exported (best)")
    ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
