"""Deterministic traffic routing: the same symbol on the same trading date always sees the same
model version, in every process, language and driver (HTTP, stream, backfill).

The rule (reproducible anywhere)::

    key    = f"{symbol}|{YYYY-MM-DD}"           # the bar's UTC date (the trading date)
    bucket = int.from_bytes(sha256(key)[:8], "big") / 2**64      # in [0, 1)
    challenger  iff  bucket < share

Python's ``hash()`` is salted per process, so it is never used.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..timeutil import TS_DTYPE

_DAY_US = 86_400_000_000
_SCALE = float(2**64)


def trading_date(ts: np.datetime64) -> str:
    """The UTC date of a bar's open time, ``YYYY-MM-DD``."""
    return str(np.asarray(ts, dtype=TS_DTYPE).astype("datetime64[D]"))


def bucket(symbol: str, date: str) -> float:
    """The routing bucket of (symbol, trading date) in [0, 1)."""
    digest = hashlib.sha256(f"{symbol}|{date}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def challenger_mask(symbol: str, ts: np.ndarray, share: float) -> np.ndarray:
    """For each bar of ``symbol``: does the challenger take it? One hash per distinct date."""
    ts = np.asarray(ts, dtype=TS_DTYPE)
    if share <= 0.0 or ts.size == 0:
        return np.zeros(ts.shape[0], dtype=bool)
    if share >= 1.0:
        return np.ones(ts.shape[0], dtype=bool)
    days = ts.astype("datetime64[D]")
    unique, inverse = np.unique(days, return_inverse=True)
    taken = np.array([bucket(symbol, str(d)) < share for d in unique], dtype=bool)
    return taken[inverse.reshape(-1)]


def day_number(ts: np.datetime64) -> int:
    """Days since the epoch of a bar's open time (a cheap cache key for the trading date)."""
    return int(np.asarray(ts, dtype=TS_DTYPE).astype(np.int64)) // _DAY_US
