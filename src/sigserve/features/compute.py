"""Point-in-time bar features from OHLCV arrays.

Row ``i`` of the result uses bars ``0..i`` only: no lookahead, so the same code serves training,
backfill and live bars. Everything is vectorised numpy except Wilder's smoothing (ATR, RSI), an
exact recursion run as one tight loop over Python floats.

========== =====================================================================================
name       definition (``c`` close, ``o`` open, ``h`` high, ``l`` low, ``v`` volume,
           ``r`` the 1-bar log return)
========== =====================================================================================
ret_k      ``log(c[i] / c[i-k])`` for k in 1, 4, 12, 24
vol_24     sample std (ddof=1) of ``r[i-23..i]``
atr_14     Wilder ATR in price units; true range needs the previous close, so TR starts at bar 1;
           the first ATR (bar 14) is the mean of TR[1..14], then ``atr += (tr - atr) / 14``
rsi_14     Wilder RSI, 0..100, seeded like ATR from the changes of bars 1..14; 50 when flat
range_pct  ``(h - l) / c``
body_pct   ``(c - o) / o``
vol_z_24   ``(v[i] - mean(v[i-23..i])) / std(v[i-23..i])`` (ddof=1); 0 when the window is flat
ma_gap_24  ``c[i] / mean(c[i-23..i]) - 1``
hour_sin   ``sin(2 pi hour / 24)`` and ``cos``, with ``hour`` the bar's open time of day, UTC,
hour_cos   in fractional hours
========== =====================================================================================

Rows before :data:`WARMUP_BARS` hold NaN in at least one column; every later row is finite when
the inputs are. Wilder features depend on where the history starts (their seed), with a memory of
``(13/14)**k``: after a few hundred bars the start no longer matters to float precision.

Usage::

    values, names = compute_features(ohlcv)        # ohlcv: dict of ts/open/high/low/close/volume
    labels = forward_log_return(ohlcv["close"], 4)
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ValidationError
from ..timeutil import TS_DTYPE

FEATURE_NAMES: tuple[str, ...] = (
    "ret_1",
    "ret_4",
    "ret_12",
    "ret_24",
    "vol_24",
    "atr_14",
    "rsi_14",
    "range_pct",
    "body_pct",
    "vol_z_24",
    "ma_gap_24",
    "hour_sin",
    "hour_cos",
)

ATR_PERIOD = 14
RSI_PERIOD = 14
WINDOW = 24
WARMUP_BARS = 24
"""Rows ``0 .. WARMUP_BARS - 1`` have a NaN somewhere; rows from ``WARMUP_BARS`` on are complete."""

_DAY_US = 86_400_000_000
_HOUR_US = 3_600_000_000


def compute_features(ohlcv: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Features of one symbol's bars, in ts order: a float64 matrix ``(n, 13)`` and its names.

    ``ohlcv`` holds equal-length 1-D arrays ``ts`` (datetime64), ``open``, ``high``, ``low``,
    ``close`` and ``volume``. Prices must be finite and > 0, volume finite and >= 0, and ts
    strictly increasing; otherwise :class:`~sigserve.errors.ValidationError`.
    """
    ts_us, o, h, lo, c, v = _validated(ohlcv)
    n = c.shape[0]
    out = np.full((n, len(FEATURE_NAMES)), np.nan, dtype=np.float64)
    if n == 0:
        return out, FEATURE_NAMES

    log_c = np.log(c)
    r1 = np.full(n, np.nan)
    r1[1:] = np.diff(log_c)

    col = 0
    for k in (1, 4, 12, 24):
        if n > k:
            out[k:, col] = log_c[k:] - log_c[:-k]
        col += 1

    # vol_24: the window r1[i-23..i] needs i-23 >= 1.
    if n > WINDOW:
        out[WINDOW:, col] = np.std(sliding_window_view(r1[1:], WINDOW), axis=1, ddof=1)
    col += 1

    # ATR: true range from bar 1 on.
    if n > 1:
        prev_c = c[:-1]
        tr = np.maximum(h[1:] - lo[1:], np.maximum(np.abs(h[1:] - prev_c), np.abs(lo[1:] - prev_c)))
        out[1:, col] = _wilder(tr, ATR_PERIOD)
    col += 1

    # RSI from close-to-close changes, bar 1 on.
    if n > 1:
        delta = np.diff(c)
        avg_gain = _wilder(np.maximum(delta, 0.0), RSI_PERIOD)
        avg_loss = _wilder(np.maximum(-delta, 0.0), RSI_PERIOD)
        total = avg_gain + avg_loss
        with np.errstate(invalid="ignore", divide="ignore"):
            rsi = np.where(total > 0.0, 100.0 * avg_gain / total, 50.0)
        rsi[np.isnan(total)] = np.nan
        out[1:, col] = rsi
    col += 1

    out[:, col] = (h - lo) / c
    col += 1
    out[:, col] = (c - o) / o
    col += 1

    if n >= WINDOW:
        win = sliding_window_view(v, WINDOW)
        mean = win.mean(axis=1)
        std = win.std(axis=1, ddof=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(std > 0.0, (v[WINDOW - 1:] - mean) / std, 0.0)
        out[WINDOW - 1:, col] = z
        col += 1
        out[WINDOW - 1:, col] = c[WINDOW - 1:] / sliding_window_view(c, WINDOW).mean(axis=1) - 1.0
        col += 1
    else:
        col += 2

    angle = (ts_us % _DAY_US) / _HOUR_US * (2.0 * np.pi / 24.0)
    out[:, col] = np.sin(angle)
    out[:, col + 1] = np.cos(angle)
    return out, FEATURE_NAMES


def forward_log_return(close: np.ndarray, horizon: int) -> np.ndarray:
    """``log(close[i + horizon] / close[i])``, NaN for the last ``horizon`` rows (a label, not a
    feature: it looks ahead by design)."""
    if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or horizon < 1:
        raise ValidationError(f"horizon must be a positive integer, got {horizon!r}",
                              details={"horizon": repr(horizon)})
    c = np.asarray(close, dtype=np.float64)
    out = np.full(c.shape[0], np.nan)
    if c.shape[0] > horizon:
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:-horizon] = np.log(c[horizon:] / c[:-horizon])
    return out


