"""Programmatic labels from TA-Lib's candlestick pattern functions (``CDL*``).

A pattern function answers per candle: a positive value (+100, or +200 for a confirmed pattern)
labels the candle ``bullish_<name>``, a negative one ``bearish_<name>``, where ``<name>`` is the
function's name without ``CDL``, in lower case (``CDLENGULFING`` -> ``bullish_engulfing``). Each
hit is a one-candle span on the bar that completes the pattern (point in time: the pattern is
known at that bar's close), with source ``programmatic``.

Usage::

    spans = pattern_spans(candles, "BTCUSDT", "1h", ["CDLENGULFING", "CDLHAMMER"])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ValidationError
from ..features.spec import candle_arrays, import_talib
from .annotations import Span


def pattern_names(patterns: Any = "all") -> list[str]:
    talib = import_talib()
    known = [f for f in talib.get_function_groups()["Pattern Recognition"] if hasattr(talib, f)]
    if patterns in (None, "all"):
        return known
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for name in patterns:
        upper = str(name).upper()
        if not upper.startswith("CDL"):
            upper = "CDL" + upper
        if upper not in known:
            raise ValidationError(f"unknown candlestick pattern {name!r}", details={"name": name,
                                  "known_examples": known[:8]})
        out.append(upper)
    return out


def label_of(function: str, value: float) -> str:
    return ("bullish_" if value > 0 else "bearish_") + function[3:].lower()


def pattern_spans(candles: Any, symbol: str, interval: str, patterns: Any = "all") -> list[Span]:
    talib = import_talib()
    a = candle_arrays(candles)
    spans: list[Span] = []
    for function in pattern_names(patterns):
        out = np.asarray(getattr(talib, function)(a["open"], a["high"], a["low"], a["close"]))
        for i in np.flatnonzero(out != 0).tolist():
            value = float(out[i])
            spans.append(Span(symbol, interval, a["ts"][i], a["ts"][i], label_of(function, value),
                              min(1.0, abs(value) / 100.0), "programmatic"))
    spans.sort(key=lambda s: (s.start, s.label))
    return spans
