"""PNG plots of a training run: the confusion matrix and the feature importance.

Drawn on matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, no global
state, no display needed). ``pip install 'sigserve[train]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import missing_extra


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise missing_extra("matplotlib", "train") from exc
    return Figure(figsize=(width, height), dpi=100)


def confusion_matrix_png(matrix: list[list[int]], classes: tuple[str, ...], path: Path) -> Path:
    m = np.asarray(matrix, dtype=np.float64)
    k = len(classes)
    fig = _figure(1.8 + 0.7 * k, 1.5 + 0.6 * k)
    ax = fig.subplots()
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(m[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title("confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def importance_png(names: tuple[str, ...], importance: np.ndarray, path: Path, top: int = 30) -> Path:
    values = np.asarray(importance, dtype=np.float64)
    order = np.argsort(values)[::-1][:top][::-1]
    fig = _figure(7.0, 1.0 + 0.28 * len(order))
    ax = fig.subplots()
    ax.barh(range(len(order)), values[order], color="#2563eb")
    ax.set_yticks(range(len(order)), labels=[names[i] for i in order], fontsize=8)
    ax.set_xlabel("importance (gain)")
    ax.set_title("feature importance")
    fig.tight_layout()
    fig.savefig(path)
    return path
