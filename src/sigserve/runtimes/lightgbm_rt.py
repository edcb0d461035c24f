"""LightGBM runtime: ``lightgbm.Booster`` for batches, the C single-row fast API for one row.

One row goes through ``LGBM_BoosterPredictForMatSingleRowFast`` (about twice as fast as
``Booster.predict`` on one row), prepared once at load. It runs the same predictor over the same
trees in the same order as a batch predict, so its answer is bit-identical to that row's answer in
a batch (tests/unit/test_runtimes.py proves it). Should the fast API be unavailable, one row goes
through ``Booster.predict`` instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..domain import Task
from ..errors import ValidationError
from . import as_matrix, output_width, to_output

_PREDICT_NORMAL = 0  # C_API_PREDICT_NORMAL
_DTYPE_FLOAT64 = 1  # C_API_DTYPE_FLOAT64
_FAST_ROWS = 4  # up to this many rows, one fast single-row call each beats one Booster.predict
_SMALL_BATCH = 2048  # below this many rows, one thread is faster than starting OpenMP workers


# int LGBM_BoosterPredictForMatSingleRowFast(FastConfigHandle, const void* data, int64_t* out_len,
#                                             double* out_result)
_FAST_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class _SingleRow:
    """A prepared ``FastConfig`` for one-row predictions (float64, all iterations, one thread)."""

    def __init__(self, booster: Any, n_features: int, width: int) -> None:
        from lightgbm.basic import _LIB, _c_str, _safe_call

        self._lib = _LIB
        self._safe_call = _safe_call
        self._booster = booster  # keeps the handle alive for as long as the config lives
        self._config = ctypes.c_void_p()
        _safe_call(
            _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                booster._handle,
                ctypes.c_int(_PREDICT_NORMAL),
                ctypes.c_int(0),
                ctypes.c_int(-1),
                ctypes.c_int(_DTYPE_FLOAT64),
                ctypes.c_int32(n_features),
                _c_str("num_threads=1"),
                ctypes.byref(self._config),
            )
        )
        self._width = width
        self._out_len = ctypes.c_int64()
        self._out_len_address = ctypes.addressof(self._out_len)
        self._config_address = self._config.value
        # The same C function through a prototype of our own, taking plain addresses: no ctypes
        # pointer objects per call (data_as and byref cost ~3 us a row), and lightgbm's own
        # function object is left as lightgbm set it up.
        address = ctypes.cast(_LIB.LGBM_BoosterPredictForMatSingleRowFast, ctypes.c_void_p).value
        if not address:
            raise ValidationError("LightGBM's single-row predict entry point is missing")
        self._fast = _FAST_TYPE(address)
        self._lock = threading.Lock()

    def predict(self, row: np.ndarray) -> np.ndarray:
        out = np.empty(self._width, dtype=np.float64)
        with self._lock:
            status = self._fast(self._config_address, row.ctypes.data, self._out_len_address, out.ctypes.data)
            if status != 0:
                self._safe_call(status)  # raises LightGBM's own error message
            n = self._out_len.value
        if n != self._width:
            raise ValidationError(f"LightGBM gave {n} values for one row, expected {self._width}")
        return out

    def __del__(self) -> None:
        config = getattr(self, "_config", None)
        if config is not None and config.value:
            with contextlib.suppress(Exception):  # interpreter shutdown
                self._lib.LGBM_FastConfigFree(config)
            config.value = None


class LightGBMRuntime:
    name = "lightgbm"

    def __init__(self, path: Path, task: Task, *, threads: int = 2) -> None:
        from . import import_lightgbm

        lightgbm = import_lightgbm()

        try:
            self._booster = lightgbm.Booster(model_file=str(path))
        except Exception as exc:
            raise ValidationError(
                f"LightGBM could not load {Path(path).name}: {exc}", details={"path": str(path)}
            ) from exc
        self.task = task
        self.threads = threads
        self.n_features: int | None = int(self._booster.num_feature())
        self._k = int(self._booster.num_model_per_iteration())
        self._raw_width = self._k  # values LightGBM gives per row
        self.width = output_width(task, self._k)
        self._single: _SingleRow | None
        try:
            self._single = _SingleRow(self._booster, self.n_features, self._raw_width)
        except Exception:  # pragma: no cover - the fast API is missing or refused this model
            self._single = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = as_matrix(features, self.n_features)
        n = x.shape[0]
        if n == 0:
            return np.empty((0, self.width), dtype=np.float64)
        raw: Any
        single = self._single
        if n <= _FAST_ROWS and single is not None:
            # A stream's micro-batches are a few rows: Booster.predict builds a predictor per
            # call (~60-100 us), the fast one-row entry costs ~12 us a row, and gives the same bits.
            raw = single.predict(x[0]) if n == 1 else np.stack([single.predict(row) for row in x])
        else:
            raw = self._booster.predict(
                x, num_iteration=-1, num_threads=1 if n < _SMALL_BATCH else self.threads
            )
        return to_output(raw, self.task, n, self.width)
