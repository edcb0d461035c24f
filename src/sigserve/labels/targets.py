"""Forward-return targets: ``y_logret_{h}`` for regression, and its sign or a threshold band for
classification. A target looks ``horizon`` bars ahead by design (it is a label, never a feature):
the last ``horizon`` bars of a symbol have none (NaN, or the empty class name).

Usage::

    y = forward_logret(close, 4)                      # y_logret_4
    classes, names = classify(y, "threshold", 0.002)  # 0 down, 1 flat, 2 up
"""

from __future__ import annotations

import numpy as np

from ..errors import ValidationError
from ..features.compute import forward_log_return

SIGN_CLASSES = ("down", "up")
BAND_CLASSES = ("down", "flat", "up")


def target_name(horizon: int) -> str:
    return f"y_logret_{horizon}"


def forward_logret(close: np.ndarray, horizon: int) -> np.ndarray:
    """``log(close[i + h] / close[i])``; NaN for the last ``h`` bars."""
    return forward_log_return(np.asarray(close, dtype=np.float64), horizon)


def classify(y: np.ndarray, method: str = "sign", threshold: float = 0.0
             ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class codes (float, NaN where ``y`` is NaN) and the class names.

    ``sign``: up when ``y > threshold`` else down (binary). ``threshold``: down below
    ``-threshold``, up above ``threshold``, flat between (3 classes; threshold > 0)."""
    y = np.asarray(y, dtype=np.float64)
    codes = np.full(y.shape, np.nan)
    ok = np.isfinite(y)
    if method == "sign":
        codes[ok] = (y[ok] > threshold).astype(np.float64)
        return codes, SIGN_CLASSES
    if method == "threshold":
        if not threshold > 0:
            raise ValidationError("the threshold classification needs threshold > 0",
                                  details={"threshold": threshold})
        codes[ok] = np.where(y[ok] < -threshold, 0.0, np.where(y[ok] > threshold, 2.0, 1.0))
        return codes, BAND_CLASSES
    raise ValidationError(f"unknown classification {method!r}: use sign or threshold",
                          details={"method": method})
