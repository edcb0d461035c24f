"""Intervals and timestamps.

All timestamps in sigserve are UTC. Internally a bar's ts is a ``numpy.datetime64[us]`` without a
zone (DuckDB ``TIMESTAMP``), meaning UTC. Input strings with an offset are converted to UTC; a naive
string is read as UTC.

>>> parse_ts("2024-01-02T03:00:00+01:00")
np.datetime64('2024-01-02T02:00:00.000000')
>>> interval_us("1h")
3600000000
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime
from typing import Any

import numpy as np

from .errors import ValidationError

_UNIT_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000,
            "w": 7 * 86_400_000_000}
_INTERVAL_RE = re.compile(r"^([1-9][0-9]{0,3})([smhdw])$")

TS_DTYPE = np.dtype("datetime64[us]")


def unique_ts(ts: Any) -> np.ndarray:
    """``ts`` as sorted unique ``datetime64[us]``: ``np.unique`` without its first-call import
    of ``numpy.ma`` (11 ms of a server's cold start, on the one-bar path).

    >>> unique_ts(np.array(["2024-01-02", "2024-01-01", "2024-01-02"], dtype="datetime64[us]")).tolist()
    [datetime.datetime(2024, 1, 1, 0, 0), datetime.datetime(2024, 1, 2, 0, 0)]
    """
    values = np.sort(np.asarray(ts, dtype=TS_DTYPE))
    if values.size < 2:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def interval_us(interval: str) -> int:
    """Length of an interval such as ``1m``, ``5m``, ``1h``, ``1d`` in microseconds."""
    known = _INTERVALS.get(interval)
    if known is not None:
        return known
    match = _INTERVAL_RE.match(interval or "")
    if not match:
        raise ValidationError(
            f"unknown interval {interval!r}: use a count and a unit, such as 1m, 5m, 1h, 4h, 1d",
            details={"interval": interval},
        )
    value = int(match.group(1)) * _UNIT_US[match.group(2)]
    if len(_INTERVALS) < 1024:  # a stream asks for the same few on every message
        _INTERVALS[interval] = value
    return value


_INTERVALS: dict[str, int] = {}


def validate_interval(interval: str) -> str:
    interval_us(interval)
    return interval


def parse_ts(value: str | datetime | np.datetime64 | int | float, *, field: str = "ts") -> np.datetime64:
    """Parse one timestamp to UTC ``datetime64[us]``. Naive input is UTC; epoch numbers are seconds
    (or milliseconds when larger than 1e11)."""
    try:
        if isinstance(value, np.datetime64):
            return value.astype(TS_DTYPE)
        if isinstance(value, datetime):
            return _from_datetime(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = value / 1000 if abs(value) > 1e11 else value
            return np.datetime64(round(seconds * 1_000_000), "us")
        text = str(value).strip()
        if len(text) >= 20 and text[-1] == "Z" and text[4] == "-" and text[10] == "T" and "+" not in text:
            # ISO 8601 in UTC (the common case on a stream, ~1.5 us against ~20 us); numpy
            # refuses what it cannot read exactly, and then the general way below decides
            with contextlib.suppress(ValueError):
                return np.datetime64(text[:-1], "us")
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            return parse_ts(float(text), field=field)
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T", 1))
        return _from_datetime(dt)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValidationError(
            f"malformed timestamp for {field}: {value!r} (use ISO 8601, e.g. 2024-01-31T14:00:00Z)",
            details={"field": field, "value": str(value)},
        ) from exc


def _from_datetime(dt: datetime) -> np.datetime64:
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return np.datetime64(dt, "us")


def format_ts(ts: np.datetime64 | datetime) -> str:
    """ISO 8601 with a ``Z``, to the second: the one way sigserve prints a timestamp."""
    if isinstance(ts, datetime):
        ts = _from_datetime(ts)
    # datetime's own formatting is ~10x faster than np.datetime_as_string on one value, and a
    # second-to-microsecond datetime64 gives its datetime without a cast; nanoseconds (an int),
    # NaT and years datetime cannot hold take numpy's way.
    value = ts.item()
    if type(value) is datetime:
        return value.isoformat(timespec="seconds") + "Z"
    return str(np.datetime_as_string(ts.astype(TS_DTYPE), unit="s")) + "Z"


def to_datetime(ts: np.datetime64) -> datetime:
    """A timezone-aware UTC ``datetime``."""
    micros = int(ts.astype(TS_DTYPE).astype(np.int64))
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC).replace(microsecond=micros % 1_000_000)


def check_window(start: np.datetime64, end: np.datetime64) -> None:
    if end < start:
        raise ValidationError(
            f"end {format_ts(end)} is before start {format_ts(start)}",
            details={"start": format_ts(start), "end": format_ts(end)},
        )


def align_to_interval(ts: np.datetime64, interval: str) -> bool:
    """True when ts is a bar open time of this interval (epoch-aligned)."""
    return int(ts.astype(TS_DTYPE).astype(np.int64)) % interval_us(interval) == 0
