"""lleaves runtime: a LightGBM model compiled to machine code by LLVM (about 5x LightGBM's batch
throughput). It loads the object file that :func:`sigserve.runtimes.compile_lightgbm` wrote, so
loading never compiles. It agrees with ``lightgbm`` to about 1e-15, not bit for bit; one row and a
batch holding that row agree bit for bit (each row is evaluated alone, trees in the same order).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from ..domain import Task
from ..errors import ValidationError
from . import as_matrix, import_lean, output_width, to_output

_PARALLEL_ROWS = 20_000  # below this many rows one thread wins over a thread pool
# lleaves' float64 entry point: (features, out, start row, end row); CFUNCTYPE releases the GIL
_ENTRY_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)


class LleavesRuntime:
    name = "lleaves"

    def __init__(self, path: Path, task: Task, compiled_path: Path, *, threads: int = 2) -> None:
        lleaves = import_lean("lleaves", "compile")
        try:
            model = lleaves.Model(model_file=str(path))
            model.compile(cache=str(compiled_path))
        except Exception as exc:
            raise ValidationError(
                f"lleaves could not load {Path(path).name} with cache {compiled_path}: {exc}",
                details={"path": str(path), "compiled_path": str(compiled_path)},
            ) from exc
        self._model = model
        self.task = task
        self.threads = threads
        self.n_features: int | None = int(model.num_feature())
        self._k = int(model.num_model_per_iteration())
        self.width = output_width(task, self._k)
        # The compiled entry point (it drops the GIL), called directly on small batches: that
        # saves lleaves' own per-call checks. Declared with untyped pointers so a call passes the
        # arrays' addresses as ints (no ctypes pointer objects per call). Falls back to
        # Model.predict if lleaves renames it.
        entry = getattr(model, "_c_entry_func", None)
        self._entry: Any = None
        address = ctypes.cast(entry, ctypes.c_void_p).value if entry is not None else None
        if address:
            self._entry = _ENTRY_TYPE(address)

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = as_matrix(features, self.n_features)
        n = x.shape[0]
        if n == 0:
            return np.empty((0, self.width), dtype=np.float64)
        if n < _PARALLEL_ROWS and self._entry is not None:
            raw = np.zeros(n * self._k, dtype=np.float64)
            self._entry(x.ctypes.data, raw.ctypes.data, 0, n)
        else:
            jobs = self.threads if n >= _PARALLEL_ROWS else 1
            raw = self._model.predict(x, n_jobs=jobs)
        return to_output(raw, self.task, n, self.width)
