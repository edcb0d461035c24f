"""The feature spec: naming, warm-up, candle features, custom features, identity, refusals, and the
two properties serving relies on: the incremental value equals the batch value (parity) and no
feature looks ahead. All on the synthetic market's real-shaped bars (regimes, GARCH volatility,
gaps, seasonality)."""

from __future__ import annotations

import numpy as np
import pytest

from sigserve.demo.market import generate_ohlcv
from sigserve.errors import ValidationError
from sigserve.features.spec import FeatureSpec, closed_bars

pytest.importorskip("talib")

# Every TA-Lib family a user is likely to reach for: Wilder recursions, EMAs (and EMAs of EMAs),
# rolling windows, multi-output functions, volume indicators, a candlestick pattern.
SPEC = {
    "indicators": [
        {"name": "RSI", "timeperiod": 14}, {"name": "ATR", "timeperiod": 14}, "NATR", "ADX", "CCI",
        {"name": "EMA", "timeperiod": 21}, {"name": "SMA", "timeperiod": 20}, "WMA", "DEMA", "TEMA",
        "TRIX", "BBANDS", "MACD", "STOCH", "STOCHRSI", "WILLR", "MOM", "ROC", "STDDEV", "MFI",
        "CMO", "AROONOSC", "ULTOSC", "ADOSC", "PLUS_DI", "MINUS_DI", "LINEARREG_SLOPE",
        {"name": "SMA", "timeperiod": 10, "input": "volume", "column": "volume_sma_10"},
        "CDLENGULFING",
    ],
    "candles": "all",
    "custom": [{"function": "tests.unit.custom_features:close_over_max", "name": "close_over_max_5",
                "lookback": 4, "params": {"period": 5}}],
}
BARS = 3000


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return FeatureSpec.from_dict(SPEC)


@pytest.fixture(scope="module")
def market() -> dict[str, np.ndarray]:
    return generate_ohlcv("BTCUSDT", "1h", "2023-01-01", BARS)


def test_columns_are_named_by_indicator_and_parameters(spec: FeatureSpec) -> None:
    names = spec.names
    for expected in ("rsi_14", "atr_14", "natr_14", "adx_14", "ema_21", "sma_20", "bbands_20_upperband",
                     "bbands_20_lowerband", "macd_12_26_9_macd", "macd_12_26_9_macdsignal",
                     "stoch_5_3_3_slowk", "volume_sma_10", "cdlengulfing", "body_size", "gap",
                     "range", "wick_ratio", "close_over_max_5"):
        assert expected in names, (expected, names)
    bb = FeatureSpec.from_dict({"indicators": [{"name": "bbands", "timeperiod": 20, "nbdevup": 2.5}]})
    assert bb.names[0] == "bbands_20_2.5_upperband"


def test_warmup_is_the_largest_lookback_and_the_rows_before_it_are_dropped(
        spec: FeatureSpec, market: dict[str, np.ndarray]) -> None:
    frame = spec.compute(market)
    assert frame.values.shape == (BARS, len(spec.names))
    incomplete = ~np.isfinite(frame.values).all(axis=1)
    assert incomplete[: spec.warmup].all()
    assert not incomplete[spec.warmup:].any()
    complete, dropped = frame.complete()
    assert dropped == spec.warmup
    assert complete.ts[0] == market["ts"][spec.warmup]
    assert spec.window >= spec.warmup + 1


