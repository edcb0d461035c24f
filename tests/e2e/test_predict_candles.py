"""Train -> register -> serve -> ``POST /predict`` with candles, end to end over HTTP (the real app
and its lifespan, a DuckDB home built by ``sigserve train``'s pipeline).

The labels a candle gets from ``/predict`` equal the ones the engine gives from the store's feature
rows (same spec code, incremental to 1e-9); ``/predict/batch`` reads the store in chunks and agrees
with both; the refusals carry the error envelope."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.demo.market import generate_ohlcv
from sigserve.domain import Policy, SignalDefinition, Stage
from sigserve.features.spec import FeatureSpec
from sigserve.stores.base import Candles
from sigserve.timeutil import format_ts
from sigserve.train.config import parse_config
from sigserve.train.run import run_pipeline
from tests.e2e.http_world import serving, settings_for
from tests.fixtures.models import train_lightgbm

pytestmark = pytest.mark.e2e
pytest.importorskip("talib")

BARS = 1200
SIGNAL = "cand-1h"
FEATURES = {"indicators": [{"name": "RSI", "timeperiod": 14}, {"name": "ATR", "timeperiod": 14},
                           {"name": "EMA", "timeperiod": 20}, {"name": "ROC", "timeperiod": 4}, "BBANDS"],
            "candles": ["body_size", "body_direction", "upper_wick", "lower_wick", "gap", "range"]}


def _build(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    home = root / "home"
    market = generate_ohlcv("BTCUSDT", "1h", "2024-01-01", BARS)

    async def work() -> None:
        from sigserve.config import Settings

        async with Services.open(Settings(home=home)) as services:
            await services.store.write_candles("BTCUSDT", "1h", Candles(
                market["ts"], market["open"], market["high"], market["low"], market["close"], market["volume"]))
            config = parse_config({
                "name": "cand", "data": {"symbols": ["BTCUSDT"], "interval": "1h"}, "features": FEATURES,
                "labels": {"kind": "forward_return", "horizon": 3, "classification": "threshold",
                           "threshold": 0.003},
                "model": {"type": "lightgbm", "params": {"n_estimators": 40, "min_data_in_leaf": 20}},
                "tracking": {"mlflow": False},
                "register": {"promote": "production", "signal": {"id": SIGNAL, "threshold": 0.0}}})
            summary = await run_pipeline(services, config)
            assert summary["model"] == "cand:1"
            # a model without a feature spec, for the refusal
            plain = train_lightgbm(root, "binary", n_features=3, feature_names=["rsi_14", "atr_14", "ema_20"])
            card = await services.registry.register(plain, name="plain", classes=["down", "up"])
            await services.registry.promote("plain", card.version, Stage.PRODUCTION)
            await services.store.create_signal(SignalDefinition("plain-1h", "plain", "@production", "1h", (),
                                                                Policy(threshold=0.55)))

    asyncio.run(work())
    return home, market


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    return _build(tmp_path_factory.mktemp("predict-candles"))


@pytest.fixture
def home(world: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> Path:
    target = tmp_path / "home"
    shutil.copytree(world[0], target)
    return target


def candles(market: dict[str, np.ndarray], lo: int, hi: int) -> list[dict[str, Any]]:
    return [{"ts": format_ts(market["ts"][i]), "open": float(market["open"][i]), "high": float(market["high"][i]),
             "low": float(market["low"][i]), "close": float(market["close"][i]),
             "volume": float(market["volume"][i])} for i in range(lo, hi)]


def envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error_code", "message", "details", "request_id"} and body["error_code"] == code
    return dict(body)


async def test_predict_labels_candles_like_the_engine_on_stored_rows(
        home: Path, world: tuple[Path, dict[str, np.ndarray]]) -> None:
    market = world[1]
    spec = FeatureSpec.from_dict(FEATURES)
    async with serving(settings_for(home, default_signal=SIGNAL)) as (app, client):
        lo, hi = BARS - spec.window - 60, BARS
        r = await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h",
                                                "candles": candles(market, lo, hi)})
        assert r.status_code == 200, r.text
        body = r.json()
        info = body["model_info"]
        assert info["model"] == "cand:1" and info["classes"] == ["down", "flat", "up"]
        assert info["feature_key"] == spec.feature_key and info["warmup"] == spec.warmup
        assert body["candles"] == hi - lo and body["warmup_skipped"] == spec.warmup
        predictions = body["predictions"]
        assert len(predictions) == hi - lo - spec.warmup
        assert predictions[0]["ts"] == format_ts(market["ts"][lo + spec.warmup])
        for p in predictions:
            assert p["label"] in ("down", "flat", "up") and 1 / 3 <= p["confidence"] <= 1.0
            assert p["action"] in ("buy", "sell", "hold", "close_long", "close_short")
        # spans: runs of one label, covering every candle (no "O" class here)
        assert sum(s["candles"] for s in body["spans"]) == len(predictions)
        for s in body["spans"]:
            run = [p for p in predictions if s["start"] <= p["ts"] <= s["end"]]
            assert {p["label"] for p in run} == {s["label"]} and len(run) == s["candles"]
            assert s["avg_confidence"] == pytest.approx(np.mean([p["confidence"] for p in run]))

        # the engine on the store's rows (features over the whole history) agrees on the candles
        # that have a full window behind them
        engine = app.state.sigserve.engine
        prepared = await engine.prepare(SIGNAL)
        stored = await engine.run_window(SIGNAL, "BTCUSDT", "1h", market["ts"][lo + spec.window - 1],
                                         market["ts"][hi - 1], write=False)
        by_ts = {format_ts(t): i for i, t in enumerate(stored.batch.ts)}
        compared = 0
        for p in predictions:
            i = by_ts.get(p["ts"])
            if i is None:
                continue
            raw = stored.batch.raw_output[i]
            assert p["label"] == prepared.card.classes[int(np.argmax(raw))]
            assert p["confidence"] == pytest.approx(float(raw.max()), abs=1e-9)
            compared += 1
        assert compared == 60 + 1

        r = await client.get("/model/info")
        assert r.status_code == 200
        assert set(r.json()["class_metrics"]) == {"down", "flat", "up"}


async def test_predict_batch_reads_the_store_in_chunks(home: Path, world: tuple[Path, dict[str, np.ndarray]]) -> None:
    market = world[1]
    spec = FeatureSpec.from_dict(FEATURES)
    async with serving(settings_for(home, default_signal=SIGNAL)) as (_, client):
        start, end = market["ts"][700], market["ts"][949]
        r = await client.post("/predict/batch", json={"symbol": "BTCUSDT", "interval": "1h", "start": format_ts(start),
                                                      "end": format_ts(end), "batch_size": 64})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["chunks"] == 4 and body["candles"] == 250 and len(body["predictions"]) == 250
        one = await client.post("/predict/batch", json={"symbol": "BTCUSDT", "interval": "1h",
                                                        "start": format_ts(start), "end": format_ts(end),
                                                        "batch_size": 1000})
        whole = one.json()
        assert whole["chunks"] == 1
        for a, b in zip(body["predictions"], whole["predictions"], strict=True):
            assert a["ts"] == b["ts"] and a["label"] == b["label"]
            assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-9)
        # and /predict over the same candles (with a window of history) gives the same labels
        r = await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h",
                                                "candles": candles(market, 700 - spec.window, 950)})
        tail = r.json()["predictions"][-250:]
        assert [p["label"] for p in tail] == [p["label"] for p in whole["predictions"]]
        # the very start of the history: the warm-up is skipped
        r = await client.post("/predict/batch", json={"symbol": "BTCUSDT", "interval": "1h",
                                                      "start": format_ts(market["ts"][0]),
                                                      "end": format_ts(market["ts"][99]), "batch_size": 30})
        assert len(r.json()["predictions"]) == 100 - spec.warmup and r.json()["warmup_skipped"] == spec.warmup


async def test_refusals(home: Path, world: tuple[Path, dict[str, np.ndarray]]) -> None:
    market = world[1]
    spec = FeatureSpec.from_dict(FEATURES)
    async with serving(settings_for(home, default_signal=SIGNAL, max_backfill_rows=500)) as (_, client):
        few = await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h",
                                                  "candles": candles(market, 0, spec.warmup)})
        body = envelope(few, 422, "validation_error")
        assert body["details"]["needed"] == spec.warmup + 1 and str(spec.warmup + 1) in body["message"]
        shuffled = candles(market, 0, 60)[::-1]
        envelope(await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h", "candles": shuffled}),
                 422, "validation_error")
        broken = candles(market, 0, 60)
        broken[10]["high"] = broken[10]["low"] / 2
        envelope(await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h", "candles": broken}),
                 422, "validation_error")
        envelope(await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h", "candles": []}),
                 422, "validation_error")
        envelope(await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "4h",
                                                      "candles": candles(market, 0, 60)}), 422, "validation_error")
        plain = await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h", "signal_id": "plain-1h",
                                                     "candles": candles(market, 0, 60)})
        assert "sigserve train" in envelope(plain, 422, "validation_error")["message"]
        envelope(await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h", "signal_id": "nope",
                                                     "candles": candles(market, 0, 60)}), 404, "signal_not_found")
        wide = await client.post("/predict/batch", json={"symbol": "BTCUSDT", "interval": "1h",
                                                         "start": format_ts(market["ts"][0]),
                                                         "end": format_ts(market["ts"][BARS - 1])})
        envelope(wide, 413, "backfill_window_too_large")
        backwards = await client.post("/predict/batch", json={"symbol": "BTCUSDT", "interval": "1h",
                                                              "start": format_ts(market["ts"][10]),
                                                              "end": format_ts(market["ts"][5])})
        envelope(backwards, 422, "validation_error")
        nothing = await client.post("/predict/batch", json={"symbol": "ETHUSDT", "interval": "1h",
                                                             "start": format_ts(market["ts"][10]),
                                                             "end": format_ts(market["ts"][50])})
        envelope(nothing, 422, "validation_error")

    async with serving(settings_for(home, default_signal=SIGNAL), headers={}) as (_, anonymous):
        for path in ("/predict", "/predict/batch"):
            envelope(await anonymous.post(path, json={}), 401, "unauthorized")


async def test_open_bars_are_dropped_and_the_endpoints_are_documented(
        home: Path, world: tuple[Path, dict[str, np.ndarray]]) -> None:
    market = world[1]
    now = np.datetime64("now", "h").astype("datetime64[us]")
    shift = now - market["ts"][299]  # the last candle opens this hour: not closed yet
    sent = candles(market, 0, 300)
    for c, t in zip(sent, market["ts"][:300] + shift, strict=True):
        c["ts"] = format_ts(t)
    async with serving(settings_for(home, default_signal=SIGNAL)) as (_, client):
        r = await client.post("/predict", json={"symbol": "BTCUSDT", "interval": "1h", "candles": sent})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["open_bars_dropped"] == 1 and body["predictions"][-1]["ts"] == sent[-2]["ts"]
        schema = (await client.get("/openapi.json")).json()
        for path in ("/predict", "/predict/batch"):
            operation = schema["paths"][path]["post"]
            assert {"200", "401", "422"} <= set(operation["responses"])
            assert operation["requestBody"]


def test_group_spans_strips_bio_prefixes_and_splits_on_b() -> None:
    from sigserve.api.candles import group_spans

    ts = [f"t{i}" for i in range(9)]
    labels = ["O", "B-flag", "I-flag", "I-flag", "B-flag", "O", "up", "up", "down"]
    conf = [0.9, 0.6, 0.8, 0.7, 0.5, 0.9, 0.6, 0.4, 0.7]
    spans = group_spans(ts, labels, conf)
    assert [(s["label"], s["start"], s["end"], s["candles"]) for s in spans] == [
        ("flag", "t1", "t3", 3), ("flag", "t4", "t4", 1), ("up", "t6", "t7", 2), ("down", "t8", "t8", 1)]
    assert spans[0]["avg_confidence"] == pytest.approx(0.7) and spans[2]["avg_confidence"] == pytest.approx(0.5)
    assert group_spans([], [], []) == [] and group_spans(["a"], ["O"], [1.0]) == []
