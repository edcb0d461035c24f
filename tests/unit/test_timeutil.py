"""Timestamps: the one printed form (``format_ts``) against numpy's own formatting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from sigserve.errors import ValidationError
from sigserve.timeutil import TS_DTYPE, format_ts, parse_ts, unique_ts


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


def test_a_utc_iso_string_parses_as_the_general_way_does() -> None:
    """``parse_ts`` reads ``...Z`` strings with numpy (the stream's hot path); every such string
    gives what ``datetime.fromisoformat`` gives, and what numpy cannot read exactly still goes
    the general way (a bad day is refused, an offset is applied)."""
    import random

    rng = random.Random(7)
    for _ in range(500):
        micros = rng.randrange(0, 4_102_444_800_000_000)  # 1970 .. 2100
        dt = datetime.fromtimestamp(micros / 1e6, tz=UTC).replace(microsecond=micros % 1_000_000)
        for text in (dt.strftime("%Y-%m-%dT%H:%M:%SZ"), dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                     dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"):
            expected = np.datetime64(datetime.fromisoformat(text.replace("Z", "+00:00"))
                                     .astimezone(UTC).replace(tzinfo=None), "us")
            assert parse_ts(text) == expected, text
    assert parse_ts("2024-02-29T23:59:59Z") == np.datetime64("2024-02-29T23:59:59", "us")
    assert parse_ts("2030-01-01T01:00:00+01:00") == np.datetime64("2030-01-01T00:00:00", "us")
    for bad in ("2030-02-30T00:00:00Z", "2030-13-01T00:00:00Z", "2030-01-01T25:00:00Z"):
        with pytest.raises(ValidationError):
            parse_ts(bad)
