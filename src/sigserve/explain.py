"""Explanations: the top-k feature contributions of one prediction, by the flavor's own TreeSHAP
(LightGBM ``pred_contrib=True``, XGBoost ``pred_contribs=True``), on CPU.

Contributions are on the model's raw margin (log-odds for a binary model, the class's margin for
a multiclass one, the value for a regression): ``base_value + sum(contributions) == raw_margin``
(tests/unit/test_explain.py checks it). For a multiclass model the explained class is the
predicted one. Other flavors are refused with ``explanation_unsupported`` (409).

The explainer's booster is the served runtime's own when it has one (LightGBM, XGBoost); for a
compiled (lleaves) model the LightGBM text artifact is loaded once, sha-verified, and cached by
sha. Nothing here runs for a request that does not ask for it.

Usage::

    out = explain(prepared, row, registry, top_k=5)     # row: float64 (1, n_model_features)
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .domain import Task
from .errors import ExplanationUnsupported

if TYPE_CHECKING:
    from .engine import Prepared
    from .registry.models import ModelRegistry

SUPPORTED = ("lightgbm", "xgboost")
_boosters: dict[str, Any] = {}
_lock = threading.Lock()


def _booster(prepared: Prepared, registry: ModelRegistry) -> Any:
    card = prepared.card
    if card.flavor not in SUPPORTED:
        raise ExplanationUnsupported(
            f"model {card.ref} is a {card.flavor} model: explanations need native TreeSHAP"
            f" ({', '.join(SUPPORTED)})", details={"model": card.ref, "flavor": card.flavor,
                                                   "supported": list(SUPPORTED)})
    own = getattr(prepared.runtime, "_booster", None)
    if own is not None:
        return own
    key = card.sha256 or ""
    with _lock:
        cached = _boosters.get(key)
        if cached is None:
            path = registry.artifacts.verified_path(card.sha256, card.artifact_path)
            if card.flavor == "lightgbm":
                import lightgbm

                cached = lightgbm.Booster(model_file=str(path))
            else:
                from .runtimes.xgboost_rt import load_booster

                cached = load_booster(path)
            _boosters[key] = cached
        return cached


def contributions(prepared: Prepared, registry: ModelRegistry,
                  rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(contributions (n, k, f), base values (n, k), raw margins (n, k)) with k the model's
    output margins (1 for binary and regression)."""
    booster = _booster(prepared, registry)
    x = np.ascontiguousarray(rows, dtype=np.float64)
    n, f = x.shape
    if prepared.card.flavor == "lightgbm":
        contrib = np.asarray(booster.predict(x, pred_contrib=True, num_threads=1), dtype=np.float64)
        margin = np.asarray(booster.predict(x, raw_score=True, num_threads=1), dtype=np.float64)
    else:
        import xgboost

        matrix = xgboost.DMatrix(x)
        contrib = np.asarray(booster.predict(matrix, pred_contribs=True, validate_features=False),
                             dtype=np.float64)
        margin = np.asarray(booster.predict(matrix, output_margin=True, validate_features=False),
                            dtype=np.float64)
    contrib = contrib.reshape(n, -1, f + 1)
    margin = margin.reshape(n, -1)
    return contrib[:, :, :f], contrib[:, :, f], margin


def explain(prepared: Prepared, registry: ModelRegistry, row: np.ndarray, top_k: int = 5,
            output: np.ndarray | None = None) -> dict[str, Any]:
    """The explanation of one row: the top ``top_k`` features by absolute contribution."""
    began = time.perf_counter()
    card = prepared.card
    values, base, margin = contributions(prepared, registry, row[:, : prepared.n_model_features])
    k = values.shape[1]
    index = 0
    if k > 1:
        probs = output[0] if output is not None else margin[0]
        index = int(np.argmax(probs))
        explained = card.classes[index] if index < len(card.classes) else str(index)
    elif card.task is Task.REGRESSION:
        explained = "value"
    else:
        explained = card.classes[1] if len(card.classes) == 2 else "positive"
    contrib = values[0, index]
    order = np.argsort(-np.abs(contrib), kind="stable")[:top_k]
    names = card.feature_names
    return {
        "method": f"{card.flavor} TreeSHAP",
        "model": card.ref,
        "explained": explained,
        "output": "raw margin (log-odds)" if card.task is not Task.REGRESSION else "value",
        "base_value": float(base[0, index]),
        "raw_margin": float(margin[0, index]),
        "top_features": [{"feature": names[i], "value": float(row[0, i]), "contribution": float(contrib[i])}
                         for i in order],
        "latency_ms": round((time.perf_counter() - began) * 1000.0, 4),
    }
