"""Flavor runtimes: one loaded model that predicts on a float64 matrix.

:func:`load_runtime` picks the runtime for a :class:`~sigserve.domain.ModelCard` (its ``flavor``,
and ``runtime == "lleaves"`` for a compiled LightGBM model), builds it once, warms it up with one
row, and checks that its output width agrees with the card's task and classes.
:func:`compile_lightgbm` compiles a LightGBM text model with lleaves into a cache file, once per
artifact sha (at registration, never on the request path).

Every runtime answers the shapes of :mod:`sigserve.runtimes.base`, float64 and C-contiguous, and
gives, for one row, exactly the bits that a batch containing that row gives.

Usage::

    runtime = load_runtime(card, path)            # path already sha-verified by the caller
    probs = runtime.predict(np.asarray(rows, dtype=np.float64))
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..domain import ModelCard, Task
from ..errors import ValidationError, missing_extra
from .base import Runtime

log = logging.getLogger(__name__)

__all__ = ["Runtime", "as_matrix", "compile_lightgbm", "load_runtime", "output_width",
           "rows_agree", "to_output"]

# card.runtime values accepted per flavor; None is the flavor's own library.
_RUNTIMES: dict[str, tuple[str, ...]] = {
    "lightgbm": ("lightgbm", "lleaves"),
    "xgboost": ("xgboost",),
    "onnx": ("onnxruntime", "onnx"),
    "sklearn": ("sklearn",),
}


def import_lean(module: str, extra: str | None = None) -> ModuleType:
    """``import module``; in a process that sigserve owns, without scikit-learn and pandas.

    ``lightgbm`` imports scikit-learn and pandas whenever they are installed (2.2 s against 0.4 s
    on the dev machine), and ``lleaves`` imports pandas (0.34 s of its 0.38 s) for a DataFrame
    input that sigserve never passes. The ``sigserve`` command (CLI, server and its workers) sets
    ``SIGSERVE_LEAN_IMPORTS=1``; then, unless another part of the process already imported them,
    they are hidden for the duration of the import (both libraries fall back to their own
    stand-ins) and stay importable afterwards. A library user (a notebook importing sigserve)
    gets the ordinary import, with ``LGBMClassifier`` intact. ``extra`` names the extra that
    installs ``module`` when it is optional.
    """
    import os
    import sys

    loaded = sys.modules.get(module)
    if loaded is not None:
        return loaded
    hidden: list[str] = []
    if os.environ.get("SIGSERVE_LEAN_IMPORTS") == "1":
        hidden = [name for name in ("sklearn", "pandas") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        return importlib.import_module(module) if extra is None else import_optional(module, extra)
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def import_lightgbm() -> ModuleType:
    """``import lightgbm`` the lean way (see :func:`import_lean`)."""
    return import_lean("lightgbm")


def import_optional(module: str, extra: str) -> ModuleType:
    """Import an optional heavy dependency, or raise the error that names its extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(module.split(".")[0], extra) from exc


def as_matrix(features: np.ndarray, n_features: int | None) -> np.ndarray:
    """The input as a C-contiguous float64 ``(n, n_features)`` matrix (no copy when it already is)."""
    x = np.ascontiguousarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValidationError(
            f"features must be a 2-D matrix (rows, features), got shape {x.shape}",
            details={"shape": list(x.shape)},
        )
    if n_features is not None and x.shape[1] != n_features:
        raise ValidationError(
            f"the model takes {n_features} features, got {x.shape[1]}",
            details={"expected": n_features, "got": int(x.shape[1])},
        )
    return x


def to_output(raw: Any, task: Task, n_rows: int, width: int) -> np.ndarray:
    """Shape a library's raw prediction as the runtime contract wants it (see runtimes.base).

    binary: a vector of p(classes[1]) becomes ``[1 - p, p]``; an ``(n, 2)`` matrix is kept.
    multiclass: ``(n, width)``. regression: ``(n, 1)``.
    """
    out = np.asarray(raw, dtype=np.float64)
    if task is Task.BINARY and out.size == n_rows:
        p = out.reshape(n_rows)
        res = np.empty((n_rows, 2), dtype=np.float64)
        res[:, 1] = p
        np.subtract(1.0, p, out=res[:, 0])
        return res
    if out.size != n_rows * width:
        raise ValidationError(
            f"the model gives {out.size // max(n_rows, 1)} outputs per row; a {task} model "
            f"here gives {width}",
            details={"shape": list(out.shape), "task": str(task), "width": width},
        )
    return np.ascontiguousarray(out.reshape(n_rows, width))


def output_width(task: Task, n_classes: int) -> int:
    """Columns of the runtime's output: 2 for binary, k for multiclass, 1 for regression."""
    if task is Task.BINARY:
        return 2
    if task is Task.MULTICLASS:
        return n_classes
    return 1


def rows_agree(
    predict: Callable[[np.ndarray], np.ndarray], n_features: int, n_rows: int = 128
) -> bool:
    """True when a batch's answer is, row by row, bit-identical to predicting each row alone.

    Tree ensembles agree by construction; a model built on a BLAS matrix product (a linear model,
    a neural net) may not, because matrix-vector and matrix-matrix kernels sum in other orders.
    A model that cannot predict the probe rows is given the benefit of the doubt.
    """
    x = np.random.default_rng(20240601).normal(size=(n_rows, n_features))
    try:
        batch = predict(x)
        return all(
            np.array_equal(batch[i : i + 1], predict(x[i : i + 1]), equal_nan=True)
            for i in range(n_rows)
        )
    except Exception:
        return True


