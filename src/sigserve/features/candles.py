"""Candle-shape features: pure functions of one bar (and the previous close, for ``gap``).

Every feature is scale-free (a fraction of the bar's open, or of its range), so one model serves
symbols of any price level. A bar with a zero range (high == low) gives finite values: no inf or
NaN ever leaks out of a valid bar.

============== ===================================================================================
name           definition (``o`` open, ``h`` high, ``l`` low, ``c`` close, ``p`` previous close)
============== ===================================================================================
body_size      ``|c - o| / o``
body_direction ``sign(c - o)``: +1, 0 or -1
upper_wick     ``(h - max(o, c)) / o``
lower_wick     ``(min(o, c) - l) / o``
wick_ratio     ``upper / (upper + lower)`` of the wicks in price units; 0.5 when the bar has none
body_to_range  ``|c - o| / (h - l)``; 0 when the range is zero
gap            ``(o - p) / p``; NaN for the first bar (its warm-up is one bar)
range          ``(h - l) / o``
============== ===================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]

CANDLE_FEATURES: tuple[str, ...] = (
    "body_size", "body_direction", "upper_wick", "lower_wick", "wick_ratio", "body_to_range",
    "gap", "range",
)
CANDLE_LOOKBACK = {name: (1 if name == "gap" else 0) for name in CANDLE_FEATURES}


def _body_size(a: Arrays) -> np.ndarray:
    return np.abs(a["close"] - a["open"]) / a["open"]


def _body_direction(a: Arrays) -> np.ndarray:
    return np.sign(a["close"] - a["open"])


def _upper_wick(a: Arrays) -> np.ndarray:
    return (a["high"] - np.maximum(a["open"], a["close"])) / a["open"]


def _lower_wick(a: Arrays) -> np.ndarray:
    return (np.minimum(a["open"], a["close"]) - a["low"]) / a["open"]


def _wick_ratio(a: Arrays) -> np.ndarray:
    upper = np.maximum(a["high"] - np.maximum(a["open"], a["close"]), 0.0)
    lower = np.maximum(np.minimum(a["open"], a["close"]) - a["low"], 0.0)
    total = upper + lower
    safe = np.where(total > 0.0, total, 1.0)
    return np.where(total > 0.0, upper / safe, 0.5)


def _body_to_range(a: Arrays) -> np.ndarray:
    span = a["high"] - a["low"]
    safe = np.where(span > 0.0, span, 1.0)
    return np.where(span > 0.0, np.abs(a["close"] - a["open"]) / safe, 0.0)


def _gap(a: Arrays) -> np.ndarray:
    close = a["close"]
    out = np.full(close.shape[0], np.nan)
    if close.shape[0] > 1:
        out[1:] = (a["open"][1:] - close[:-1]) / close[:-1]
    return out


def _range(a: Arrays) -> np.ndarray:
    return (a["high"] - a["low"]) / a["open"]


CANDLE_FUNCTIONS: dict[str, Callable[[Arrays], np.ndarray]] = {
    "body_size": _body_size,
    "body_direction": _body_direction,
    "upper_wick": _upper_wick,
    "lower_wick": _lower_wick,
    "wick_ratio": _wick_ratio,
    "body_to_range": _body_to_range,
    "gap": _gap,
    "range": _range,
}


def candle_features(a: Arrays, names: Sequence[str]) -> list[np.ndarray]:
    """The named features (in ``names`` order) from one pass: the body, the wicks and the range
    are computed once and shared. Equal to the single-feature functions above, bit for bit."""
    o, h, lo, c = a["open"], a["high"], a["low"], a["close"]
    body = c - o
    top = np.maximum(o, c)
    bottom = np.minimum(o, c)
    span = h - lo
    abs_body = np.abs(body)
    wanted = set(names)
    out: dict[str, np.ndarray] = {}
    if "body_size" in wanted:
        out["body_size"] = abs_body / o
    if "body_direction" in wanted:
        out["body_direction"] = np.sign(body)
    if "upper_wick" in wanted:
        out["upper_wick"] = (h - top) / o
    if "lower_wick" in wanted:
        out["lower_wick"] = (bottom - lo) / o
    if "wick_ratio" in wanted:
        out["wick_ratio"] = _wick_ratio(a)
    if "body_to_range" in wanted:
        safe = np.where(span > 0.0, span, 1.0)
        out["body_to_range"] = np.where(span > 0.0, abs_body / safe, 0.0)
    if "gap" in wanted:
        out["gap"] = _gap(a)
    if "range" in wanted:
        out["range"] = span / o
    return [out[name] for name in names]
