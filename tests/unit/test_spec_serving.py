"""A spec's rows in the store, and serving's refusal of rows computed by another spec.

``compute_and_store`` writes idempotently under the spec's feature_key; a model whose card records
a spec hash is served from rows of that spec only (``feature_spec_mismatch`` otherwise, also when a
signal pins another feature_key)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.demo.market import generate_ohlcv
from sigserve.domain import Policy, SignalDefinition, Stage
from sigserve.errors import FeatureSpecMismatch, ValidationError
from sigserve.features.pipeline import compute_and_store
from sigserve.features.spec import FeatureSpec
from sigserve.stores.base import Candles
from tests.fixtures.models import train_lightgbm

pytest.importorskip("talib")

SECTION = {"indicators": [{"name": "RSI", "timeperiod": 14}, {"name": "ATR", "timeperiod": 14},
                          {"name": "EMA", "timeperiod": 10}], "candles": ["body_size", "gap"]}
OTHER = {"indicators": [{"name": "RSI", "timeperiod": 14}, {"name": "ATR", "timeperiod": 14},
                        {"name": "EMA", "timeperiod": 12}], "candles": ["body_size", "gap"]}
BARS = 600


async def _load_candles(services: Services) -> dict[str, np.ndarray]:
    market = generate_ohlcv("BTCUSDT", "1h", "2024-01-01", BARS)
    await services.store.write_candles("BTCUSDT", "1h", Candles(
        market["ts"], market["open"], market["high"], market["low"], market["close"], market["volume"]))
    return market


async def test_compute_and_store_is_idempotent_and_matches_the_spec(services: Services) -> None:
    market = await _load_candles(services)
    spec = FeatureSpec.from_dict(SECTION)
    first = await compute_and_store(services.store, spec, "BTCUSDT", "1h", chunk_rows=100,
                                    home=services.settings.home)
    assert first["warmup_rows_dropped"] == spec.warmup
    assert first["rows_written"] == BARS - spec.warmup and first["chunks"] == 6
    assert first["feature_key"] == spec.feature_key
    assert Path(first["spec_file"]).is_file()
    again = await compute_and_store(services.store, spec, "BTCUSDT", "1h", home=services.settings.home)
    assert again["rows_written"] == first["rows_written"]
    read = await services.store.read_features("BTCUSDT", "1h", spec.names, feature_key=spec.feature_key)
    assert len(read.batch) == BARS - spec.warmup  # upserts: no duplicate rows
    expected = spec.compute(market).values[spec.warmup:]
    np.testing.assert_array_equal(read.batch.values, expected)
    statuses = await services.store.feature_statuses(list(spec.names))
    assert set(statuses.values()) == {"registered"} and len(statuses) == len(spec.names)
    # a window: rows from start on, seeded from the history before it
    start = market["ts"][300]
    part = await compute_and_store(services.store, spec, "BTCUSDT", "1h", start=start)
    assert part["rows_written"] == BARS - 300 and part["warmup_rows_dropped"] == 0


async def test_no_candles_is_a_validation_error(services: Services) -> None:
    with pytest.raises(ValidationError):
        await compute_and_store(services.store, FeatureSpec.from_dict(SECTION), "NOPE", "1h")


async def test_serving_refuses_rows_of_another_spec(services: Services, tmp_path: Path) -> None:
    await _load_candles(services)
    spec, other = FeatureSpec.from_dict(SECTION), FeatureSpec.from_dict(OTHER)
    assert spec.feature_key != other.feature_key
    await compute_and_store(services.store, spec, "BTCUSDT", "1h")
    model = train_lightgbm(tmp_path, "binary", n_features=len(spec.names), feature_names=spec.names)
    card = await services.registry.register(
        model, name="spec-model", classes=["down", "up"],
        extra={"feature_spec_hash": spec.spec_hash, "feature_key": spec.feature_key,
               "feature_spec": spec.to_dict()})
    await services.registry.promote(card.name, card.version, Stage.PRODUCTION)
    await services.store.create_signal(SignalDefinition(
        "spec-sig", "spec-model", "@production", "1h", ("BTCUSDT",), Policy(atr_feature="atr_14")))
    ts = (await services.store.read_candles("BTCUSDT", "1h")).ts[-1]
    row = await services.engine.predict_bar("spec-sig", "BTCUSDT", "1h", ts, write=False)
    assert row["feature_key"] == spec.feature_key

    # another spec computed later, its rows the newest: the model still reads its own spec's rows
    await compute_and_store(services.store, other, "BTCUSDT", "1h")
    row = await services.engine.predict_bar("spec-sig", "BTCUSDT", "1h", ts, write=False)
    assert row["feature_key"] == spec.feature_key
    # a bar that only the other spec covers is refused, not served and not "missing"
    later = ts + np.timedelta64(1, "h")
    await services.store.write_candles("BTCUSDT", "1h", Candles(
        np.array([later]), np.array([100.0]), np.array([101.0]), np.array([99.0]), np.array([100.5]),
        np.array([10.0])))
    await compute_and_store(services.store, other, "BTCUSDT", "1h", start=later)
    with pytest.raises(FeatureSpecMismatch) as info:
        await services.engine.predict_bar("spec-sig", "BTCUSDT", "1h", later, write=False)
    assert info.value.http_status == 409 and info.value.code == "feature_spec_mismatch"
    assert info.value.details["expected"] == spec.feature_key
    assert info.value.details["found"] == [other.feature_key]
    window = await services.engine.run_window("spec-sig", "BTCUSDT", "1h", None, None, write=False)
    assert set(window.batch.feature_keys.tolist()) == {spec.feature_key}

    # a signal pinned to another spec's key is refused before any read
    await services.store.create_signal(SignalDefinition(
        "pinned-other", "spec-model", "@production", "1h", ("BTCUSDT",), Policy(atr_feature="atr_14"),
        feature_key=other.feature_key))
    with pytest.raises(FeatureSpecMismatch):
        await services.engine.prepare("pinned-other")
    # pinned to the model's own spec: served
    await services.store.create_signal(SignalDefinition(
        "pinned-own", "spec-model", "@production", "1h", ("BTCUSDT",), Policy(atr_feature="atr_14"),
        feature_key=spec.feature_key))
    row = await services.engine.predict_bar("pinned-own", "BTCUSDT", "1h", ts, write=False)
    assert row["feature_key"] == spec.feature_key
