"""Timestamps: the one printed form (``format_ts``) against numpy's own formatting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np

from sigserve.timeutil import TS_DTYPE, format_ts, unique_ts


def test_format_ts_is_numpys_iso_form_to_the_second() -> None:
    rng = np.random.default_rng(7)
    # 1900..2200 in microseconds, with fractions of a second (and before 1970, where truncation
    # and flooring differ)
    micros = rng.integers(-2_208_988_800_000_000, 7_258_118_400_000_000, size=20_000)
    for value in micros.tolist():
        ts = np.datetime64(value, "us")
        assert format_ts(ts) == str(np.datetime_as_string(ts, unit="s")) + "Z", ts


def test_format_ts_other_units_datetimes_and_nat() -> None:
    assert format_ts(np.datetime64("2024-03-01T10:00", "m")) == "2024-03-01T10:00:00Z"
    assert format_ts(np.datetime64("1969-12-31T23:59:59.75", "ms")) == "1969-12-31T23:59:59Z"
    aware = datetime(2024, 3, 1, 12, 30, 5, 999_999, tzinfo=timezone(timedelta(hours=2)))
    assert format_ts(aware) == "2024-03-01T10:30:05Z"
    assert format_ts(datetime(2024, 3, 1, 10, 0, tzinfo=UTC)) == "2024-03-01T10:00:00Z"
    assert format_ts(np.datetime64("NaT", "us").astype(TS_DTYPE)) == "NaTZ"
    assert format_ts(np.datetime64("12000-01-01T00:00:00", "s")) == "12000-01-01T00:00:00Z"


def test_unique_ts_equals_numpy_unique() -> None:
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 5, 50):
        ts = (np.datetime64("2024-01-01", "us") + rng.integers(0, 8, size=n) * np.timedelta64(60, "s"))
        assert unique_ts(ts).tolist() == np.unique(ts).tolist()
        assert unique_ts(list(ts)).dtype == np.dtype("datetime64[us]")