def test_parity_incremental_equals_batch_for_every_indicator(
        spec: FeatureSpec, market: dict[str, np.ndarray]) -> None:
    """For every bar: the features of the newest bar computed from the last ``window`` candles
    equal the features computed over the whole history, to 1e-9 (relative above 1)."""
    full = spec.compute(market).values
    worst = np.zeros(len(spec.names))
    checked = 0
    for i in range(BARS):
        lo = max(0, i + 1 - spec.window)
        last = spec.compute_last({k: v[lo:i + 1] for k, v in market.items()}, validate=False)
        batch = full[i]
        assert np.array_equal(np.isnan(batch), np.isnan(last)), (i, np.array(spec.names)[
            np.isnan(batch) != np.isnan(last)])
        both = np.isfinite(batch)
        diff = np.zeros(len(spec.names))
        diff[both] = np.abs(batch[both] - last[both]) / np.maximum(1.0, np.abs(batch[both]))
        worst = np.maximum(worst, diff)
        checked += int(both.sum())
    bad = {n: float(w) for n, w in zip(spec.names, worst, strict=True) if w > 1e-9}
    assert bad == {}, bad
    assert checked > 0.9 * BARS * len(spec.names)


def test_parity_holds_when_the_history_is_much_longer_than_the_window(spec: FeatureSpec) -> None:
    long = generate_ohlcv("ETHUSDT", "1h", "2022-01-01", 12_000)
    full = spec.compute(long).values
    for i in (spec.window + 5, 6_000, 11_999):
        last = spec.compute_last({k: v[i + 1 - spec.window:i + 1] for k, v in long.items()})
        np.testing.assert_allclose(last, full[i], rtol=1e-9, atol=1e-9)


def test_no_feature_looks_ahead(spec: FeatureSpec, market: dict[str, np.ndarray]) -> None:
    """Perturbing bar k (and every bar after it) changes no feature before k."""
    base = spec.compute(market).values
    rng = np.random.default_rng(3)
    for k in (spec.warmup + 3, 1500, BARS - 1):
        changed = {key: value.copy() for key, value in market.items()}
        scale = np.exp(rng.normal(0.0, 0.05, BARS - k))
        for key in ("open", "high", "low", "close"):
            changed[key][k:] *= scale
        changed["high"][k:] *= 1.01
        changed["volume"][k:] *= 3.0
        after = spec.compute(changed).values
        np.testing.assert_array_equal(after[:k], base[:k])
        assert not np.allclose(after[k], base[k], equal_nan=True)


def test_candle_features_on_a_zero_range_bar_are_finite() -> None:
    spec = FeatureSpec.from_dict({"candles": "all"})
    ts = np.array(["2024-01-01T00", "2024-01-01T01", "2024-01-01T02"], dtype="datetime64[us]")
    flat = {"ts": ts, "open": np.array([10.0, 10.0, 10.0]), "high": np.array([10.0, 10.0, 12.0]),
            "low": np.array([10.0, 10.0, 9.0]), "close": np.array([10.0, 10.0, 11.0]),
            "volume": np.array([0.0, 0.0, 1.0])}
    frame = spec.compute(flat)
    assert np.isnan(frame.column("gap")[0])
    assert np.isfinite(frame.values[1:]).all()
    row = dict(zip(spec.names, frame.values[1], strict=True))
    assert row["body_to_range"] == 0.0 and row["wick_ratio"] == 0.5 and row["range"] == 0.0
    third = dict(zip(spec.names, frame.values[2], strict=True))
    assert third["body_direction"] == 1.0
    assert third["body_size"] == pytest.approx(0.1)
    assert third["upper_wick"] == pytest.approx(0.1) and third["lower_wick"] == pytest.approx(0.1)
    assert third["body_to_range"] == pytest.approx(1 / 3) and third["wick_ratio"] == pytest.approx(0.5)
    assert third["gap"] == 0.0 and third["range"] == pytest.approx(0.3)


