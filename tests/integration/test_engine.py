"""The engine and the backfill driver end to end on the embedded store, with real models trained on
real point-in-time features of a synthetic market.

- parity: one bar through ``predict_bar`` equals its backfill row bit for bit, for every flavor;
- no lookahead: rewriting every candle after ts leaves the signal at ts as it was;
- refusals carry the error codes of DESIGN.md;
- backfill modes (window, last, ts-list) are idempotent, chunking changes nothing, position-aware
  closes follow ``resolve_positions``, and bars without features are counted, not invented.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.backfill import BackfillReport, BackfillRequest, run_backfill
from sigserve.domain import (
    ACTION_CODE,
    ACTIONS,
    BUY,
    CLOSE_LONG,
    CLOSE_SHORT,
    FLAT,
    SELL,
    Policy,
    SignalDefinition,
    Stage,
)
from sigserve.errors import SigserveError
from sigserve.features.compute import FEATURE_NAMES, WARMUP_BARS, compute_features
from sigserve.signals.policy import resolve_positions
from sigserve.stores.base import Candles
from sigserve.timeutil import TS_DTYPE

INTERVAL = "1h"
BTC, ETH = "BTCUSDT", "ETHUSDT"
SYMBOLS = (BTC, ETH)
BARS = 1500
KEY = "fk-v1"
HOUR = np.timedelta64(1, "h")
VOLATILE = ("latency_ms", "created_at")  # the only columns a rerun may change
COMPARED = ("action", "confidence", "raw_output", "entry_price", "stop_loss", "take_profit",
            "recommended_size", "model_name", "model_version", "model_sha256", "feature_key",
            "flags", "symbol", "interval")


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Market:
    ohlcv: dict[str, np.ndarray]
    features: np.ndarray

    @property
    def ts(self) -> np.ndarray:
        return self.ohlcv["ts"]


@functools.cache
def market(symbol: str) -> Market:
    from sigserve.demo.market import generate_ohlcv

    ohlcv = generate_ohlcv(symbol, INTERVAL, "2024-01-01", BARS)
    values, names = compute_features(ohlcv)
    assert names == FEATURE_NAMES
    return Market(ohlcv, values)


def complete_rows(n: int = BARS) -> np.ndarray:
    return np.arange(WARMUP_BARS, n)


async def import_market(services: Services, symbol: str, data: Market,
                        rows: np.ndarray | None = None, key: str = KEY) -> None:
    """Candles for every bar; feature rows for ``rows`` (default: every complete row)."""
    o = data.ohlcv
    await services.store.write_candles(symbol, INTERVAL, Candles(
        o["ts"], o["open"], o["high"], o["low"], o["close"], o["volume"]))
    await services.store.register_features(list(FEATURE_NAMES))
    idx = complete_rows(len(data.ts)) if rows is None else rows
    await services.store.write_features(INTERVAL, key, FEATURE_NAMES,
                                        np.full(idx.size, symbol, dtype=object), data.ts[idx],
                                        data.features[idx])


# --- models ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    path: Path
    policy: Policy
    register: dict[str, Any]


def training_set() -> tuple[np.ndarray, np.ndarray]:
    """Every complete feature row of both symbols, and a target the features can explain."""
    x = np.vstack([market(s).features[WARMUP_BARS:] for s in SYMBOLS])
    target = x[:, 0] + 0.5 * x[:, 1]  # ret_1 + ret_4 / 2
    return x, target


LGB_PARAMS: dict[str, Any] = {"num_leaves": 7, "learning_rate": 0.1, "min_data_in_leaf": 20,
                              "num_threads": 1, "seed": 7, "deterministic": True,
                              "force_row_wise": True, "verbose": -1}
XGB_NAMES = tuple(n for n in FEATURE_NAMES if n != "atr_14")  # ATR read as an extra column


def _lightgbm(directory: Path, task: str) -> Trained:
    import lightgbm

    x, target = training_set()
    params = dict(LGB_PARAMS)
    register: dict[str, Any] = {}
    policy = Policy(threshold=0.55)
    if task == "binary":
        y = (target > 0).astype(np.int64)
        params["objective"] = "binary"
    elif task == "multiclass":
        edge = 0.3 * float(np.std(target))
        y = np.digitize(target, [-edge, edge]).astype(np.int64)
        params.update(objective="multiclass", num_class=3)
        register["classes"] = ["down", "flat", "up"]
        policy = Policy(threshold=0.45)
    else:
        y = target
        params["objective"] = "regression"
        policy = Policy(threshold=0.25 * float(np.std(target)))
    booster = lightgbm.train(params, lightgbm.Dataset(x, y, feature_name=list(FEATURE_NAMES)),
                             num_boost_round=15)
    path = directory / f"lightgbm_{task}.txt"
    booster.save_model(str(path))
    return Trained(path, policy, register)


def _xgboost(directory: Path) -> Trained:
    import xgboost

    x, target = training_set()
    columns = [FEATURE_NAMES.index(n) for n in XGB_NAMES]
    data = xgboost.DMatrix(x[:, columns], label=(target > 0).astype(np.int64),
                           feature_names=list(XGB_NAMES))
    booster = xgboost.train({"objective": "binary:logistic", "max_depth": 3, "eta": 0.3,
                             "nthread": 1, "seed": 7}, data, num_boost_round=15)
    path = directory / "xgboost_binary.json"
    booster.save_model(str(path))
    return Trained(path, Policy(threshold=0.7, atr_feature="atr_14"), {})


def _sklearn(directory: Path) -> Trained:
    import pandas as pd
    import skops.io
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, target = training_set()
    model = HistGradientBoostingClassifier(max_iter=15, max_leaf_nodes=7, random_state=0,
                                           early_stopping=False)
    model.fit(pd.DataFrame(x, columns=list(FEATURE_NAMES)), (target > 0).astype(np.int64))
    path = directory / "sklearn_binary.skops"
    skops.io.dump(model, path)
    return Trained(path, Policy(threshold=0.55), {})


def _onnx(directory: Path) -> Trained:
    import lightgbm
    import onnx
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    x, target = training_set()
    estimator = lightgbm.LGBMClassifier(n_estimators=15, num_leaves=7, min_child_samples=20,
                                        n_jobs=1, random_state=0, deterministic=True,
                                        force_row_wise=True, verbose=-1)
    estimator.fit(x, (target > 0).astype(np.int64))
    model = onnxmltools.convert_lightgbm(
        estimator, initial_types=[("input", FloatTensorType([None, len(FEATURE_NAMES)]))],
        zipmap=False)
    onnx.helper.set_model_props(model, {"feature_names": ",".join(FEATURE_NAMES)})
    path = directory / "onnx_binary.onnx"
    onnx.save(model, str(path))
    return Trained(path, Policy(threshold=0.55), {})


TRAINERS: dict[str, Callable[[Path], Trained]] = {
    "lightgbm": lambda d: _lightgbm(d, "binary"),
    "lightgbm-multiclass": lambda d: _lightgbm(d, "multiclass"),
    "lightgbm-regression": lambda d: _lightgbm(d, "regression"),
    "xgboost": _xgboost,
    "sklearn": _sklearn,
    "onnx": _onnx,
}

ModelFactory = Callable[[str], Trained]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    """Each kind trained once per module, on first use."""
    directory = tmp_path_factory.mktemp("engine-models")
    cache: dict[str, Trained] = {}

    def get(kind: str) -> Trained:
        if kind not in cache:
            cache[kind] = TRAINERS[kind](directory)
        return cache[kind]

    return get


async def add_signal(services: Services, models: ModelFactory, kind: str = "lightgbm", *,
                     signal_id: str = "sig", symbols: tuple[str, ...] = SYMBOLS,
                     policy: Policy | None = None, model_ref: str | None = None,
                     name: str | None = None, feature_key: str | None = None) -> SignalDefinition:
    trained = models(kind)
    name = name or kind
    existing = await services.store.list_models(name)
    if existing:
        card = existing[-1]
    else:
        card = await services.registry.register(trained.path, name=name, **trained.register)
    definition = SignalDefinition(signal_id, card.name, model_ref or str(card.version), INTERVAL,
                                  symbols, policy or trained.policy, feature_key=feature_key)
    await services.store.create_signal(definition)
    return definition


async def backfill(services: Services, signal_id: str = "sig", symbol: str = BTC,
                   mode: str = "window", start: np.datetime64 | None = None,
                   end: np.datetime64 | None = None, ts: tuple[np.datetime64, ...] = (), *,
                   interval: str = INTERVAL, max_rows: int = 1_000_000,
                   chunk_rows: int = 100_000) -> BackfillReport:
    if mode == "window" and start is None and end is None:
        start, end = market(symbol).ts[0], market(symbol).ts[-1]
    request = BackfillRequest(signal_id, symbol, interval, mode, start, end, ts)
    return await run_backfill(services.engine, request, max_rows=max_rows, chunk_rows=chunk_rows)


async def history(services: Services, signal_id: str = "sig",
                  symbol: str | None = BTC) -> list[dict[str, Any]]:
    return await services.store.read_signals(signal_id, symbol, INTERVAL)


def stable(rows: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in VOLATILE + drop} for row in rows]


def ts_of(row: dict[str, Any]) -> np.datetime64:
    return np.datetime64(row["ts"], "us")


def action_codes(rows: list[dict[str, Any]]) -> np.ndarray:
    return np.array([ACTION_CODE[r["action"]] for r in rows], dtype=np.int8)


async def refused(awaitable: Any) -> SigserveError:
    with pytest.raises(SigserveError) as err:
        await awaitable
    return err.value


# --- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TRAINERS))
async def test_predict_bar_equals_the_backfill_row_bit_for_bit(
    services: Services, models: ModelFactory, kind: str,
) -> None:
    data = market(BTC)
    await import_market(services, BTC, data)
    await add_signal(services, models, kind)
    report = await backfill(services)
    rows = await history(services)
    assert report.rows_written == len(rows) == BARS - WARMUP_BARS
    counts = {a: sum(r["action"] == a for r in rows) for a in ACTIONS}
    assert counts["buy"] > 20 and counts["sell"] > 20 and counts["hold"] > 5, counts
    assert counts["close_long"] + counts["close_short"] > 10, counts

    # every kind of row: first and last bar, each action, and some at random
    rng = np.random.default_rng(3)
    picks = {0, len(rows) - 1, *rng.choice(len(rows), size=6, replace=False).tolist()}
    for action in ACTIONS:
        picks.update([i for i, r in enumerate(rows) if r["action"] == action][:2])
    levelled = 0
    for i in sorted(picks):
        stored = rows[i]
        got = await services.engine.predict_bar("sig", BTC, INTERVAL, ts_of(stored), write=False)
        assert np.datetime64(got["ts"].rstrip("Z"), "us") == ts_of(stored)
        for field in COMPARED:
            assert got[field] == stored[field], (kind, field, got[field], stored[field])
        assert got["source"] == "historical_replay"
        levelled += got["stop_loss"] is not None
    assert levelled >= 4  # levels and sizes were compared, not just Nones

    # the history did not change: predict_bar(write=False) writes nothing
    assert stable(await history(services)) == stable(rows)


async def test_predict_bar_writes_the_same_row_the_backfill_wrote(
    services: Services, models: ModelFactory,
) -> None:
    await import_market(services, BTC, market(BTC))
    await add_signal(services, models)
    await backfill(services)
    rows = await history(services)
    for i in (100, 700, len(rows) - 1):
        await services.engine.predict_bar("sig", BTC, INTERVAL, ts_of(rows[i]), source="stream")
    again = await history(services)
    assert len(again) == len(rows)  # upserts, no duplicates
    assert stable(again, ("source",)) == stable(rows, ("source",))
    assert [r["source"] for r in again].count("stream") == 3


async def parity(services: Services, signal_id: str, indices: list[int]) -> list[dict[str, Any]]:
    """predict_bar at the stored rows ``indices``: every compared field equal; the rows."""
    rows = await history(services, signal_id)
    for i in indices:
        got = await services.engine.predict_bar(signal_id, BTC, INTERVAL, ts_of(rows[i]),
                                                write=False)
        for field in COMPARED:
            assert got[field] == rows[i][field], (signal_id, i, field)
    return rows


async def test_feature_keys_newest_wins_unless_pinned(services: Services,
                                                      models: ModelFactory) -> None:
    data = market(BTC)
    await import_market(services, BTC, data)
    # a second computation of some bars, with other values (ret_1 flipped): written later, newer
    recomputed = data.features.copy()
    recomputed[:, 0] *= -1.0
    subset = np.arange(500, 900)
    await import_market(services, BTC, Market(data.ohlcv, recomputed), rows=subset, key="fk-v2")
    await add_signal(services, models, signal_id="newest")
    await add_signal(services, models, signal_id="pinned", feature_key=KEY)
    await add_signal(services, models, signal_id="pinned2", feature_key="fk-v2")
    for signal_id in ("newest", "pinned", "pinned2"):
        await backfill(services, signal_id)

    offset = WARMUP_BARS
    picks = [0, 500 - offset - 1, 500 - offset, 700 - offset, 899 - offset, 900 - offset,
             BARS - offset - 1]
    newest = await parity(services, "newest", picks)
    pinned = await parity(services, "pinned", picks)
    keys = [r["feature_key"] for r in newest]
    assert keys == [("fk-v2" if 500 <= i < 900 else KEY) for i in range(offset, BARS)]
    assert {r["feature_key"] for r in pinned} == {KEY}
    inside = [i - offset for i in range(500, 900)]
    assert sum(newest[i]["raw_output"] != pinned[i]["raw_output"] for i in inside) > 100
    outside = [i for i in range(len(newest)) if i not in set(inside)]
    assert all(newest[i]["raw_output"] == pinned[i]["raw_output"] for i in outside)

    only_v2 = await parity(services, "pinned2", [0, 200, 399])
    assert [ts_of(r) for r in only_v2] == list(data.ts[subset])
    assert all(r["raw_output"] == newest[i - offset]["raw_output"]
               for r, i in zip(only_v2, subset.tolist(), strict=True))
    err = await refused(services.engine.predict_bar("pinned2", BTC, INTERVAL, bar(300)))
    assert err.code == "feature_value_missing"


async def test_invalid_levels_are_flagged_not_sent(services: Services,
                                                   models: ModelFactory) -> None:
    data = market(BTC)
    broken = data.features.copy()
    atr = FEATURE_NAMES.index("atr_14")
    broken[300:340, atr] = np.nan
    broken[340:380, atr] = 0.0
    broken[380:420, atr] = -1.0
    await import_market(services, BTC, Market(data.ohlcv, broken))
    await add_signal(services, models)
    await backfill(services)
    rows = await history(services)
    bad = set(range(300 - WARMUP_BARS, 420 - WARMUP_BARS))
    flagged = []
    for i, row in enumerate(rows):
        entering = row["action"] in ("buy", "sell")
        if entering and i in bad:
            assert row["flags"] == "levels_invalid"
            assert row["entry_price"] is row["stop_loss"] is row["take_profit"] is None
            assert row["recommended_size"] is None
            flagged.append(i)
        else:
            assert row["flags"] == ""
            assert (row["entry_price"] is not None) == entering
    assert len(flagged) > 20
    await parity(services, "sig", [*flagged[:3], flagged[-1]])


# --- no lookahead ---------------------------------------------------------------------------------


async def test_changing_the_future_does_not_change_the_past(
    services: Services, models: ModelFactory,
) -> None:
    data = market(BTC)
    cut = 800
    t0 = data.ts[cut]
    await import_market(services, BTC, data)
    await add_signal(services, models)
    await backfill(services)
    rows_before = await history(services)
    before = await services.engine.predict_bar("sig", BTC, INTERVAL, t0, write=False)

    # Rewrite every bar after t0: a random walk on the price level (the same factor for a bar's
    # open, high, low and close keeps each bar consistent) and noise on the volume.
    rng = np.random.default_rng(11)
    later = np.arange(cut + 1, BARS)
    factor = np.exp(np.cumsum(rng.normal(0.0, 0.01, size=later.size)))
    ohlcv = {k: v.copy() for k, v in data.ohlcv.items()}
    for column in ("open", "high", "low", "close"):
        ohlcv[column][later] *= factor
    ohlcv["volume"][later] *= rng.uniform(0.3, 3.0, size=later.size)
    values, _ = compute_features(ohlcv)
    # the features themselves are point-in-time ...
    np.testing.assert_array_equal(values[: cut + 1], data.features[: cut + 1])
    assert not np.array_equal(values[cut + 1 :], data.features[cut + 1 :], equal_nan=True)
    perturbed = Market(ohlcv, values)
    await import_market(services, BTC, perturbed)

    # ... and so is every signal up to t0, including its levels and position-aware action
    after = await services.engine.predict_bar("sig", BTC, INTERVAL, t0, write=False)
    for field in COMPARED:
        assert after[field] == before[field], field
    await backfill(services)
    rows_after = await history(services)
    assert len(rows_after) == len(rows_before)
    upto = [i for i, r in enumerate(rows_before) if ts_of(r) <= t0]
    assert len(upto) == cut + 1 - WARMUP_BARS
    assert stable([rows_after[i] for i in upto]) == stable([rows_before[i] for i in upto])
    # the perturbation took effect after t0
    changed = [i for i in range(len(upto), len(rows_before))
               if rows_after[i]["raw_output"] != rows_before[i]["raw_output"]]
    assert len(changed) > 100
    entries = [i for i in range(len(upto), len(rows_before))
               if rows_after[i]["entry_price"] is not None
               and rows_before[i]["entry_price"] is not None]
    assert entries
    assert all(rows_after[i]["entry_price"] != rows_before[i]["entry_price"] for i in entries)


# --- refusals ----------------------------------------------------------------------------------------


@pytest.fixture
async def ready(services: Services, models: ModelFactory) -> Services:
    """BTC imported, a LightGBM version pinned by a signal ``sig`` on BTC and ETH."""
    await import_market(services, BTC, market(BTC))
    await add_signal(services, models)
    return services


def bar(i: int) -> np.datetime64:
    return market(BTC).ts[i]


async def test_refuses_unknown_and_retired_signals(ready: Services) -> None:
    engine = ready.engine
    err = await refused(engine.predict_bar("absent", BTC, INTERVAL, bar(100)))
    assert (err.code, err.http_status, err.details) == ("signal_not_found", 404,
                                                        {"signal_id": "absent"})
    assert (await refused(backfill(ready, "absent"))).code == "signal_not_found"

    await ready.store.set_signal_status("sig", "retired")
    err = await refused(engine.predict_bar("sig", BTC, INTERVAL, bar(100)))
    assert (err.code, err.http_status) == ("signal_retired", 409)
    assert (await refused(backfill(ready))).code == "signal_retired"
    assert await history(ready) == []


@pytest.mark.parametrize("end", ["retire", "reject"])
async def test_refuses_a_retired_or_rejected_model(ready: Services, end: str) -> None:
    assert (await ready.engine.predict_bar("sig", BTC, INTERVAL, bar(100)))["action"]
    await getattr(ready.registry, end)("lightgbm", 1)
    err = await refused(ready.engine.predict_bar("sig", BTC, INTERVAL, bar(101)))
    assert (err.code, err.http_status) == ("model_lifecycle_refused", 409)
    assert (await refused(backfill(ready))).code == "model_lifecycle_refused"
    assert len(await history(ready)) == 1  # only the bar served before


async def test_production_alias_follows_promotion(services: Services, models: ModelFactory) -> None:
    await import_market(services, BTC, market(BTC))
    await add_signal(services, models, model_ref="@production")
    err = await refused(services.engine.predict_bar("sig", BTC, INTERVAL, bar(100)))
    assert err.code == "model_not_found"  # nothing holds @production yet
    await services.registry.promote("lightgbm", 1, Stage.PRODUCTION)
    assert (await services.engine.predict_bar("sig", BTC, INTERVAL, bar(100)))["model_version"] == 1
    v2 = await services.registry.register(models("lightgbm").path, name="lightgbm")
    await services.registry.promote("lightgbm", v2.version, Stage.PRODUCTION)
    row = await services.engine.predict_bar("sig", BTC, INTERVAL, bar(100))
    assert row["model_version"] == 2
    await services.registry.retire("lightgbm", 2)
    err = await refused(services.engine.predict_bar("sig", BTC, INTERVAL, bar(100)))
    assert err.code == "model_lifecycle_refused"  # @production's last holder is retired
    assert err.details["version"] == 2


async def test_refuses_a_missing_artifact(ready: Services) -> None:
    card = await ready.registry.get("lightgbm", 1)
    (ready.settings.home / str(card.artifact_path)).unlink()
    ready.registry.forget()
    err = await refused(ready.engine.predict_bar("sig", BTC, INTERVAL, bar(100)))
    assert (err.code, err.http_status) == ("model_artifact_missing", 409)
    assert (await refused(backfill(ready))).code == "model_artifact_missing"


async def test_refuses_a_corrupt_artifact_without_loading_it(
    ready: Services, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sigserve.runtimes

    calls: list[str] = []

    def never(card: Any, path: Path, **kwargs: Any) -> Any:
        calls.append(str(path))
        raise AssertionError("a corrupt artifact reached the deserialiser")

    monkeypatch.setattr(sigserve.runtimes, "load_runtime", never)
    card = await ready.registry.get("lightgbm", 1)
    stored = ready.settings.home / str(card.artifact_path)
    data = bytearray(stored.read_bytes())
    data[len(data) // 3] ^= 0x20
    stored.write_bytes(bytes(data))
    ready.registry.forget()
    err = await refused(ready.engine.predict_bar("sig", BTC, INTERVAL, bar(100)))
    assert (err.code, err.http_status) == ("artifact_corrupt", 502)
    assert (await refused(backfill(ready))).code == "artifact_corrupt"
    assert calls == []
    assert await history(ready) == []


async def test_refuses_a_deprecated_feature(ready: Services) -> None:
    await ready.store.set_feature_status("rsi_14", "deprecated")
    err = await refused(ready.engine.predict_bar("sig", BTC, INTERVAL, bar(100)))
    assert (err.code, err.http_status) == ("feature_not_registered", 409)
    assert err.details["features"] == {"rsi_14": "deprecated"}
    assert (await refused(backfill(ready))).code == "feature_not_registered"
    await ready.store.set_feature_status("rsi_14", "registered")
    assert (await ready.engine.predict_bar("sig", BTC, INTERVAL, bar(100)))["action"]


async def test_refuses_a_bar_without_features(ready: Services) -> None:
    for ts in (bar(0), bar(WARMUP_BARS - 1), bar(BARS - 1) + 5 * HOUR):
        err = await refused(ready.engine.predict_bar("sig", BTC, INTERVAL, ts))
        assert (err.code, err.http_status) == ("feature_value_missing", 409)
    # a symbol the signal covers but that has no data at all
    err = await refused(ready.engine.predict_bar("sig", ETH, INTERVAL, bar(100)))
    assert err.code == "feature_value_missing"
    assert await history(ready) == []


async def test_refuses_a_window_over_the_limit(ready: Services) -> None:
    err = await refused(backfill(ready, max_rows=100))
    assert (err.code, err.http_status) == ("backfill_window_too_large", 413)
    assert err.details == {"rows": BARS - WARMUP_BARS, "max_rows": 100}
    err = await refused(backfill(ready, mode="last", max_rows=100))
    assert err.code == "backfill_window_too_large"
    listed = tuple(bar(i) for i in range(100, 110))
    err = await refused(backfill(ready, mode="ts-list", ts=listed, max_rows=5))
    assert err.code == "backfill_window_too_large"
    assert await history(ready) == []
    # at the limit it runs
    report = await backfill(ready, start=bar(100), end=bar(199), max_rows=100)
    assert report.rows_written == 100


async def test_refuses_bad_targets_and_windows(ready: Services) -> None:
    engine = ready.engine
    cases: list[Any] = [
        backfill(ready, start=bar(500), end=bar(400)),  # end before start
        backfill(ready, interval="4h"),  # not the signal's interval
        backfill(ready, interval="1x"),  # not an interval
        backfill(ready, symbol="SOLUSDT", start=bar(100), end=bar(200)),  # not covered
        backfill(ready, mode="everything", start=bar(100), end=bar(200)),
        backfill(ready, start=bar(100)),  # window mode needs an end
        backfill(ready, mode="ts-list"),  # and ts-list some ts
        engine.predict_bar("sig", BTC, "4h", bar(100)),
        engine.predict_bar("sig", "SOLUSDT", INTERVAL, bar(100)),
        engine.run_window("sig", BTC, "15m", bar(100), bar(200)),
    ]
    for case in cases:
        err = await refused(case)
        assert (err.code, err.http_status) == ("validation_error", 422), err
    assert await history(ready, symbol=None) == []


# --- backfill: idempotency and modes -------------------------------------------------------------


async def test_backfill_twice_gives_the_same_rows(ready: Services) -> None:
    first = await backfill(ready)
    rows = await history(ready)
    second = await backfill(ready)
    again = await history(ready)
    assert first.rows_written == second.rows_written == len(rows) == len(again)
    assert stable(again) == stable(rows)
    assert len({ts_of(r) for r in again}) == len(again)
    assert first.actions == second.actions
    assert sum(first.actions.values()) == first.rows_written
    assert first.to_dict()["rows_written"] == first.rows_written


async def test_last_mode_continues_where_the_history_ends(ready: Services,
                                                          models: ModelFactory) -> None:
    await add_signal(ready, models, signal_id="whole")
    whole = await backfill(ready, "whole")
    mid = 700
    head = await backfill(ready, start=bar(0), end=bar(mid))
    assert head.rows_written == mid + 1 - WARMUP_BARS
    tail = await backfill(ready, mode="last")
    assert tail.rows_written == BARS - 1 - mid
    assert head.rows_written + tail.rows_written == whole.rows_written
    rows = await history(ready)
    assert ts_of(rows[-1]) == bar(BARS - 1)
    # positions carried from the stored history into the continuation: same as one run
    assert stable(rows, ("signal_id",)) == stable(await history(ready, "whole"), ("signal_id",))
    again = await backfill(ready, mode="last")
    assert again.rows_written == 0
    assert len(await history(ready)) == len(rows)


async def test_last_mode_on_an_empty_history_takes_everything(ready: Services) -> None:
    report = await backfill(ready, mode="last")
    assert report.rows_written == BARS - WARMUP_BARS
    assert report.start == bar(WARMUP_BARS) and report.end == bar(BARS - 1)


async def test_ts_list_mode(ready: Services, models: ModelFactory) -> None:
    await add_signal(ready, models, signal_id="whole")
    await backfill(ready, "whole")
    whole = {ts_of(r): r for r in await history(ready, "whole")}
    # unsorted, with a repeat, and bar 5 has no features
    picked = (bar(900), bar(30), bar(500), bar(501), bar(5), bar(500))
    report = await backfill(ready, mode="ts-list", ts=picked)
    assert report.rows_written == 4
    assert report.rows_skipped_missing_features == 1
    assert report.start == bar(5) and report.end == bar(900)
    rows = await history(ready)
    assert [ts_of(r) for r in rows] == [bar(30), bar(500), bar(501), bar(900)]
    for row in rows:  # the model's answer does not depend on which bars were listed
        reference = whole[ts_of(row)]
        assert row["raw_output"] == reference["raw_output"]
        assert row["confidence"] == reference["confidence"]
    # positions carry through the listed bars, in ts order
    assert resolve_positions(raw_of(rows), FLAT)[0].tolist() == action_codes(rows).tolist()
    again = await backfill(ready, mode="ts-list", ts=picked)
    assert again.rows_written == 4
    assert stable(await history(ready)) == stable(rows)


# --- positions, gaps and chunks ----------------------------------------------------------------


def raw_of(rows: list[dict[str, Any]]) -> np.ndarray:
    """The buy/sell/hold the model asked for, before position-aware closes."""
    raw = action_codes(rows)
    raw[raw == CLOSE_SHORT] = BUY
    raw[raw == CLOSE_LONG] = SELL
    return raw


async def test_position_aware_closes_follow_resolve_positions(
    services: Services, models: ModelFactory,
) -> None:
    for symbol in SYMBOLS:
        await import_market(services, symbol, market(symbol))
    await add_signal(services, models)
    await add_signal(services, models, signal_id="raw", policy=replace(
        models("lightgbm").policy, position_aware=False))
    for signal_id in ("sig", "raw"):
        for symbol in SYMBOLS:
            await backfill(services, signal_id, symbol)
    for symbol in SYMBOLS:
        rows = await history(services, "sig", symbol)
        actions = action_codes(rows)
        closes = np.isin(actions, [CLOSE_LONG, CLOSE_SHORT])
        assert closes.sum() > 10
        # each symbol's positions start flat and follow its own history
        resolved, _ = resolve_positions(raw_of(rows), FLAT)
        assert resolved.tolist() == actions.tolist()
        # a close has no levels; an entry with a valid ATR has them
        for row, is_close in zip(rows, closes.tolist(), strict=True):
            if is_close:
                assert row["entry_price"] is None and row["recommended_size"] is None
            elif row["action"] in ("buy", "sell"):
                assert row["entry_price"] is not None and row["recommended_size"] > 0
        # without position awareness the same model gives the raw actions
        plain = await history(services, "raw", symbol)
        assert action_codes(plain).tolist() == raw_of(rows).tolist()
        assert [r["raw_output"] for r in plain] == [r["raw_output"] for r in rows]
    btc = stable(await history(services, "sig", BTC))
    await backfill(services, "sig", ETH)  # re-running one symbol leaves the other alone
    assert stable(await history(services, "sig", BTC)) == btc


def gappy_rows() -> np.ndarray:
    """Complete rows with a 150-bar hole (longer than a 100-row chunk) and scattered misses."""
    rows = complete_rows()
    keep = ~((rows >= 600) & (rows < 750)) & (rows % 97 != 0)
    return rows[keep]


async def test_bars_without_features_are_counted_and_skipped(
    services: Services, models: ModelFactory,
) -> None:
    rows = gappy_rows()
    await import_market(services, BTC, market(BTC), rows=rows)
    await add_signal(services, models)
    report = await backfill(services)
    assert report.rows_written == rows.size
    assert report.rows_skipped_missing_features == BARS - rows.size
    stored = await history(services)
    assert [ts_of(r) for r in stored] == list(market(BTC).ts[rows])
    # the positions carry over the hole
    assert resolve_positions(raw_of(stored), FLAT)[0].tolist() == action_codes(stored).tolist()
    err = await refused(services.engine.predict_bar("sig", BTC, INTERVAL, bar(650)))
    assert err.code == "feature_value_missing"


@pytest.mark.parametrize("gaps", [False, True], ids=["complete", "gappy"])
async def test_chunking_changes_nothing(services: Services, models: ModelFactory,
                                        gaps: bool) -> None:
    await import_market(services, BTC, market(BTC), rows=gappy_rows() if gaps else None)
    await add_signal(services, models, signal_id="small")
    await add_signal(services, models, signal_id="one")
    small = await backfill(services, "small", chunk_rows=100)
    one = await backfill(services, "one", chunk_rows=10_000)
    assert one.chunks == 1 and small.chunks >= 14
    assert small.rows_written == one.rows_written
    assert small.rows_skipped_missing_features == one.rows_skipped_missing_features
    assert small.actions == one.actions
    chunked = await history(services, "small")
    single = await history(services, "one")
    assert stable(chunked, ("signal_id",)) == stable(single, ("signal_id",))
    assert sum(r["action"].startswith("close") for r in single) > 10

    # reading the sides from the store, as a later chunk of another run would, agrees too
    ts = np.array([ts_of(r) for r in single], dtype=TS_DTYPE)
    sides = await services.store.position_sides("one", single[0]["model_version"], BTC, INTERVAL, ts)
    expected = np.zeros(len(single), dtype=np.int8)
    side = FLAT
    for i, code in enumerate(action_codes(single).tolist()):
        expected[i] = side
        side = {BUY: 1, SELL: -1, CLOSE_LONG: FLAT, CLOSE_SHORT: FLAT}.get(code, side)
    assert sides.tolist() == expected.tolist()
