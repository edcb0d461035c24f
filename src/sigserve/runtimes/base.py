"""The Runtime protocol: one loaded model that predicts on a float64 matrix.

A runtime is built once per artifact sha (at load time, never per request) and is then called
with matrices of any height: one bar from the HTTP or stream drivers, a whole chunk from backfill.
The same runtime object serves both, so one bar and the backfill row for that bar agree bit for bit.

Output shape, by task:

- binary: ``(n, 2)`` probabilities of ``classes[0]`` and ``classes[1]`` (the positive, "up" class)
- multiclass: ``(n, k)`` probabilities in ``classes`` order
- regression: ``(n, 1)`` the predicted value

Usage::

    runtime = load_runtime(card, path)      # sigserve.runtimes.load_runtime
    probs = runtime.predict(np.asarray(rows, dtype=np.float64))
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runtime(Protocol):
    name: str  # "lightgbm", "lleaves", "xgboost", "onnxruntime", "sklearn"

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predict a C-contiguous float64 matrix ``(n, n_features)``; see the module doc for shape."""
        ...


class RowExactPredict:
    """``predict`` for runtimes whose answer for a row may differ in the last bits between a
    batch and the row alone (models built on matrix products). ``load_runtime`` probes this once
    and sets ``row_exact``; a batch is then predicted row by row, so one bar and its backfill row
    still agree bit for bit. Subclasses implement ``_predict(x, n)``.
    """

    n_features: int | None
    width: int
    row_exact: bool = False

    def _predict(self, x: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError

    def predict(self, features: np.ndarray) -> np.ndarray:
        from . import as_matrix

        x = as_matrix(features, self.n_features)
        n = x.shape[0]
        if n == 0:
            return np.empty((0, self.width), dtype=np.float64)
        if self.row_exact and n > 1:
            return np.concatenate([self._predict(x[i : i + 1], 1) for i in range(n)])
        return self._predict(x, n)