def _wilder(x: np.ndarray, period: int) -> np.ndarray:
    """Wilder's smoothing of ``x``: NaN for the first ``period - 1`` values, then the mean of the
    first ``period`` values, then ``s += (x - s) / period``. Exact, a recursion over floats."""
    n = x.shape[0]
    out = np.full(n, np.nan)
    if n < period:
        return out
    values = x.tolist()
    s = float(np.mean(x[:period]))
    res = [s] * (n - period + 1)
    inv = 1.0 / period
    keep = 1.0 - inv
    for j, value in enumerate(values[period:], start=1):
        s = s * keep + value * inv
        res[j] = s
    out[period - 1:] = res
    return out


def _validated(
    ohlcv: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    missing = [k for k in ("ts", "open", "high", "low", "close", "volume") if k not in ohlcv]
    if missing:
        raise ValidationError(f"OHLCV data lacks the columns {missing}",
                              details={"missing": missing})
    ts = np.asarray(ohlcv["ts"])
    if not np.issubdtype(ts.dtype, np.datetime64):
        raise ValidationError(f"ts must be datetime64, got {ts.dtype}",
                              details={"dtype": str(ts.dtype)})
    ts_us = ts.astype(TS_DTYPE).astype(np.int64)
    cols = [np.asarray(ohlcv[k], dtype=np.float64)
            for k in ("open", "high", "low", "close", "volume")]
    n = ts_us.shape[0]
    if ts_us.ndim != 1 or any(a.ndim != 1 or a.shape[0] != n for a in cols):
        raise ValidationError("OHLCV columns must be 1-D arrays of one length",
                              details={"lengths": [int(np.size(a)) for a in (ts, *cols)]})
    prices = np.stack(cols[:4]) if n else np.empty((4, 0))
    if not (np.all(np.isfinite(prices)) and np.all(prices > 0.0)):
        raise ValidationError("OHLCV prices must be finite and > 0", details={})
    if not (np.all(np.isfinite(cols[4])) and np.all(cols[4] >= 0.0)):
        raise ValidationError("OHLCV volume must be finite and >= 0", details={})
    if n > 1 and not np.all(np.diff(ts_us) > 0):
        raise ValidationError("ts must be strictly increasing (one symbol, in time order)",
                              details={})
    return ts_us, cols[0], cols[1], cols[2], cols[3], cols[4]