def load_runtime(card: ModelCard, path: Path, *, threads: int = 2) -> Runtime:
    """Build the runtime for ``card`` from the artifact at ``path`` (already sha-verified).

    ``threads`` caps the threads that large batches use; one row always runs on one thread.
    With ``card.runtime == "lleaves"``, ``card.extra["compiled_path"]`` names the compiled cache
    file (see :func:`compile_lightgbm`); when that file is absent it is compiled there now, which
    takes tens of seconds.
    """
    path = Path(path)
    flavor = card.flavor
    if flavor not in _RUNTIMES:
        raise ValidationError(
            f"unknown model flavor '{flavor}'; known: {sorted(_RUNTIMES)}",
            details={"flavor": flavor},
        )
    if card.runtime is not None and card.runtime not in _RUNTIMES[flavor]:
        raise ValidationError(
            f"runtime '{card.runtime}' does not serve {flavor} models; use one of "
            f"{list(_RUNTIMES[flavor])}",
            details={"flavor": flavor, "runtime": card.runtime},
        )
    if not path.is_file():
        raise ValidationError(f"model file not found: {path}", details={"path": str(path)})
    threads = max(1, int(threads))
    task = Task(card.task)
    runtime: Any
    if flavor == "lightgbm" and card.runtime == "lleaves":
        from .lleaves_rt import LleavesRuntime

        compiled = card.extra.get("compiled_path")
        if not compiled:
            raise ValidationError(
                f"model {card.ref} asks for the lleaves runtime but its card has no "
                "extra['compiled_path']",
                details={"model": card.ref},
            )
        compiled_path = Path(compiled)
        if not compiled_path.is_file():
            compile_lightgbm(path, compiled_path)
        runtime = LleavesRuntime(path, task, compiled_path, threads=threads)
    elif flavor == "lightgbm":
        from .lightgbm_rt import LightGBMRuntime

        runtime = LightGBMRuntime(path, task, threads=threads)
    elif flavor == "xgboost":
        from .xgboost_rt import XGBoostRuntime

        runtime = XGBoostRuntime(path, task, threads=threads)
    elif flavor == "onnx":
        from .onnx_rt import OnnxRuntime

        runtime = OnnxRuntime(path, task, classes=card.classes)
    else:
        from .sklearn_rt import SklearnRuntime

        runtime = SklearnRuntime(path, task)
    _check_against_card(runtime, card, task)
    return runtime


def _check_against_card(runtime: Any, card: ModelCard, task: Task) -> None:
    """Warm the runtime up with one row and check its width against the card."""
    n_features: int | None = runtime.n_features
    if card.feature_names and n_features is not None and len(card.feature_names) != n_features:
        raise ValidationError(
            f"model {card.ref} takes {n_features} features but its card names "
            f"{len(card.feature_names)}",
            details={"model": card.ref, "n_features": n_features,
                     "card_features": len(card.feature_names)},
        )
    if n_features is None:
        if not card.feature_names:
            return
        n_features = len(card.feature_names)
        runtime.n_features = n_features
    if hasattr(runtime, "row_exact") and not rows_agree(runtime.predict, n_features):
        # sklearn / ONNX models built on matrix products: keep one bar and its backfill row
        # identical by predicting row by row (slower batches, still correct).
        log.warning(
            "model %s (%s): a batch and its single rows disagree in the last bits; predicting "
            "row by row", card.ref, runtime.name,
        )
        runtime.row_exact = True
    probe = runtime.predict(np.zeros((1, n_features), dtype=np.float64))
    width = int(probe.shape[1])
    expected = {Task.BINARY: 2, Task.REGRESSION: 1}.get(task, len(card.classes) or width)
    if width != expected:
        raise ValidationError(
            f"model {card.ref} gives {width} outputs per row but its card says {task} "
            f"with classes {list(card.classes)}",
            details={"model": card.ref, "width": width, "task": str(task)},
        )


def compile_lightgbm(model_path: Path, cache_path: Path) -> Path:
    """Compile a LightGBM text model with lleaves into ``cache_path`` (an object file).

    Slow (tens of seconds for hundreds of trees): call it at registration, keyed by the
    artifact's sha. An existing ``cache_path`` is kept as it is. The object code targets this
    machine's CPU: a cache copied to another CPU model should be compiled again.
    """
    lleaves = import_optional("lleaves", "compile")
    model_path, cache_path = Path(model_path), Path(cache_path)
    if cache_path.is_file() and cache_path.stat().st_size > 0:
        return cache_path
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        model = lleaves.Model(model_file=str(model_path))
        model.compile(cache=str(tmp))
        if not tmp.is_file():
            raise ValidationError(
                f"lleaves did not write a compiled cache for {model_path}",
                details={"path": str(model_path)},
            )
        os.replace(tmp, cache_path)
    except ValidationError:
        raise
    except Exception as exc:
        raise ValidationError(
            f"lleaves could not compile {model_path.name}: {exc}",
            details={"path": str(model_path)},
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return cache_path
