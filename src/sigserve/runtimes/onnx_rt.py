"""ONNX runtime: one ``onnxruntime.InferenceSession`` built at load, one intra-op and one inter-op
thread, so that one row and a batch holding that row agree bit for bit.

The input is cast to float32 when the model asks for float32 (tree converters do): such a model
agrees with its source library to about 1e-7, not bit for bit. For classifiers the runtime reads
the probability output: a float ``(n, k)`` tensor, or a ZipMap (a list of dicts) converted in
``classes`` order (prefer converting models with the ZipMap disabled; it is slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..domain import Task
from ..errors import ValidationError
from . import import_optional, output_width, to_output
from .base import RowExactPredict


def _pick_output(outputs: Sequence[Any], task: Task) -> tuple[str, bool]:
    """The output to read (its name) and whether it is a ZipMap (sequence of maps)."""
    tensors = [o for o in outputs if o.type in ("tensor(float)", "tensor(double)")]
    if task is Task.REGRESSION:
        if not tensors:
            raise ValidationError("the ONNX model has no float output to read a value from")
        return tensors[0].name, False
    for o in tensors:  # a probability matrix (n, k)
        if len(o.shape or ()) == 2 and "prob" in o.name.lower():
            return o.name, False
    for o in outputs:
        if o.type.startswith("seq(map("):
            return o.name, True
    for o in tensors:
        if len(o.shape or ()) == 2:
            return o.name, False
    if tensors:
        return tensors[0].name, False
    raise ValidationError("the ONNX classifier has no probability output")


class OnnxRuntime(RowExactPredict):
    name = "onnxruntime"

    def __init__(self, path: Path, task: Task, *, classes: Sequence[str] = ()) -> None:
        ort = import_optional("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ValidationError(
                f"onnxruntime could not load {Path(path).name}: {exc}",
                details={"path": str(path)},
            ) from exc
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ValidationError(
                f"the ONNX model takes {len(inputs)} inputs; sigserve feeds one (n, features) "
                "matrix",
                details={"inputs": [i.name for i in inputs]},
            )
        inp = inputs[0]
        if inp.type not in ("tensor(float)", "tensor(double)"):
            raise ValidationError(f"the ONNX model's input is {inp.type}; it must be float")
        shape = list(inp.shape or ())
        self._session = session
        self._input = inp.name
        self._dtype = np.float32 if inp.type == "tensor(float)" else np.float64
        self.task = task
        self.n_features: int | None = (
            int(shape[-1]) if len(shape) == 2 and isinstance(shape[-1], int) else None
        )
        self._output, self._zipmap = _pick_output(session.get_outputs(), task)
        self.classes = tuple(str(c) for c in classes)
        out_shape = next(o.shape for o in session.get_outputs() if o.name == self._output)
        k = len(self.classes)
        if not k and out_shape and len(out_shape) == 2 and isinstance(out_shape[1], int):
            k = int(out_shape[1])
        self.width = output_width(task, k)
        # set by load_runtime when a batch and its single rows disagree (models built on matrix
        # products); batches are then predicted row by row
        self.row_exact = False

    def _predict(self, x: np.ndarray, n: int) -> np.ndarray:
        feed = x if self._dtype is np.float64 else x.astype(self._dtype)
        raw = self._session.run([self._output], {self._input: feed})[0]
        if self._zipmap:
            raw = self._from_zipmap(raw)
        elif self.task is Task.MULTICLASS and self.width == 0:
            self.width = int(np.asarray(raw).reshape(n, -1).shape[1])
        return to_output(raw, self.task, n, self.width)

    def _from_zipmap(self, rows: list[dict[Any, float]]) -> np.ndarray:
        if not rows:
            return np.empty((0, self.width))
        keys = list(rows[0])
        if self.classes:
            by_name = {str(k): k for k in keys}
            missing = [c for c in self.classes if c not in by_name]
            if missing:
                raise ValidationError(
                    f"the ONNX model's ZipMap has no classes {missing}",
                    details={"classes": list(self.classes), "zipmap": [str(k) for k in keys]},
                )
            keys = [by_name[c] for c in self.classes]
        if not self.width:
            self.width = len(keys)
        return np.array([[row[k] for k in keys] for row in rows], dtype=np.float64)