def test_spec_hash_names_the_computation(spec: FeatureSpec) -> None:
    again = FeatureSpec.from_dict(SPEC)
    assert again.spec_hash == spec.spec_hash and again.feature_key == spec.feature_key
    assert spec.feature_key == f"spec-{spec.spec_hash[:16]}"
    # defaults filled in: naming a default explicitly is the same computation
    a = FeatureSpec.from_dict({"indicators": [{"name": "RSI"}]})
    b = FeatureSpec.from_dict({"indicators": [{"name": "rsi", "timeperiod": 14}]})
    c = FeatureSpec.from_dict({"indicators": [{"name": "RSI", "timeperiod": 15}]})
    assert a.spec_hash == b.spec_hash != c.spec_hash
    # the card's copy rebuilds to the same spec
    rebuilt = FeatureSpec.from_card(spec.to_dict())
    assert rebuilt.names == spec.names and rebuilt.spec_hash == spec.spec_hash
    tampered = {**spec.to_dict(), "hash": "0" * 64}
    with pytest.raises(ValidationError):
        FeatureSpec.from_card(tampered)


@pytest.mark.parametrize("section, words", [
    ({"indicators": [{"name": "NOPE"}]}, "unknown TA-Lib function"),
    ({"indicators": [{"name": "RSI", "period": 3}]}, "timeperiod"),
    ({"indicators": [{"name": "OBV"}]}, "whole history"),
    ({"indicators": [{"name": "RSI"}, {"name": "RSI"}]}, "twice"),
    ({"candles": ["body", "gap"]}, "unknown candle feature"),
    ({"custom": [{"function": "no_such_module_x:f"}]}, "cannot import"),
    ({"custom": [{"function": "numpy"}]}, "package.module:function"),
    ({"volume": 1}, "unknown keys"),
    ({}, "empty"),
])
def test_bad_specs_are_refused_with_a_reason(section: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        FeatureSpec.from_dict(section)
    assert words in info.value.message


def test_closed_bars_drop_a_bar_still_forming(market: dict[str, np.ndarray]) -> None:
    last = market["ts"][-1]
    assert closed_bars(market, "1h", last + np.timedelta64(1, "h"))["ts"].shape[0] == BARS
    assert closed_bars(market, "1h", last + np.timedelta64(59, "m"))["ts"].shape[0] == BARS - 1


def test_bad_candles_are_refused() -> None:
    spec = FeatureSpec.from_dict({"candles": ["range"]})
    ts = np.array(["2024-01-01T00", "2024-01-01T01"], dtype="datetime64[us]")
    bad = {"ts": ts, "open": np.array([10.0, 10.0]), "high": np.array([9.0, 11.0]),
           "low": np.array([9.5, 9.0]), "close": np.array([10.0, 10.0]), "volume": np.array([1.0, 1.0])}
    with pytest.raises(ValidationError):
        spec.compute(bad)
    with pytest.raises(ValidationError):
        spec.compute({**bad, "high": np.array([11.0, 11.0]), "ts": ts[::-1]})


def test_one_pass_candle_features_equal_the_single_feature_functions(market: dict[str, np.ndarray]) -> None:
    from sigserve.features.candles import CANDLE_FEATURES, CANDLE_FUNCTIONS, candle_features

    a = {k: np.asarray(v, dtype=np.float64) for k, v in market.items() if k != "ts"}
    together = candle_features(a, CANDLE_FEATURES)
    for name, column in zip(CANDLE_FEATURES, together, strict=True):
        np.testing.assert_array_equal(column, CANDLE_FUNCTIONS[name](a))
    # a subset, in the spec's own order
    spec = FeatureSpec.from_dict({"candles": ["range", "gap", "body_size"]})
    assert spec.names == ("range", "gap", "body_size") and spec.warmup == 1


def test_compute_last_checks_the_newest_candle(spec: FeatureSpec, market: dict[str, np.ndarray]) -> None:
    window = {k: v[-spec.window:].copy() for k, v in market.items()}
    window["low"][-1] = window["high"][-1] * 2
    with pytest.raises(ValidationError):
        spec.compute_last(window)
    window = {k: v[-spec.window:].copy() for k, v in market.items()}
    window["ts"][-1] = window["ts"][-2]
    with pytest.raises(ValidationError):
        spec.compute_last(window)
    assert np.isnan(spec.compute_last({k: v[:0] for k, v in market.items()})).all()
