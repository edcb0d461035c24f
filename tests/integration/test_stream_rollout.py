"""The stream worker under a traffic policy (issue 5), on the in-process bus with the DuckDB store.

- a 50% rollout splits the streamed bars by (symbol, UTC trading date) exactly as HTTP and
  backfill do: each bar's stored and published row comes from the version ``predict_bar`` and a
  backfill pick for it, and equals ``predict_bar``'s row field by field;
- every other version of the policy predicts each bar as a shadow: stored with ``shadow = true``,
  never published;
- a rollout change made in the store reaches the running worker (its route reload).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.bus import BusMessage, MemoryBus
from sigserve.domain import TrafficPolicy
from sigserve.hotconfig import LiveConfig
from sigserve.routing.hashing import challenger_mask
from sigserve.stream import Names, StreamOptions, StreamWorker
from sigserve.timeutil import TS_DTYPE
from tests.fixtures.models import train_lightgbm
from tests.integration.test_stream import (
    COMPARED,
    INTERVAL,
    NAMES,
    SIGNAL,
    Market,
    Signals,
    make_market,
    seed_store,
    until,
    until_async,
)

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
BARS = 40
SPACING = np.timedelta64(6 * 3_600_000_000, "us")  # 1m bars 6 h apart: 10 trading dates


class World:
    def __init__(self, services: Services, bus: MemoryBus, market: Market, names: Names) -> None:
        self.services, self.bus, self.market, self.names = services, bus, market, names
        self.signals = Signals()
        self.dead: list[BusMessage] = []
        self.worker: StreamWorker | None = None

    async def start(self) -> StreamWorker:
        live = LiveConfig(None, self.bus, bucket=self.names.config_bucket, poll_s=0.1)
        self.worker = StreamWorker(self.services, self.bus, StreamOptions(names=self.names), live)
        await self.worker.start()
        return self.worker

    async def call(self, factory: Any) -> Any:
        assert self.worker is not None
        return await self.worker.runner.call(factory)

    async def rows(self) -> list[dict[str, Any]]:
        return await self.call(lambda: self.services.store.read_signals(SIGNAL))


@pytest.fixture
async def world(services: Services, tmp_path: Path) -> AsyncIterator[World]:
    base = make_market(SYMBOLS, BARS)
    market = Market(base.symbols, (base.ts[0] + np.arange(BARS) * SPACING).astype(TS_DTYPE), base.values,
                    base.close)
    await seed_store(services, tmp_path, market)  # trend:1 in production
    for n_trees in (5, 40):  # trend:2 (the challenger) and trend:3 (a shadow)
        directory = tmp_path / f"v{n_trees}"
        directory.mkdir()
        path = train_lightgbm(directory, "binary", n_trees=n_trees, feature_names=NAMES)
        await services.registry.register(path, name="trend")
    await services.store.set_traffic_policy(
        TrafficPolicy(SIGNAL, champion=1, challenger=2, share=0.5, shadows=(3,), stage="canary"),
        actor="test", action="start")
    bus = MemoryBus()
    await bus.connect()
    names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
    world = World(services, bus, market, names)
    await bus.subscribe(names.signals_all, world.signals)

    async def dead(msg: BusMessage) -> None:
        world.dead.append(msg)

    await bus.subscribe(names.deadletter, dead)
    try:
        yield world
    finally:
        if world.worker is not None:
            await world.worker.stop()
        await bus.close()


async def test_rollout_routes_each_bar_as_predict_bar_and_backfill_and_stores_shadows(world: World) -> None:
    worker = await world.start()
    route = worker.routes[SIGNAL]
    assert route.traffic is not None and route.prepared.rollout is not None
    market = world.market
    for i in range(BARS):
        for symbol in SYMBOLS:
            await world.bus.publish(world.names.subject(f"features.{symbol}.{INTERVAL}"),
                                    market.message(symbol, i))
    total = BARS * len(SYMBOLS)
    published = await world.signals.wait(total)

    async def all_stored() -> bool:  # one served row and two shadows per bar
        return len(await world.rows()) == 3 * total

    await until_async(all_stored, what="served and shadow rows")
    assert not world.dead
    rows = await world.rows()
    served = {(r["symbol"], np.datetime64(r["ts"], "us")): r for r in rows if not r["shadow"]}
    shadows = [r for r in rows if r["shadow"]]
    assert len(served) == total and len(shadows) == 2 * total
    # published: exactly the served rows, never a shadow version
    assert len(published) == total
    by_bar = {(m["symbol"], np.datetime64(m["timestamp_ms"], "ms").astype(TS_DTYPE)): m for m in published}
    assert len(by_bar) == total
    engine = world.services.engine
    versions_seen = set()
    for symbol in SYMBOLS:
        mask = challenger_mask(symbol, market.ts, 0.5)
        # the backfill's routing of the same bars (no write): version per bar
        result = await world.call(lambda symbol=symbol: engine.run_bars(
            SIGNAL, symbol, INTERVAL, market.ts, source="stream", write=False))
        backfill = {t: b.model_version for b in (result.batch, *result.extra) for t in b.ts.astype(np.int64).tolist()}
        for i, ts in enumerate(market.ts):
            row = served[(symbol, ts)]
            want = 2 if mask[i] else 1
            assert row["model_version"] == want == backfill[int(ts.astype(np.int64))], (symbol, i)
            expected = await world.call(lambda symbol=symbol, ts=ts: engine.predict_bar(
                SIGNAL, symbol, INTERVAL, ts, source="stream", write=False))
            for name in COMPARED:
                assert row[name] == expected[name] or (
                    name == "raw_output" and list(row[name]) == expected[name]), (symbol, i, name)
            message = by_bar[(symbol, ts)]
            assert message["model_version"] == f"trend:{want}"
            assert message["signal_type"] == row["action"] and message["confidence_score"] == row["confidence"]
            versions_seen.add(want)
            # the other two versions predicted the same bar as shadows
            mine = {r["model_version"] for r in shadows if r["symbol"] == symbol
                    and np.datetime64(r["ts"], "us") == ts}
            assert mine == {1, 2, 3} - {want}, (symbol, i, mine)
    assert versions_seen == {1, 2}  # the 50% split sends bars to both versions
    assert {m["model_version"] for m in published} == {"trend:1", "trend:2"}
    assert worker.stats["shadow_signals"] == 2 * total and not worker.stats["shadow_write_failed"]


async def test_a_rollout_change_reaches_the_running_worker(world: World) -> None:
    worker = await world.start()
    market = world.market
    symbol = SYMBOLS[0]
    policy = await world.call(lambda: world.services.store.get_traffic_policy(SIGNAL))
    await world.call(lambda: world.services.store.set_traffic_policy(
        replace(policy, champion=2, challenger=None, share=0.0, shadows=(), stage="none"),
        actor="test", action="promote"))
    worker._schedule_rebuild()
    await until(lambda: worker.routes[SIGNAL].prepared.card.version == 2, what="the promoted champion")
    assert worker.routes[SIGNAL].prepared.rollout is None  # a champion alone: no rollout to route
    await world.bus.publish(world.names.subject(f"features.{symbol}.{INTERVAL}"), market.message(symbol, 0))
    (message,) = await world.signals.wait(1)
    assert message["model_version"] == "trend:2"
    await asyncio.sleep(0.2)
    rows = await world.rows()
    assert [(r["model_version"], r["shadow"]) for r in rows] == [(2, False)]


async def test_the_periodic_reload_resolves_only_when_the_catalog_moved(world: World) -> None:
    """``auto_reload`` checks the store's catalog version each interval: an unchanged catalog
    resolves nothing (a re-resolution reads the store and loads versions); a change made in the
    store is picked up by the next tick, with no explicit rebuild."""
    from sigserve.hotconfig import build

    worker = await world.start()
    worker.config.current = build({"model_config": {"reload_interval_s": 0.05}})
    loads = 0
    load_routes = worker._load_routes

    async def counted(**kwargs: Any) -> None:
        nonlocal loads
        loads += 1
        await load_routes(**kwargs)

    worker._load_routes = counted  # type: ignore[method-assign]
    await asyncio.sleep(1.0)  # four housekeeping ticks, each past the interval
    assert loads == 0
    policy = await world.call(lambda: world.services.store.get_traffic_policy(SIGNAL))
    await world.call(lambda: world.services.store.set_traffic_policy(
        replace(policy, champion=2, challenger=None, share=0.0, shadows=(), stage="none"),
        actor="test", action="promote"))
    await until(lambda: worker.routes[SIGNAL].prepared.card.version == 2, what="the promoted champion")
    assert loads == 1
    await asyncio.sleep(0.6)
    assert loads == 1  # loaded at the new version: quiet again


async def test_catch_up_under_a_rollout_publishes_both_versions_and_never_a_shadow(world: World) -> None:
    """Bars stored while no worker ran are computed through the rollout (as backfill) on start."""
    worker = await world.start()
    market = world.market
    half = BARS // 2
    for i in range(half):
        for symbol in SYMBOLS:
            await world.bus.publish(world.names.subject(f"features.{symbol}.{INTERVAL}"),
                                    market.message(symbol, i))
    await world.signals.wait(half * len(SYMBOLS))
    await until(lambda: worker.stats["acked"] >= half * len(SYMBOLS), what="acks")
    await worker.stop()
    world.worker = None
    world.signals.messages.clear()
    worker = await world.start()  # catch-up: the second half, from the stored feature rows
    rest = (BARS - half) * len(SYMBOLS)
    published = await world.signals.wait(rest)
    assert len(published) == rest and worker.stats["catchup_rows"] == rest
    rows = await world.rows()
    served = {(r["symbol"], np.datetime64(r["ts"], "us")): r for r in rows if not r["shadow"]}
    assert len(served) == BARS * len(SYMBOLS)
    for message in published:
        ts = np.datetime64(message["timestamp_ms"], "ms").astype(TS_DTYPE)
        row = served[(message["symbol"], ts)]
        want = 2 if challenger_mask(message["symbol"], np.array([ts]), 0.5)[0] else 1
        assert row["model_version"] == want and message["model_version"] == f"trend:{want}"
        assert row["source"] == "catchup_scan"
    assert {m["model_version"] for m in published} == {"trend:1", "trend:2"}
