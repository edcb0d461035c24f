"""scikit-learn runtime: a skops file, or a pickle/joblib file, then ``predict_proba`` for
classifiers (columns in ``classes_`` order) and ``predict`` for regressors.

The caller has verified the artifact's sha256 against the registered one, so the file is trusted by
content (DESIGN.md, Artifacts): every type it holds is loaded. Registration is where untrusted
files are refused (sigserve.registry.flavors).

The model is fed a plain float64 matrix in the card's feature order. A model fitted on a
DataFrame remembers its column names and would warn on every call; the runtime drops those names
from the fitted estimator (they stay on the card), which changes no prediction.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..domain import Task
from ..errors import ValidationError
from . import import_optional, output_width, to_output
from .base import RowExactPredict


def load_sklearn_model(path: Path, *, trusted_types: list[str] | None = None) -> Any:
    """Load a skops or pickle/joblib file. ``trusted_types`` None trusts every type in a skops file.

    Raises the sklearn extra's error when scikit-learn or skops is missing.
    """
    import_optional("sklearn", "sklearn")
    path = Path(path)
    if zipfile.is_zipfile(path):
        sio = import_optional("skops.io", "sklearn")
        trusted = sio.get_untrusted_types(file=path) if trusted_types is None else trusted_types
        return sio.load(path, trusted=trusted)
    joblib = import_optional("joblib", "sklearn")
    return joblib.load(path)


def _drop_feature_names(model: Any) -> bool:
    """Remove ``feature_names_in_`` where sklearn would warn about unnamed input. True when done."""
    target = model
    steps = getattr(model, "steps", None)
    if isinstance(steps, list) and steps:
        target = steps[0][1]
        if hasattr(target, "transformers"):  # a ColumnTransformer may select columns by name
            return False
    if "feature_names_in_" in vars(target):
        del target.feature_names_in_
        return True
    return not hasattr(target, "feature_names_in_")


class SklearnRuntime(RowExactPredict):
    name = "sklearn"

    def __init__(self, path: Path, task: Task) -> None:
        try:
            model = load_sklearn_model(path)
        except ValidationError:
            raise
        except Exception as exc:
            raise ValidationError(
                f"could not load the scikit-learn model {Path(path).name}: {exc}",
                details={"path": str(path)},
            ) from exc
        n = getattr(model, "n_features_in_", None)
        self._model = model
        self.task = task
        self.n_features: int | None = int(n) if n is not None else None
        self._quiet = not _drop_feature_names(model)
        # set by load_runtime when a batch and its single rows disagree (linear models: BLAS
        # kernels); batches are then predicted row by row
        self.row_exact = False
        if task is Task.REGRESSION:
            self._fn = model.predict
            self.width = 1
        else:
            if not hasattr(model, "predict_proba"):
                raise ValidationError(
                    f"the {type(model).__name__} classifier has no predict_proba",
                    details={"estimator": type(model).__name__},
                )
            self._fn = model.predict_proba
            self.width = output_width(task, len(getattr(model, "classes_", ())))

    def _predict(self, x: np.ndarray, n: int) -> np.ndarray:
        if self._quiet:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="X does not have valid feature names")
                raw = self._fn(x)
        else:
            raw = self._fn(x)
        return to_output(raw, self.task, n, self.width)
