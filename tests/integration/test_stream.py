"""The stream worker end to end, on the in-process bus and on the local NATS (JetStream), with a
real LightGBM model and the DuckDB store.

- every feature message gives one stored row and one published signal in seed 001's format;
  the audit stream holds each once (``Nats-Msg-Id``);
- parity: a streamed bar's stored row equals ``predict_bar``'s for the same bar, field by field;
- poison messages go to the dead letter subject with their error code; the worker keeps going;
- invalid signals are stored with their flag but never published;
- the live config (file and KV) changes the threshold and the model at once; a model swap during
  10,000 messages fails none;
- catch-up and the grace-period fallback compute stored bars with ``source=catchup_scan``;
- a second worker in a queue group shares the load, each bar once (PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from sigserve.app import Services
from sigserve.bus import Bus, BusMessage, MemoryBus
from sigserve.domain import Policy, SignalDefinition, Stage
from sigserve.hotconfig import LiveConfig
from sigserve.stores.base import Candles
from sigserve.stream import Names, StreamOptions, StreamWorker, upsert_key
from sigserve.timeutil import TS_DTYPE, format_ts
from tests.fixtures.models import train_lightgbm
from tests.services import require_tcp

NATS_URL = "nats://127.0.0.1:4222"
NAMES = tuple(f"f{i}" for i in range(8))
ATR = "atr_14"
INTERVAL = "1m"
KEY = "fk-stream"
SIGNAL = "trend-1m"
T0 = np.datetime64("2024-03-01T00:00:00", "us")
STEP = np.timedelta64(60_000_000, "us")
COMPARED = ("action", "confidence", "raw_output", "entry_price", "stop_loss", "take_profit",
            "recommended_size", "model_name", "model_version", "model_sha256", "feature_key",
            "flags", "symbol", "interval")
SIGNAL_FIELDS = {"signal_id", "symbol", "timeframe", "timestamp_ms", "signal_type", "confidence_score",
                 "entry_price", "stop_loss", "take_profit", "position_size_recommended",
                 "model_version", "metadata"}
META_FIELDS = {"features_used", "prediction_latency_ms", "model_type", "model_sha256", "feature_key",
               "definition_id"}


# --- the world --------------------------------------------------------------------------------------
@dataclass
class Market:
    symbols: tuple[str, ...]
    ts: np.ndarray
    values: dict[str, np.ndarray]  # symbol -> (n, 9): the model's 8 features, then the ATR
    close: dict[str, np.ndarray]

    def message(self, sym: str, i: int, /, **changes: Any) -> bytes:
        row = self.values[sym][i]
        body: dict[str, Any] = {
            "symbol": sym, "interval": INTERVAL, "ts": format_ts(self.ts[i]),
            "features": {**{n: float(row[j]) for j, n in enumerate(NAMES)}, ATR: float(row[8])},
            "feature_key": KEY, "close": float(self.close[sym][i])}
        body.update(changes)
        return orjson.dumps(body)


def make_market(symbols: tuple[str, ...], n: int, seed: int = 11) -> Market:
    rng = np.random.default_rng(seed)
    ts = T0 + np.arange(n) * STEP
    values, close = {}, {}
    for symbol in symbols:
        x = rng.normal(size=(n, 8))
        c = 100.0 * np.exp(np.cumsum(rng.normal(scale=0.002, size=n)))
        atr = c * (0.004 + 0.002 * rng.random(n))
        values[symbol] = np.column_stack([x, atr])
        close[symbol] = c
    return Market(symbols, ts.astype(TS_DTYPE), values, close)


async def seed_store(services: Services, tmp: Path, market: Market, *, store_features: bool = True,
                     symbols_in_definition: bool = True, threshold: float = 0.55) -> None:
    """A LightGBM model (trend:1 in production), candles, features, and the signal trend-1m."""
    path = train_lightgbm(tmp, "binary", n_trees=20, feature_names=NAMES)
    card = await services.registry.register(path, name="trend")
    await services.registry.promote(card.name, card.version, Stage.PRODUCTION)
    await services.store.register_features([*NAMES, ATR])
    for symbol in market.symbols:
        c = market.close[symbol]
        await services.store.write_candles(symbol, INTERVAL, Candles(market.ts, c, c * 1.001, c * 0.999, c,
                                                                     np.ones_like(c)))
        if store_features:
            await services.store.write_features(INTERVAL, KEY, (*NAMES, ATR),
                                                np.full(len(market.ts), symbol, dtype=object), market.ts,
                                                market.values[symbol])
    await services.store.create_signal(SignalDefinition(
        SIGNAL, "trend", "@production", INTERVAL, market.symbols if symbols_in_definition else (),
        Policy(threshold=threshold, atr_feature=ATR)))


class Signals:
    """A subscriber on signals.> (the risk service's view)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.received_at: list[float] = []
        self.event = asyncio.Event()

    async def __call__(self, msg: BusMessage) -> None:
        self.messages.append(orjson.loads(msg.data))
        self.received_at.append(time.perf_counter())
        self.event.set()

    async def wait(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        await until(lambda: len(self.messages) >= n, timeout, f"{n} signals (have {len(self.messages)})")
        return self.messages


async def until(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def until_async(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Rig:
    services: Services
    bus: Bus
    market: Market
    names: Names
    workers: list[StreamWorker] = field(default_factory=list)
    signals: Signals = field(default_factory=Signals)
    dead: list[BusMessage] = field(default_factory=list)
    rejected: list[BusMessage] = field(default_factory=list)

    async def worker(self, **options: Any) -> StreamWorker:
        config_file = options.pop("config_file", None)
        opts = StreamOptions(names=self.names, config_file=config_file, **options)
        live = LiveConfig(config_file, self.bus, bucket=self.names.config_bucket, poll_s=0.1)
        worker = StreamWorker(self.services, self.bus, opts, live)
        await worker.start()
        self.workers.append(worker)
        return worker

    async def publish(self, symbol: str, i: int, **changes: Any) -> None:
        await self.bus.publish(self.names.subject(f"features.{symbol}.{INTERVAL}"),
                               self.market.message(symbol, i, **changes))

    async def call(self, factory: Callable[[], Awaitable[Any]]) -> Any:
        """A store call, on the worker's store thread when it has one (a DuckDB connection
        refuses a second caller while the worker writes)."""
        if self.workers:
            return await self.workers[0].runner.call(factory)
        return await factory()

    async def stored(self, symbol: str | None = None) -> list[dict[str, Any]]:
        return await self.call(lambda: self.services.store.read_signals(SIGNAL, symbol))


def nats_available() -> None:
    require_tcp("NATS", "127.0.0.1", 4222)


async def open_bus(kind: str) -> Bus:
    if kind == "memory":
        return MemoryBus()
    nats_available()
    from sigserve.bus.nats import NatsBus

    return NatsBus(NATS_URL)


@pytest.fixture(params=["memory", "nats"])
async def rig(request: pytest.FixtureRequest, services: Services, tmp_path: Path) -> AsyncIterator[Rig]:
    bus = await open_bus(request.param)
    await bus.connect()
    market = make_market(("BTCUSDT", "ETHUSDT"), 300)
    await seed_store(services, tmp_path, market)
    names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
    rig = Rig(services, bus, market, names)
    await bus.subscribe(names.signals_all, rig.signals)
    await bus.subscribe(names.deadletter, _collect(rig.dead))
    await bus.subscribe(names.rejected, _collect(rig.rejected))
    await bus.flush()
    try:
        yield rig
    finally:
        for worker in rig.workers:
            await worker.stop()
        await cleanup(bus, names)
        await bus.close()


def _collect(into: list[BusMessage]) -> Callable[[BusMessage], Awaitable[None]]:
    async def handle(msg: BusMessage) -> None:
        into.append(msg)
    return handle


async def cleanup(bus: Bus, names: Names) -> None:
    if bus.durable:
        for stream in (names.stream(names.features_stream), names.stream(names.signals_stream),
                       f"KV_{names.config_bucket}"):
            await bus.delete_stream(stream)


# --- tests ----------------------------------------------------------------------------------------------
async def test_each_message_gives_one_row_and_one_signal_in_the_seed_format(rig: Rig) -> None:
    await rig.worker()
    market = rig.market
    for i in range(50):
        for symbol in market.symbols:
            await rig.publish(symbol, i)
    got = await rig.signals.wait(100)
    await until_async(lambda: _count(rig, 100), what="100 stored rows")
    assert len({m["signal_id"] for m in got}) == 100
    for m in got:
        assert set(m) == SIGNAL_FIELDS and set(m["metadata"]) == META_FIELDS
        assert m["timeframe"] == INTERVAL and m["symbol"] in market.symbols
        assert m["signal_type"] in ("buy", "sell", "hold", "close_long", "close_short")
        assert 0.0 <= m["confidence_score"] <= 1.0
        assert m["model_version"] == "trend:1" and m["metadata"]["definition_id"] == SIGNAL
        assert m["metadata"]["features_used"] == list(NAMES)
        assert m["metadata"]["model_type"] == "lightgbm" and len(m["metadata"]["model_sha256"]) == 64
        assert m["metadata"]["feature_key"] == KEY
        assert 0.0 < m["metadata"]["prediction_latency_ms"] < 5_000
        if m["signal_type"] in ("buy", "sell"):
            assert m["entry_price"] and m["stop_loss"] and m["take_profit"] and m["position_size_recommended"]
        # the signal id is a uuid5 of the upsert key: a redelivery repeats it
        ts_us = m["timestamp_ms"] * 1000
        key = upsert_key(SIGNAL, 1, m["symbol"], INTERVAL, ts_us)
        assert m["signal_id"] == str(uuid.uuid5(uuid.UUID("6f1d8c1e-2f0a-4c51-9a43-5b7b0f0d7a11"), key))
    rows = await rig.stored()
    assert {r["source"] for r in rows} == {"stream"}
    by_key = {(m["symbol"], m["timestamp_ms"]): m for m in got}
    for r in rows:
        m = by_key[(r["symbol"], int(np.datetime64(r["ts"], "ms").astype(np.int64)))]
        assert m["signal_type"] == r["action"] and m["confidence_score"] == r["confidence"]
        assert abs(m["metadata"]["prediction_latency_ms"] - r["latency_ms"]) < 1e-3
    if rig.bus.durable:
        audit = rig.names.stream(rig.names.signals_stream)
        await until_async(lambda: _stream_has(rig.bus, audit, 100), what="audit stream")
        # a redelivered bar republishes the same signal: the audit stream keeps one
        await rig.publish(market.symbols[0], 0)
        await rig.signals.wait(101)
        await asyncio.sleep(0.3)
        assert await rig.bus.stream_count(audit) == 100
        assert rig.signals.messages[-1]["signal_id"] in {m["signal_id"] for m in got[:100]}
    assert rig.dead == [] and rig.rejected == []


async def _count(rig: Rig, n: int) -> bool:
    return len(await rig.stored()) >= n


async def _stream_has(bus: Bus, stream: str, n: int) -> bool:
    return await bus.stream_count(stream) >= n


async def test_streamed_row_equals_predict_bar_row(rig: Rig) -> None:
    """The engine's invariant across drivers: same features, same model -> the same row."""
    await rig.worker()
    market = rig.market
    symbol = market.symbols[0]
    for i in range(120):
        await rig.publish(symbol, i)
    await rig.signals.wait(120)
    await until_async(lambda: _count(rig, 120))
    streamed = {np.datetime64(r["ts"], "us"): r for r in await rig.stored(symbol)}
    assert len(streamed) == 120
    engine = rig.services.engine
    actions = set()
    for i in range(120):
        expected = await rig.call(lambda i=i: engine.predict_bar(SIGNAL, symbol, INTERVAL, market.ts[i],
                                                                 source="stream", write=False))
        row = streamed[market.ts[i]]
        for name in COMPARED:
            assert row[name] == expected[name] or (name == "raw_output" and list(row[name]) == expected[name]), \
                (i, name, row[name], expected[name])
        actions.add(row["action"])
    assert {"buy", "sell"} <= actions or {"buy", "close_long"} <= actions or len(actions) >= 2


async def test_poison_messages_go_to_the_dead_letter_subject_with_a_code(rig: Rig) -> None:
    worker = await rig.worker()
    subject = rig.names.subject(f"features.BTCUSDT.{INTERVAL}")
    market = rig.market
    bad: list[tuple[bytes, str]] = [
        (b"{not json", "validation_error"),
        (b"[1, 2]", "validation_error"),
        (market.message("BTCUSDT", 0, ts="yesterday"), "validation_error"),
        (market.message("BTCUSDT", 1, interval="7x"), "validation_error"),
        (market.message("BTCUSDT", 2, features={"f0": 1.0}), "feature_value_missing"),
        (market.message("BTCUSDT", 3, features={**{n: "x" for n in NAMES}, ATR: 1.0}), "validation_error"),
    ]
    for data, _ in bad:
        await rig.bus.publish(subject, data)
    # a symbol no signal covers, on its own subject
    await rig.bus.publish(rig.names.subject(f"features.DOGEUSDT.{INTERVAL}"),
                          market.message("BTCUSDT", 4, symbol="DOGEUSDT"))
    await rig.publish("BTCUSDT", 10)  # a good one still goes through
    await rig.signals.wait(1)
    await until(lambda: len(rig.dead) >= len(bad) + 1, what="dead letters")
    codes = [orjson.loads(m.data)["error_code"] for m in rig.dead]
    assert sorted(codes) == sorted([c for _, c in bad] + ["validation_error"])
    for m in rig.dead:
        body = orjson.loads(m.data)
        assert m.headers is not None and m.headers["Sigserve-Error-Code"] == body["error_code"]
        assert body["message"] and "data" in body and body["subject"].startswith(rig.names.prefix)
    assert sum(orjson.loads(m.data)["details"].get("reason") == "unknown_symbol" for m in rig.dead) == 1
    assert worker.stats["deadlettered"] == len(bad) + 1
    assert len(await rig.stored()) == 1
    if rig.bus.durable:  # acked: nothing comes back
        await asyncio.sleep(1.5)
        assert len(rig.dead) == len(bad) + 1


async def test_invalid_signals_are_stored_flagged_and_never_published(rig: Rig) -> None:
    worker = await rig.worker()
    market = rig.market
    # a negative ATR makes every entry's levels fail validation
    sent = 0
    for i in range(40):
        body = json.loads(market.message("BTCUSDT", i))
        body["features"][ATR] = -1.0
        await rig.bus.publish(rig.names.subject(f"features.BTCUSDT.{INTERVAL}"), orjson.dumps(body))
        sent += 1
    await until_async(lambda: _count(rig, 40))
    rows = await rig.stored()
    entries = [r for r in rows if r["action"] in ("buy", "sell", "close_long", "close_short")]
    flagged = [r for r in rows if r["flags"] == "levels_invalid"]
    assert flagged and len(flagged) == worker.stats["rejected"]
    await until(lambda: len(rig.rejected) == len(flagged), what="rejections")
    await until(lambda: len(rig.signals.messages) == sent - len(flagged), what="valid signals")
    assert all(m["signal_type"] not in ("buy", "sell") or m["entry_price"] is None
               for m in rig.signals.messages) or not entries
    published = {(m["timestamp_ms"]) for m in rig.signals.messages}
    for r in flagged:
        assert int(np.datetime64(r["ts"], "ms").astype(np.int64)) not in published
    body = orjson.loads(rig.rejected[0].data)
    assert body["error_code"] == "validation_error" and "levels" in body["message"]


async def test_live_config_threshold_and_hold_suppression(rig: Rig, tmp_path: Path) -> None:
    config_file = tmp_path / "stream.yaml"
    config_file.write_text("inference_settings:\n  publish_holds: false\n")
    worker = await rig.worker(config_file=config_file)
    assert worker.config.current.inference_settings.publish_holds is False
    for i in range(60):
        await rig.publish("BTCUSDT", i)
    await until_async(lambda: _count(rig, 60))
    await until(lambda: worker.stats["acked"] >= 60)
    rows = await rig.stored()
    holds = sum(r["action"] == "hold" for r in rows)
    assert holds and worker.stats["holds_suppressed"] == holds
    assert len(rig.signals.messages) == 60 - holds
    assert all(m["signal_type"] != "hold" for m in rig.signals.messages)
    # a threshold above every confidence turns every entry into hold (applied live, from the file)
    config_file.write_text("inference_settings:\n  publish_holds: true\n  confidence_threshold: 0.999\n")
    await until(lambda: worker.config.current.inference_settings.confidence_threshold == 0.999, 5)
    before = len(rig.signals.messages)
    for i in range(60, 90):
        await rig.publish("BTCUSDT", i)
    await rig.signals.wait(before + 30)
    assert {m["signal_type"] for m in rig.signals.messages[before:]} == {"hold"}
    # an invalid change is ignored: the last valid config stays
    config_file.write_text("inference_settings:\n  confidence_threshold: 7\n")
    await until(lambda: worker.config.errors >= 1, 5)
    assert worker.config.current.inference_settings.confidence_threshold == 0.999


async def test_catch_up_and_grace_fallback_compute_stored_bars(rig: Rig, tmp_path: Path) -> None:
    market = rig.market
    # bars 0..29 were streamed before; 30..59 are stored but their messages never came
    await rig.services.engine.run_window(SIGNAL, "BTCUSDT", INTERVAL, market.ts[0], market.ts[29],
                                         source="stream")
    config_file = tmp_path / "stream.yaml"
    config_file.write_text("inference_settings:\n  grace_period_s: 0.5\n")
    worker = await rig.worker(config_file=config_file)
    # catch-up at start: the rest of BTCUSDT's stored bars (ETHUSDT has no history: backfill's job)
    rows = await rig.stored("BTCUSDT")
    assert len(rows) == len(market.ts)
    assert {r["source"] for r in rows[30:]} == {"catchup_scan"}
    assert worker.stats["catchup_rows"] == len(market.ts) - 30
    await rig.signals.wait(len(market.ts) - 30)
    assert await rig.stored("ETHUSDT") == []
    # fallback: ETH streams bars 0..9 live, then its messages stop; the store has the rest
    for i in range(10):
        await rig.publish("ETHUSDT", i)
    await until_async(lambda: _eth_rows(rig, len(market.ts)), 20, "the fallback")
    eth = await rig.stored("ETHUSDT")
    assert {r["source"] for r in eth[:10]} == {"stream"}
    assert {r["source"] for r in eth[10:]} == {"catchup_scan"}
    await until(lambda: worker.stats["fallback_rows"] == len(market.ts) - 10, 5, "the fallback's count")


async def _eth_rows(rig: Rig, n: int) -> bool:
    return len(await rig.stored("ETHUSDT")) >= n


async def test_model_change_in_kv_swaps_without_failures(rig: Rig, tmp_path: Path) -> None:
    """Promote a challenger mid-stream through the KV bucket: it is loaded and sha-verified in the
    background and swapped in; every message is answered, by one model or the other."""
    if not rig.bus.durable:
        pytest.skip("KV needs a durable bus")
    services = rig.services
    path = train_lightgbm(tmp_path / "v2", "binary", n_trees=40, feature_names=NAMES) \
        if (tmp_path / "v2").mkdir() is None else None
    assert path is not None
    card2 = await services.registry.register(path, name="trend")
    worker = await rig.worker()
    market = rig.market
    n = 10_000
    ts = T0 + np.arange(n) * STEP
    rng = np.random.default_rng(3)
    values = rng.normal(size=(n, 8))
    subject = rig.names.subject(f"features.BTCUSDT.{INTERVAL}")
    swapped_at = n // 3
    for i in range(n):
        if i == swapped_at:
            await rig.bus.kv_put(rig.names.config_bucket, "model_config",
                                 orjson.dumps({"version": str(card2.version)}))
        if i == 2 * n // 3:  # the last third goes out once the new model is in (it loads meanwhile)
            await until(lambda: worker.stats["model_swaps"] >= 1, 60, "the swap")
        await rig.bus.publish(subject, orjson.dumps({
            "symbol": "BTCUSDT", "interval": INTERVAL, "ts": int(ts[i].astype(np.int64)) // 1000,
            "features": {**{f: float(values[i, j]) for j, f in enumerate(NAMES)}, ATR: 0.5},
            "close": 100.0, "feature_key": KEY}))
        if i % 500 == 0:
            await asyncio.sleep(0)
    await rig.signals.wait(n, timeout=120)
    await until(lambda: worker.stats["acked"] >= n, 60)
    versions = [m["model_version"] for m in rig.signals.messages]
    assert set(versions) == {"trend:1", f"trend:{card2.version}"}
    first_new = versions.index(f"trend:{card2.version}")
    assert all(v == f"trend:{card2.version}" for v in versions[first_new:])  # swapped once, atomically
    assert worker.stats["deadlettered"] == 0 and worker.stats["naked"] == 0
    assert worker.stats["batch_errors"] == 0 and worker.stats["model_swaps"] == 1
    assert rig.dead == [] and rig.rejected == []
    del market


async def test_latency_budget_dead_letters_or_holds_and_policy_overrides_apply(rig: Rig, tmp_path: Path) -> None:
    """max_latency_ms: past it a signal is dead-lettered (deadline_exceeded), or with
    fallback_to_hold stored and published as a flagged hold; signal_generation overrides the
    definition's levels. All applied live from the config file."""
    config_file = tmp_path / "stream.yaml"
    config_file.write_text("inference_settings:\n  max_latency_ms: 0.000001\n")  # always late
    worker = await rig.worker(config_file=config_file)
    for i in range(5):
        await rig.publish("BTCUSDT", i)
    await until(lambda: len(rig.dead) == 5, what="5 dead letters")
    assert {orjson.loads(m.data)["error_code"] for m in rig.dead} == {"deadline_exceeded"}
    await until(lambda: worker.stats["acked"] >= 5)
    assert await rig.stored() == [] and rig.signals.messages == []
    config_file.write_text("inference_settings:\n  max_latency_ms: 0.000001\n  fallback_to_hold: true\n")
    await until(lambda: worker.config.current.inference_settings.fallback_to_hold, 5)
    for i in range(5, 10):
        await rig.publish("BTCUSDT", i)
    got = await rig.signals.wait(5)
    assert {m["signal_type"] for m in got} == {"hold"} and {m["confidence_score"] for m in got} == {0.0}
    await until_async(lambda: _count(rig, 5))
    assert {r["flags"] for r in await rig.stored()} == {"deadline_fallback_hold"}
    # no budget, and wider stops: an entry's stop sits 4 ATRs away instead of the definition's 1.5
    config_file.write_text("signal_generation:\n  atr_multiplier_sl: 4.0\n")
    await until(lambda: worker.config.current.signal_generation.atr_multiplier_sl == 4.0, 5)
    await until(lambda: worker.stats["model_swaps"] == 0 and worker._rebuild_task is not None
                and worker._rebuild_task.done(), 10, "the routes rebuilt")
    await until(lambda: next(iter(worker.routes.values())).prepared.definition.policy.atr_multiplier_sl == 4.0, 10)
    market = rig.market
    for i in range(10, 120):
        await rig.publish("BTCUSDT", i)
    msgs = await rig.signals.wait(115)
    entries = [m for m in msgs[5:] if m["signal_type"] in ("buy", "sell")]
    assert entries
    for m in entries:
        i = int((np.datetime64(m["timestamp_ms"], "ms") - market.ts[0].astype("datetime64[ms]"))
                / np.timedelta64(1, "m"))
        atr = market.values["BTCUSDT"][i][8]
        assert abs(abs(m["entry_price"] - m["stop_loss"]) - 4.0 * atr) < 1e-6 * m["entry_price"]
