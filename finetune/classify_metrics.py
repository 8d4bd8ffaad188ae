"""Classification metrics from a confusion matrix, and the weighted, label-smoothed loss.

The confusion matrix (rows: true class, columns: predicted) is what ranks add up; every metric
follows from it: accuracy, per-class precision/recall/F1 (0 where undefined, as scikit-learn's
``zero_division`` default) and macro-F1, the unweighted mean of the per-class F1 over every
class of the label map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def confusion(true: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` of ``classes`` x ``classes`` (int64)."""
    out = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(out, (np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def scores(matrix: np.ndarray) -> dict[str, np.ndarray | float]:
    """``accuracy``, ``macro_f1`` and per-class ``precision``, ``recall``, ``f1``,
    ``support`` of a confusion matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    hits = np.diag(matrix)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision, recall = _ratio(hits, predicted), _ratio(hits, actual)
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = matrix.sum()
    return {
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": actual,
    }


def metric_dict(matrix: np.ndarray, labels: list[str], prefix: str = "eval/") -> dict[str, float]:
    """Flat metrics for the logs: ``eval/accuracy``, ``eval/macro_f1`` and
    ``eval/{precision,recall,f1}/<label>``."""
    s = scores(matrix)
    out = {f"{prefix}accuracy": s["accuracy"], f"{prefix}macro_f1": s["macro_f1"]}
    for kind in ("precision", "recall", "f1"):
        for label, value in zip(labels, s[kind], strict=True):
            out[f"{prefix}{kind}/{label}"] = float(value)
    return out


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    smoothing: float,
) -> torch.Tensor:
    """The weighted, label-smoothed cross-entropy SUMMED over the rows; divided by the sum of
    the rows' class weights it is ``F.cross_entropy(weight=, label_smoothing=)``'s mean."""
    return F.cross_entropy(
        logits.float(), labels, weight=weight, label_smoothing=smoothing, reduction="sum"
    )
