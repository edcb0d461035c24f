"""Point-in-time features: no lookahead, exact Wilder ATR/RSI, warm-up NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sigserve.demo.market import generate_ohlcv
from sigserve.errors import ValidationError
from sigserve.features.compute import (
    FEATURE_NAMES,
    WARMUP_BARS,
    compute_features,
    forward_log_return,
)

N = 600


@pytest.fixture(scope="module")
def bars() -> dict[str, np.ndarray]:
    return generate_ohlcv("BTCUSDT", "1h", start="2023-01-01", bars=N)


def col(values: np.ndarray, name: str) -> np.ndarray:
    return values[:, FEATURE_NAMES.index(name)]


def slice_bars(data: dict[str, np.ndarray], stop: int) -> dict[str, np.ndarray]:
    return {k: v[:stop].copy() for k, v in data.items()}


# Slow reference implementations, written bar by bar from the textbook definitions.

def ref_atr(h: np.ndarray, lo: np.ndarray, c: np.ndarray, period: int = 14) -> list[float]:
    out = [math.nan] * len(c)
    trs = []
    atr = math.nan
    for i in range(1, len(c)):
        tr = max(h[i] - lo[i], abs(h[i] - c[i - 1]), abs(lo[i] - c[i - 1]))
        trs.append(tr)
        if len(trs) == period:
            atr = sum(trs) / period
            out[i] = atr
        elif len(trs) > period:
            atr = (atr * (period - 1) + tr) / period
            out[i] = atr
    return out


def ref_rsi(c: np.ndarray, period: int = 14) -> list[float]:
    out = [math.nan] * len(c)
    gains: list[float] = []
    losses: list[float] = []
    avg_gain = avg_loss = math.nan
    for i in range(1, len(c)):
        change = c[i] - c[i - 1]
        gains.append(max(change, 0.0))
        losses.append(max(-change, 0.0))
        if len(gains) == period:
            avg_gain = sum(gains) / period
            avg_loss = sum(losses) / period
        elif len(gains) > period:
            avg_gain = (avg_gain * (period - 1) + gains[-1]) / period
            avg_loss = (avg_loss * (period - 1) + losses[-1]) / period
        else:
            continue
        if avg_loss == 0.0:
            out[i] = 50.0 if avg_gain == 0.0 else 100.0
        else:
            out[i] = 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)
    return out


def test_shape_names_and_warmup(bars: dict[str, np.ndarray]) -> None:
    values, names = compute_features(bars)
    assert names == FEATURE_NAMES
    assert len(names) == 13
    assert values.shape == (N, 13)
    assert values.dtype == np.float64
    assert np.all(np.isnan(values[:WARMUP_BARS]).any(axis=1))
    assert np.all(np.isfinite(values[WARMUP_BARS:]))
    # The warm-up of each column is exactly as long as its window needs.
    first_valid = {name: int(np.argmax(np.isfinite(values[:, j]))) for j, name in enumerate(names)}
    assert first_valid == {
        "ret_1": 1, "ret_4": 4, "ret_12": 12, "ret_24": 24, "vol_24": 24, "atr_14": 14,
        "rsi_14": 14, "range_pct": 0, "body_pct": 0, "vol_z_24": 23, "ma_gap_24": 23,
        "hour_sin": 0, "hour_cos": 0,
    }
    assert max(first_valid.values()) == WARMUP_BARS


def test_no_lookahead_by_truncation(bars: dict[str, np.ndarray]) -> None:
    full, _ = compute_features(bars)
    for stop in (1, 2, 13, 14, 15, 23, 24, 25, 26, 100, 377, N):
        part, _ = compute_features(slice_bars(bars, stop))
        np.testing.assert_array_equal(part, full[:stop], err_msg=f"rows < {stop}")


def test_no_lookahead_by_changing_the_future(bars: dict[str, np.ndarray]) -> None:
    full, _ = compute_features(bars)
    other = generate_ohlcv("SOMETHING_ELSE", "1h", start="2023-01-01", bars=N)
    rng = np.random.default_rng(0)
    for i in (0, 10, 24, 50, 299, N - 2):
        changed = {k: v.copy() for k, v in bars.items()}
        for key in ("open", "high", "low", "close", "volume"):
            changed[key][i + 1:] = other[key][i + 1:] * rng.uniform(0.5, 2.0)
        values, _ = compute_features(changed)
        np.testing.assert_array_equal(values[: i + 1], full[: i + 1])
        assert not np.array_equal(values[i + 1:], full[i + 1:], equal_nan=True)


def test_atr_matches_a_slow_wilder_loop(bars: dict[str, np.ndarray]) -> None:
    values, _ = compute_features(bars)
    expected = ref_atr(bars["high"], bars["low"], bars["close"])
    np.testing.assert_allclose(col(values, "atr_14"), expected, rtol=1e-12, atol=0.0)


def test_rsi_matches_a_slow_wilder_loop(bars: dict[str, np.ndarray]) -> None:
    values, _ = compute_features(bars)
    expected = ref_rsi(bars["close"])
    np.testing.assert_allclose(col(values, "rsi_14"), expected, rtol=1e-10, atol=1e-9)
    rsi = col(values, "rsi_14")[WARMUP_BARS:]
    assert np.all((rsi >= 0) & (rsi <= 100))


def test_rsi_edge_cases() -> None:
    n = 40
    ts = np.datetime64("2024-01-01T00:00", "us") + np.arange(n) * np.timedelta64(1, "h")
    flat = np.full(n, 10.0)
    rising = 10.0 + np.arange(n, dtype=np.float64)
    for close, want in ((flat, 50.0), (rising, 100.0), (rising[::-1].copy(), 0.0)):
        data = {"ts": ts, "open": close, "high": close + 0.5, "low": close - 0.5, "close": close,
                "volume": np.ones(n)}
        values, _ = compute_features(data)
        np.testing.assert_allclose(col(values, "rsi_14")[14:], want)
        # A flat volume window has a z-score of 0, not NaN.
        np.testing.assert_array_equal(col(values, "vol_z_24")[23:], 0.0)


def test_the_other_features_match_their_definitions(bars: dict[str, np.ndarray]) -> None:
    values, _ = compute_features(bars)
    o, h, lo, c, v = (bars[k] for k in ("open", "high", "low", "close", "volume"))
    r = np.log(c[1:] / c[:-1])
    for i in (24, 25, 100, N - 1):
        row = dict(zip(FEATURE_NAMES, values[i], strict=True))
        for k in (1, 4, 12, 24):
            assert row[f"ret_{k}"] == pytest.approx(math.log(c[i] / c[i - k]), rel=1e-9)
        window_r = r[i - 24:i]  # the returns of bars i-23..i
        assert row["vol_24"] == pytest.approx(float(np.std(window_r, ddof=1)), rel=1e-9)
        assert row["range_pct"] == pytest.approx((h[i] - lo[i]) / c[i])
        assert row["body_pct"] == pytest.approx((c[i] - o[i]) / o[i])
        wv = v[i - 23:i + 1]
        assert row["vol_z_24"] == pytest.approx((v[i] - wv.mean()) / wv.std(ddof=1), rel=1e-9)
        assert row["ma_gap_24"] == pytest.approx(c[i] / c[i - 23:i + 1].mean() - 1, rel=1e-9)
        hour = int(bars["ts"][i].astype(np.int64) // 3_600_000_000 % 24)
        assert row["hour_sin"] == pytest.approx(math.sin(2 * math.pi * hour / 24), abs=1e-12)
        assert row["hour_cos"] == pytest.approx(math.cos(2 * math.pi * hour / 24), abs=1e-12)


def test_short_inputs() -> None:
    for n in (0, 1, 5, 23, 24):
        data = generate_ohlcv("X", bars=max(n, 1))
        data = slice_bars(data, n)
        values, names = compute_features(data)
        assert values.shape == (n, len(names))
        assert np.all(np.isnan(values).any(axis=1))


def test_forward_log_return() -> None:
    close = np.array([1.0, 2.0, 4.0, 8.0, 4.0])
    out = forward_log_return(close, 2)
    np.testing.assert_allclose(out[:3], [math.log(4), math.log(4), 0.0])
    assert np.isnan(out[3:]).all()
    assert np.isnan(forward_log_return(close, 10)).all()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValidationError):
            forward_log_return(close, bad)  # type: ignore[arg-type]


def test_bad_input_is_a_validation_error(bars: dict[str, np.ndarray]) -> None:
    missing = {k: v for k, v in bars.items() if k != "volume"}
    with pytest.raises(ValidationError):
        compute_features(missing)
    unsorted = slice_bars(bars, 50)
    unsorted["ts"] = unsorted["ts"][::-1].copy()
    with pytest.raises(ValidationError):
        compute_features(unsorted)
    negative = slice_bars(bars, 50)
    negative["low"][3] = -1.0
    with pytest.raises(ValidationError):
        compute_features(negative)
    nan_volume = slice_bars(bars, 50)
    nan_volume["volume"][3] = np.nan
    with pytest.raises(ValidationError):
        compute_features(nan_volume)
    ragged = slice_bars(bars, 50)
    ragged["close"] = ragged["close"][:-1]
    with pytest.raises(ValidationError):
        compute_features(ragged)
