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
