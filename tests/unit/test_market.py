"""The synthetic market of ``sigserve demo``: consistent bars, determinism, stylised facts."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest

from sigserve.demo.market import (
    BEAR,
    BULL,
    SIDEWAYS,
    default_seed,
    generate_ohlcv,
    simulate_market,
    write_csv,
)
from sigserve.errors import ValidationError
from sigserve.timeutil import interval_us

KEYS = {"ts", "open", "high", "low", "close", "volume"}


def _autocorr(x: np.ndarray, lag: int) -> float:
    return float(np.corrcoef(x[:-lag], x[lag:])[0, 1])


@pytest.mark.parametrize(("interval", "bars"), [("1h", 17520), ("5m", 5000), ("1d", 730)])
def test_bars_are_consistent(interval: str, bars: int) -> None:
    data = generate_ohlcv("BTCUSDT", interval, start="2023-01-01", bars=bars)
    assert set(data) == KEYS
    assert data["ts"].dtype == np.dtype("datetime64[us]")
    for key in KEYS - {"ts"}:
        assert data[key].dtype == np.float64
        assert data[key].shape == (bars,)
        assert np.all(np.isfinite(data[key]))
    o, h, lo, c, v = (data[k] for k in ("open", "high", "low", "close", "volume"))
    assert np.all(lo > 0) and np.all(v > 0)
    assert np.all(lo <= np.minimum(o, c))
    assert np.all(np.maximum(o, c) <= h)
    assert np.all(h > lo)

    step = interval_us(interval)
    ts_us = data["ts"].astype(np.int64)
    assert ts_us[0] == np.datetime64("2023-01-01T00:00:00", "us").astype(np.int64)
    assert np.all(np.diff(ts_us) == step)
    assert np.all(ts_us % step == 0)

    # Each bar opens at the previous close, but for rare small gaps.
    same = o[1:] == c[:-1]
    assert same.mean() > 0.95
    assert np.max(np.abs(np.log(o[1:] / c[:-1]))) < 0.05


def test_start_inside_a_bar_is_floored_and_offsets_are_utc() -> None:
    data = generate_ohlcv("X", "1h", start="2024-03-01T02:30:00+01:00", bars=3)
    assert data["ts"][0] == np.datetime64("2024-03-01T01:00:00", "us")


def test_deterministic_given_symbol_and_seed() -> None:
    a = generate_ohlcv("ETHUSDT", bars=2000)
    b = generate_ohlcv("ETHUSDT", bars=2000)
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert default_seed("ETHUSDT") == zlib.crc32(b"ETHUSDT")

    c = generate_ohlcv("ETHUSDT", bars=2000, seed=1)
    d = generate_ohlcv("ETHUSDT", bars=2000, seed=1)
    e = generate_ohlcv("SOLUSDT", bars=2000, seed=1)
    np.testing.assert_array_equal(c["close"], d["close"])
    assert not np.array_equal(a["close"], c["close"])
    assert not np.allclose(c["close"] / c["close"][0], e["close"] / e["close"][0])


@pytest.mark.parametrize("bad", [{"interval": "1x"}, {"bars": 0}, {"bars": -5},
                                 {"start": "not a date"}])
def test_bad_arguments_are_validation_errors(bad: dict[str, object]) -> None:
    args: dict[str, object] = {"symbol": "X", "interval": "1h", "start": "2023-01-01", "bars": 10}
    args.update(bad)
    with pytest.raises(ValidationError):
        generate_ohlcv(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("symbol", ["BTCUSDT", "ETHUSDT", "SOLUSDT"])
def test_volatility_clusters_and_tails_are_fat(symbol: str) -> None:
    data = generate_ohlcv(symbol)
    r = np.diff(np.log(data["close"]))
    # Volatility clustering: |r| is autocorrelated, r itself is close to white noise.
    assert _autocorr(np.abs(r), 1) > 0.1
    assert _autocorr(np.abs(r), 24) > 0.05
    assert abs(_autocorr(r, 1)) < 0.1
    kurtosis = np.mean((r - r.mean()) ** 4) / np.var(r) ** 2
    assert kurtosis > 4.0
    # Ranges scale with volatility: high-vol bars have wider ranges.
    rng_pct = (data["high"] - data["low"]) / data["close"]
    assert np.corrcoef(rng_pct[1:], np.abs(r))[0, 1] > 0.3


@pytest.mark.parametrize("symbol", ["BTCUSDT", "ETHUSDT", "SOLUSDT"])
def test_regimes_persist_and_drive_drift_and_volatility(symbol: str) -> None:
    path = simulate_market(symbol)
    regime = path.regime
    assert set(np.unique(regime)) <= {BULL, BEAR, SIDEWAYS}
    runs = int(np.count_nonzero(np.diff(regime))) + 1
    assert runs < regime.shape[0] / 100  # regimes last for days, not bars
    r = np.diff(np.log(path.ohlcv["close"]))
    reg = regime[1:]
    if np.any(reg == BULL) and np.any(reg == BEAR):
        assert r[reg == BULL].mean() > r[reg == BEAR].mean()
    if np.any(reg == BEAR) and np.any(reg == SIDEWAYS):
        assert np.median(path.sigma[regime == BEAR]) > np.median(path.sigma[regime == SIDEWAYS])


def test_intraday_volume_seasonality() -> None:
    data = generate_ohlcv("BTCUSDT")
    hour = (data["ts"].astype(np.int64) // 3_600_000_000) % 24
    v = data["volume"]
    assert v[hour == 14].mean() > 1.3 * v[hour == 22].mean()
    r = np.abs(np.diff(np.log(data["close"])))
    assert r[hour[1:] == 14].mean() > r[hour[1:] == 22].mean()


def test_three_symbols_of_two_years_are_fast() -> None:
    generate_ohlcv("WARMUP", bars=100)
    t0 = time.perf_counter()
    for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):
        generate_ohlcv(symbol, "1h", bars=17520)
    assert time.perf_counter() - t0 < 1.0


def test_write_csv_round_trips(tmp_path: Path) -> None:
    data = generate_ohlcv("BTCUSDT", bars=500)
    out = write_csv(tmp_path / "sub" / "btc.csv", data)
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == "ts,open,high,low,close,volume"
    assert len(lines) == 501
    assert lines[1].startswith("2023-01-01T00:00:00Z,")
    table = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(
        column_types={"ts": "string"}))
    assert table.column_names == ["ts", "open", "high", "low", "close", "volume"]
    ts = np.array([np.datetime64(s[:-1], "us") for s in table.column("ts").to_pylist()])
    np.testing.assert_array_equal(ts, data["ts"])
    for key in ("open", "high", "low", "close", "volume"):
        np.testing.assert_array_equal(table.column(key).to_numpy(), data[key])


def test_write_csv_needs_every_column(tmp_path: Path) -> None:
    data = generate_ohlcv("BTCUSDT", bars=5)
    del data["volume"]
    with pytest.raises(ValidationError):
        write_csv(tmp_path / "x.csv", data)
