"""Evaluation metrics, in numpy (no scikit-learn needed).

Classification: accuracy, f1_macro, f1_weighted, per-class precision / recall / F1 / support, the
confusion matrix (rows: true class, columns: predicted), and ROC AUC for binary models.
Regression: RMSE, the information coefficient (Spearman rank correlation of prediction and
target) and the hit rate (the share of rows whose predicted sign matches the target's, among
rows with a non-zero target).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    k = len(classes)
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:  # binary: p(class 1)
        p = np.column_stack([1.0 - p, p])
    pred = p.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    tp = np.diag(confusion).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    n = int(y.shape[0])
    present = support > 0
    metrics: dict[str, Any] = {
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "f1_macro": float(f1[present].mean()) if present.any() else float("nan"),
        "f1_weighted": float((f1 * support).sum() / support.sum()) if support.sum() else float("nan"),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion.tolist(),
        "n": n,
    }
    if k == 2:
        metrics["auc"] = roc_auc(y, p[:, 1])
    return metrics


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    y = np.asarray(y_true, dtype=np.float64)
    f = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    nonzero = y != 0
    return {
        "rmse": float(np.sqrt(np.mean((f - y) ** 2))) if y.size else float("nan"),
        "ic_spearman": spearman(f, y),
        "hit_rate": float(np.mean(np.sign(f[nonzero]) == np.sign(y[nonzero]))) if nonzero.any() else float("nan"),
        "n": int(y.shape[0]),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    s = x[order]
    first = np.r_[True, s[1:] != s[:-1]]
    run = np.cumsum(first) - 1
    start = np.flatnonzero(first)
    length = np.diff(np.r_[start, x.shape[0]])
    avg = start + (length - 1) / 2.0
    ranks = np.empty(x.shape[0])
    ranks[order] = avg[run]
    return ranks


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC with tied scores averaged (Mann-Whitney U); NaN when one class is absent."""
    y = np.asarray(y_true) > 0.5
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(np.asarray(score, dtype=np.float64)) + 1.0  # 1-based
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties averaged); NaN when either side is constant."""
    if a.shape[0] < 2:
        return float("nan")
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def classification_report(metrics: dict[str, Any], classes: tuple[str, ...]) -> str:
    width = max(12, *(len(c) for c in classes)) + 2
    lines = [f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for c in classes:
        m = metrics["per_class"][c]
        lines.append(f"{c:<{width}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}"
                     f"{m['support']:>10d}")
    lines.append("")
    lines.append(f"{'accuracy':<{width}}{metrics['accuracy']:>30.4f}{metrics['n']:>10d}")
    lines.append(f"{'f1_macro':<{width}}{metrics['f1_macro']:>30.4f}")
    lines.append(f"{'f1_weighted':<{width}}{metrics['f1_weighted']:>30.4f}")
    if "auc" in metrics:
        lines.append(f"{'auc':<{width}}{metrics['auc']:>30.4f}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted; order: " + ", ".join(classes) + ")")
    for c, row in zip(classes, metrics["confusion_matrix"], strict=True):
        lines.append(f"{c:<{width}}" + "".join(f"{v:>10d}" for v in row))
    return "\n".join(lines) + "\n"


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers only, nested keys joined with ``_`` (MLflow metrics, the card's metrics)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{name}_"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float) and np.isfinite(value):
            out[name] = float(value)
    return out
