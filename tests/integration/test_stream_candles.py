"""Candle messages on the stream worker (issue 6), on the in-process bus with a model trained by
``sigserve train``'s pipeline (its card records the feature spec).

- a candle message (the last ``window`` candles, the newest at ts) gives the same stored row and
  published signal as a feature message carrying the features ``FeatureSpec`` computes over the
  whole history for that bar;
- refusals reach the dead letter with ``validation_error``: a model without a spec, too few
  candles (naming the count needed), candles not ending at ts, features and candles together.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from sigserve.app import Services
from sigserve.bus import BusMessage, MemoryBus
from sigserve.config import Settings
from sigserve.demo.market import generate_ohlcv
from sigserve.domain import Policy, SignalDefinition, Stage
from sigserve.features.spec import FeatureSpec
from sigserve.hotconfig import LiveConfig
from sigserve.stores.base import Candles
from sigserve.stream import Names, StreamOptions, StreamWorker
from sigserve.timeutil import format_ts
from sigserve.train.config import parse_config
from sigserve.train.run import run_pipeline
from tests.fixtures.models import train_lightgbm
from tests.integration.test_stream import Signals, until

pytest.importorskip("talib")

BARS = 600
SIGNAL = "cand-stream"
FEATURES = {"indicators": [{"name": "RSI", "timeperiod": 14}, {"name": "ATR", "timeperiod": 14},
                           {"name": "EMA", "timeperiod": 20}, {"name": "ROC", "timeperiod": 4}, "BBANDS"],
            "candles": ["body_size", "body_direction", "upper_wick", "lower_wick", "gap", "range"]}
FLOATS = ("confidence", "entry_price", "stop_loss", "take_profit", "recommended_size")
EXACT = ("action", "model_name", "model_version", "model_sha256", "feature_key", "flags", "interval", "source",
         "shadow")


class World:
    def __init__(self, services: Services, market: dict[str, np.ndarray], spec: FeatureSpec) -> None:
        self.services, self.market, self.spec = services, market, spec
        self.bus = MemoryBus()
        self.names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
        self.signals = Signals()
        self.dead: list[dict[str, Any]] = []
        self.worker: StreamWorker | None = None

    async def start(self) -> StreamWorker:
        await self.bus.connect()
        await self.bus.subscribe(self.names.signals_all, self.signals)

        async def dead(msg: BusMessage) -> None:
            self.dead.append(orjson.loads(msg.data))

        await self.bus.subscribe(self.names.deadletter, dead)
        live = LiveConfig(None, self.bus, bucket=self.names.config_bucket, poll_s=0.1)
        options = StreamOptions(names=self.names, signals=(SIGNAL, "plain-1h"), catchup=False)
        self.worker = StreamWorker(self.services, self.bus, options, live)
        await self.worker.start()
        return self.worker

    async def send(self, body: dict[str, Any]) -> None:
        await self.bus.publish(self.names.subject(f"features.{body['symbol']}.1h"), orjson.dumps(body))

    def candles(self, lo: int, hi: int) -> list[dict[str, Any]]:
        m = self.market
        return [{"ts": format_ts(m["ts"][i]), "open": float(m["open"][i]), "high": float(m["high"][i]),
                 "low": float(m["low"][i]), "close": float(m["close"][i]), "volume": float(m["volume"][i])}
                for i in range(lo, hi)]

    async def rows(self, symbol: str) -> list[dict[str, Any]]:
        assert self.worker is not None
        return await self.worker.runner.call(lambda: self.services.store.read_signals(SIGNAL, symbol))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    market = generate_ohlcv("BTCUSDT", "1h", "2024-01-01", BARS)
    async with Services.open(Settings(home=tmp_path / "home")) as services:
        await services.store.write_candles("BTCUSDT", "1h", Candles(
            market["ts"], market["open"], market["high"], market["low"], market["close"], market["volume"]))
        config = parse_config({
            "name": "cand", "data": {"symbols": ["BTCUSDT"], "interval": "1h"}, "features": FEATURES,
            "labels": {"kind": "forward_return", "horizon": 3, "classification": "threshold", "threshold": 0.003},
            "model": {"type": "lightgbm", "params": {"n_estimators": 20, "min_data_in_leaf": 20}},
            "tracking": {"mlflow": False}, "register": {"promote": "production"}})
        summary = await run_pipeline(services, config)
        assert summary["model"] == "cand:1"
        spec = FeatureSpec.from_dict(FEATURES)
        await services.store.create_signal(SignalDefinition(  # BTCUSDT and its copy
            SIGNAL, "cand", "@production", "1h", ("BTCUSDT", "BTCCOPY"), Policy(threshold=0.0, atr_feature="atr_14")))
        # a model without a feature spec, for the refusal
        plain = train_lightgbm(tmp_path, "binary", n_features=3, feature_names=["rsi_14", "atr_14", "ema_20"])
        card = await services.registry.register(plain, name="plain", classes=["down", "up"])
        await services.registry.promote("plain", card.version, Stage.PRODUCTION)
        await services.store.create_signal(SignalDefinition("plain-1h", "plain", "@production", "1h", ("PLAIN",),
                                                            Policy(threshold=0.55)))
        world = World(services, market, spec)
        try:
            yield world
        finally:
            if world.worker is not None:
                await world.worker.stop()
            await world.bus.close()


async def test_a_candle_message_gives_the_row_of_the_features_the_spec_computes_over_history(world: World) -> None:
    await world.start()
    spec, market = world.spec, world.market
    assert "atr_14" in spec.names and spec.window < BARS - 30
    history = spec.compute(market)  # every feature over the whole history
    bars = range(BARS - 20, BARS)
    for i in bars:
        # the stream's candle message: the last `window` candles up to and including bar i
        await world.send({"symbol": "BTCUSDT", "interval": "1h", "ts": format_ts(market["ts"][i]),
                          "candles": world.candles(i + 1 - spec.window, i + 1)})
        # the same bar as a feature message, for a copy of the symbol
        features = {n: float(history.values[i, j]) for j, n in enumerate(spec.names)}
        await world.send({"symbol": "BTCCOPY", "interval": "1h", "ts": format_ts(market["ts"][i]),
                          "features": features, "feature_key": spec.feature_key,
                          "close": float(market["close"][i])})
    published = await world.signals.wait(2 * len(bars))
    assert not world.dead, world.dead
    await until(lambda: world.worker is not None and world.worker.stats["rows_written"] >= 2 * len(bars))
    from_candles = await world.rows("BTCUSDT")
    from_features = await world.rows("BTCCOPY")
    assert len(from_candles) == len(from_features) == len(bars)
    actions = set()
    for a, b in zip(from_candles, from_features, strict=True):
        assert a["ts"] == b["ts"]
        for name in EXACT:
            assert a[name] == b[name], (a["ts"], name, a[name], b[name])
        for name in FLOATS:
            if b[name] is None:  # no levels (a hold)
                assert a[name] is None, (a["ts"], name)
            else:
                assert a[name] == pytest.approx(b[name], rel=1e-9, abs=1e-12), (a["ts"], name)
        assert list(a["raw_output"]) == pytest.approx(list(b["raw_output"]), rel=1e-9, abs=1e-12)
        assert a["feature_key"] == spec.feature_key and a["source"] == "stream"
        actions.add(a["action"])
    assert actions - {"hold"}, actions  # entries too: their levels come from the candles' close and ATR
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for m in published:
        by_symbol.setdefault(m["symbol"], []).append(m)
    for x, y in zip(sorted(by_symbol["BTCUSDT"], key=lambda m: m["timestamp_ms"]),
                    sorted(by_symbol["BTCCOPY"], key=lambda m: m["timestamp_ms"]), strict=True):
        assert x["signal_type"] == y["signal_type"] and x["model_version"] == y["model_version"] == "cand:1"
        assert x["confidence_score"] == pytest.approx(y["confidence_score"], rel=1e-9)
        assert x["metadata"]["feature_key"] == y["metadata"]["feature_key"] == spec.feature_key


async def test_candle_refusals_reach_the_dead_letter_with_their_codes(world: World) -> None:
    worker = await world.start()
    spec, market = world.spec, world.market
    i = BARS - 1
    ts = format_ts(market["ts"][i])
    await world.send({"symbol": "PLAIN", "interval": "1h", "ts": ts,  # a model without a spec
                      "candles": world.candles(i + 1 - spec.window, i + 1)})
    await world.send({"symbol": "BTCUSDT", "interval": "1h", "ts": ts,  # one candle too few
                      "candles": world.candles(i + 2 - spec.window, i + 1)})
    await world.send({"symbol": "BTCUSDT", "interval": "1h", "ts": ts,  # ends one bar early
                      "candles": world.candles(i - spec.window, i)})
    await world.send({"symbol": "BTCUSDT", "interval": "1h", "ts": ts, "features": {"rsi_14": 50.0},
                      "candles": world.candles(i + 1 - spec.window, i + 1)})  # both
    bad = world.candles(i + 1 - spec.window, i + 1)
    bad[-1]["low"] = bad[-1]["high"] * 2  # an inconsistent candle
    await world.send({"symbol": "BTCUSDT", "interval": "1h", "ts": ts, "candles": bad})
    await until(lambda: len(world.dead) >= 5, what="five dead letters")
    def find(text: str) -> dict[str, Any]:  # (parse refusals come before the model's)
        (found,) = [d for d in world.dead if text in d["message"]]
        return found

    no_spec, too_few, not_at_ts = find("no feature spec"), find("too few"), find("must end at")
    both, inconsistent = find("not both"), find("inconsistent candle")
    assert {d["error_code"] for d in world.dead} == {"validation_error"}
    assert no_spec["details"]["reason"] == "no_feature_spec"
    assert no_spec["details"]["signal_id"] == "plain-1h"
    assert too_few["details"]["reason"] == "too_few_candles"
    assert too_few["details"]["needed"] == spec.window and too_few["details"]["candles"] == spec.window - 1
    assert str(spec.window) in too_few["message"]
    assert not_at_ts["details"]["reason"] == "candles_not_ending_at_ts" and not_at_ts["details"]["ts"] == ts
    assert both["details"]["field"] == "candles" and inconsistent["details"]["index"] == spec.window - 1
    assert not world.signals.messages and worker.stats["deadlettered"] == 5
    assert await world.rows("BTCUSDT") == []
