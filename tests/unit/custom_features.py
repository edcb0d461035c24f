"""A custom feature for the spec tests, loaded by import path (``tests.unit.custom_features:...``)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def close_over_max(candles: dict[str, np.ndarray], period: int = 5) -> np.ndarray:
    """close / max(close of the last ``period`` bars); NaN for the first ``period - 1`` bars."""
    close = candles["close"]
    out = np.full(close.shape[0], np.nan)
    if close.shape[0] >= period:
        out[period - 1:] = close[period - 1:] / sliding_window_view(close, period).max(axis=1)
    return out
