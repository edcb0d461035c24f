"""Core input (``StreamOptions(input="core")``, ``sigserve stream --input core``) on the local
NATS with JetStream on: the worker takes features from a core subscription, not a durable
consumer, and everything after the input stays.

- core and durable input give the same stored rows and the same published signals for the same
  feature messages; the core worker creates no consumer and never sees a message published
  before it subscribed (at most once), the durable one does (the FEATURES stream's backlog);
- the audit stream still stores every signal once (``Nats-Msg-Id``) and dead letters still go
  to ``features.deadletter``;
- two core workers in a queue group (PostgreSQL) process each bar once;
- a store outage does not crash a core worker: the messages it cannot finish are dropped and
  counted, catch-up computes the lost bars from the store afterwards; a stalled store bounds the
  messages held at ``max_ack_pending`` (the excess is dropped, never queued or published);
- the CLI's ``--input core`` serves and says so; an unknown ``--input`` is refused.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from sigserve.app import Services
from sigserve.bus import BusMessage
from sigserve.bus.nats import NatsBus
from sigserve.config import Settings
from sigserve.errors import StoreUnavailable
from sigserve.hotconfig import LiveConfig
from sigserve.stream import Names, StreamOptions, StreamWorker
from tests.integration.conftest import postgres_url
from tests.integration.test_stream import (
    COMPARED,
    INTERVAL,
    SIGNAL,
    Market,
    Signals,
    _collect,
    cleanup,
    make_market,
    seed_store,
    until,
    until_async,
)
from tests.integration.test_stream_cli import NATS_URL, run, seeded_home, start_worker
from tests.services import require_tcp

LIVE = ("BTCUSDT", "ETHUSDT")
EARLY = "SOLUSDT"  # published before the worker starts: only the durable consumer gets it


def nats_bus() -> NatsBus:
    require_tcp("NATS", "127.0.0.1", 4222)
    return NatsBus(NATS_URL)


async def consumers(stream: str) -> list[str]:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        return sorted(c.name for c in await nc.jetstream().consumers_info(stream))
    finally:
        await nc.close()


def feature_subject(names: Names, symbol: str) -> str:
    return names.subject(f"features.{symbol}.{INTERVAL}")


async def serve(services: Services, bus: NatsBus, market: Market, input_: str, n: int,
                ) -> tuple[StreamWorker, Names, Signals, list[BusMessage]]:
    """A worker with ``input_`` on a prefix of its own; EARLY's bars 0..4 are published (and
    stored by the FEATURES stream) before it starts, LIVE's bars 0..n-1 after."""
    names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
    await bus.ensure_stream(names.stream(names.features_stream), [names.features])
    live, dead = Signals(), []
    await bus.subscribe(names.signals_all, live)
    await bus.subscribe(names.deadletter, _collect(dead))
    for i in range(5):
        await bus.publish(feature_subject(names, EARLY), market.message(EARLY, i))
    await bus.flush()
    await until_async(lambda: _has(bus, names.stream(names.features_stream), 5), 10, "the early bars stored")
    options = StreamOptions(names=names, catchup=False, input=input_)  # type: ignore[arg-type]
    worker = StreamWorker(services, bus, options, LiveConfig(None, bus, bucket=names.config_bucket))
    await worker.start()
    for i in range(n):
        for symbol in LIVE:
            await bus.publish(feature_subject(names, symbol), market.message(symbol, i))
    return worker, names, live, dead


async def _has(bus: NatsBus, stream: str, n: int) -> bool:
    return await bus.stream_count(stream) >= n


def _published(messages: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """The signals by (symbol, ms), without the one field that is a measurement."""
    out = {}
    for m in messages:
        meta = {k: v for k, v in m["metadata"].items() if k != "prediction_latency_ms"}
        out[(m["symbol"], m["timestamp_ms"])] = {**m, "metadata": meta}
    return out


async def test_core_input_gives_the_rows_and_signals_of_durable_input(tmp_path: Path) -> None:
    n = 40
    market = make_market((*LIVE, EARLY), n, seed=21)
    bus = nats_bus()
    await bus.connect()
    rows: dict[str, dict[tuple[str, Any], dict[str, Any]]] = {}
    published: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    try:
        for input_ in ("durable", "core"):
            async with Services.open(Settings(home=tmp_path / input_)) as services:
                await seed_store(services, tmp_path, market, store_features=False)
                worker, names, live, dead = await serve(services, bus, market, input_, n)
                try:
                    assert worker.core is (input_ == "core")
                    expected = len(LIVE) * n + (5 if input_ == "durable" else 0)
                    await live.wait(expected)
                    await until(lambda w=worker, e=expected: w.stats["acked"] >= e, 20, "every message finished")
                    await asyncio.sleep(0.3)  # nothing more comes
                    assert len(live.messages) == expected
                    features = names.stream(names.features_stream)
                    assert await consumers(features) == ([] if input_ == "core" else ["sigserve"])
                    audit = names.stream(names.signals_stream)
                    await until_async(lambda a=audit, e=expected: _has(bus, a, e), 10, "the audit stream")
                    assert await bus.stream_count(audit) == expected
                    if input_ == "core":
                        # a bar sent again: published again with the same id, stored once by the audit stream
                        await bus.publish(feature_subject(names, LIVE[0]), market.message(LIVE[0], 0))
                        await live.wait(expected + 1)
                        assert live.messages[-1]["signal_id"] in {m["signal_id"] for m in live.messages[:-1]}
                        await until(lambda w=worker, e=expected: w.stats["acked"] >= e + 1, 10)
                        assert await bus.stream_count(audit) == expected
                        # a poison message: dead-lettered with its code, stored by the FEATURES stream
                        before = await bus.stream_count(features)
                        await bus.publish(feature_subject(names, LIVE[0]), b"{not json")
                        await until(lambda d=dead: len(d) == 1, 10, "the dead letter")
                        assert orjson.loads(dead[0].data)["error_code"] == "validation_error"
                        await until_async(lambda f=features, b=before: _has(bus, f, b + 2), 10)
                        assert worker.stats["dropped"] == 0 and worker._held == 0
                    stored = await worker.runner.call(lambda s=services: s.store.read_signals(SIGNAL))
                finally:
                    await worker.stop()
                    await cleanup(bus, names)
            rows[input_] = {(r["symbol"], r["ts"]): r for r in stored}
            published[input_] = _published(live.messages[:expected])
    finally:
        await bus.close()
    durable, core = rows["durable"], rows["core"]
    assert sum(1 for s, _ in durable if s == EARLY) == 5 and all(s != EARLY for s, _ in core)
    assert len(core) == len(LIVE) * n
    assert {r["source"] for r in core.values()} == {"stream"}
    for key, row in core.items():
        for name in COMPARED:
            assert row[name] == durable[key][name], (key, name, row[name], durable[key][name])
    assert len({r["action"] for r in core.values()}) >= 2  # a comparison of more than holds
    assert published["core"] == {k: v for k, v in published["durable"].items() if k[0] != EARLY}


async def test_two_core_workers_in_a_queue_group_process_each_bar_once(tmp_path: Path) -> None:
    url = postgres_url(tmp_path)  # this test's schema, dropped after it
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")
    n = 150
    market = make_market(symbols, n, seed=9)
    bus_a, bus_b = nats_bus(), nats_bus()
    await bus_a.connect()
    await bus_b.connect()
    names = Names(prefix=f"t{uuid.uuid4().hex[:8]}")
    group = f"g{uuid.uuid4().hex[:6]}"
    live = Signals()
    await bus_a.subscribe(names.signals_all, live)
    try:
        settings = Settings(home=tmp_path / "home", store=url)
        async with Services.open(settings) as a, Services.open(settings) as b:
            await seed_store(a, tmp_path, market, store_features=False)
            options = StreamOptions(names=names, queue_group=group, catchup=False, input="core")
            workers = [StreamWorker(a, bus_a, options), StreamWorker(b, bus_b, options)]
            for worker in workers:
                await worker.start()
            try:
                for i in range(n):
                    for symbol in symbols:
                        await bus_a.publish(feature_subject(names, symbol), market.message(symbol, i))
                total = n * len(symbols)
                await until(lambda: sum(w.stats["acked"] for w in workers) >= total, 60, "all finished")
                stored = await a.store.read_signals(SIGNAL)
                assert len(stored) == total
                assert sum(w.stats["received"] for w in workers) == total  # each bar to one member
                assert sum(w.stats["signals"] for w in workers) == total
                assert all(w.stats["signals"] > 0 for w in workers)  # both took a share
                await live.wait(total)
                assert len({m["signal_id"] for m in live.messages}) == total
                audit = names.stream(names.signals_stream)
                await until_async(lambda: _has(bus_a, audit, total), 20, "the audit stream")
                assert await bus_a.stream_count(audit) == total
                assert await consumers(names.stream(names.features_stream)) == []
            finally:
                for worker in workers:
                    await worker.stop()
    finally:
        await cleanup(bus_a, names)
        await bus_a.close()
        await bus_b.close()


class FlakyStore:
    """The worker's store, whose writes (and ping) fail while ``down`` is set, and block while
    ``gate`` is clear (on the store's thread)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.down = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def write_signals(self, batch: Any) -> int:
        if self.down.is_set():
            raise StoreUnavailable("the store is down (test)")
        await asyncio.to_thread(self.gate.wait)
        count: int = await self._store.write_signals(batch)
        return count

    async def write_signal_batches(self, batches: Any) -> list[int]:
        if self.down.is_set():
            raise StoreUnavailable("the store is down (test)")
        await asyncio.to_thread(self.gate.wait)
        counts: list[int] = await self._store.write_signal_batches(batches)
        return counts

    async def ping(self) -> None:
        if self.down.is_set():
            raise StoreUnavailable("the store is down (test)")
        await self._store.ping()


@pytest.fixture
async def core_worker(services: Services, tmp_path: Path, request: pytest.FixtureRequest,
                      ) -> AsyncIterator[tuple[StreamWorker, FlakyStore, NatsBus, Names, Signals, Market]]:
    market = make_market(("BTCUSDT",), 200, seed=5)
    await seed_store(services, tmp_path, market)  # features stored: catch-up can compute every bar
    bus = nats_bus()
    await bus.connect()
    names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
    live = Signals()
    await bus.subscribe(names.signals_all, live)
    options = StreamOptions(names=names, input="core", **getattr(request, "param", {}))
    worker = StreamWorker(services, bus, options, LiveConfig(None, bus, bucket=names.config_bucket))
    flaky = FlakyStore(worker.store)
    worker.store = worker.writer.store = flaky  # type: ignore[assignment]
    await worker.start()
    try:
        yield worker, flaky, bus, names, live, market
    finally:
        flaky.down.clear()
        flaky.gate.set()
        await worker.stop()
        await cleanup(bus, names)
        await bus.close()


async def _source_of(worker: StreamWorker, services: Services, ts: np.datetime64) -> str | None:
    rows = await worker.runner.call(lambda: services.store.read_signals(SIGNAL, "BTCUSDT"))
    return next((r["source"] for r in rows if np.datetime64(r["ts"], "us") == ts), None)


async def test_a_store_outage_drops_and_counts_core_messages_and_catch_up_recovers_them(
        core_worker: Any, services: Services) -> None:
    worker, flaky, bus, names, live, market = core_worker
    subject = feature_subject(names, "BTCUSDT")
    for i in range(10):
        await bus.publish(subject, market.message("BTCUSDT", i))
    await until(lambda: worker.stats["acked"] >= 10, 20, "the first 10 finished")
    flaky.down.set()
    for i in range(10, 40):
        await bus.publish(subject, market.message("BTCUSDT", i))
        await asyncio.sleep(0.005)
    await until(lambda: worker.stats["dropped"] == 30, 20, "30 dropped")
    assert worker.stats["store_outages"] == 1 and worker._paused
    assert worker.started.is_set() and all(not t.done() for t in worker._tasks)  # alive
    assert worker._held == 0 and not worker._inbox  # nothing queued while the store is down
    assert worker.stats["acked"] == 10
    flaky.down.clear()
    # the store answers: catch-up computes every stored bar after the newest stored signal
    await until(lambda: worker.stats["catchup_rows"] >= 190, 30, "the catch-up")
    assert not worker._paused
    for i in (10, 25, 39):
        assert await _source_of(worker, services, market.ts[i]) == "catchup_scan"
    assert await _source_of(worker, services, market.ts[9]) == "stream"
    before = len(live.messages)
    await bus.publish(subject, market.message("BTCUSDT", 199))  # live again
    await live.wait(before + 1)
    await until(lambda: worker.stats["acked"] == 11, 10)


@pytest.mark.parametrize("core_worker", [{"max_ack_pending": 20, "catchup": False}], indirect=True)
async def test_a_stalled_store_bounds_the_messages_a_core_worker_holds(core_worker: Any) -> None:
    worker, flaky, bus, names, live, market = core_worker
    subject = feature_subject(names, "BTCUSDT")
    for i in range(5):
        await bus.publish(subject, market.message("BTCUSDT", i))
    await until(lambda: worker.stats["acked"] >= 5, 20, "the first 5 finished")
    flaky.gate.clear()  # writes hang: nothing finishes
    for i in range(5, 105):
        await bus.publish(subject, market.message("BTCUSDT", i))
    await until(lambda: worker.stats["dropped"] == 80, 20, "80 dropped")
    await live.wait(25)
    await asyncio.sleep(0.3)
    assert worker._held == 20 and len(live.messages) == 25  # 20 held (and published), 80 never
    assert worker.stats["received"] == 25
    flaky.gate.set()
    await until(lambda: worker.stats["acked"] == 25, 20, "the held ones finished")
    assert worker._held == 0 and worker.stats["dropped"] == 80
    await bus.publish(subject, market.message("BTCUSDT", 150))
    await live.wait(26)


async def test_stream_command_input_core_serves_and_an_unknown_input_is_refused(tmp_path: Path) -> None:
    refused = await asyncio.to_thread(run, "stream", "--input", "fast", home=tmp_path / "nothing")
    assert refused.returncode == 2
    assert refused.stderr.startswith("validation_error: Invalid value for '--input'"), refused.stderr
    assert "'durable', 'core'" in refused.stderr and "Traceback" not in refused.stderr
    require_tcp("NATS", "127.0.0.1", 4222)
    home, market = await seeded_home(tmp_path)
    names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
    bus = nats_bus()
    await bus.connect()
    live = Signals()
    await bus.subscribe(names.signals_all, live)
    worker = start_worker(home, names.prefix, "--input", "core", "--no-catchup")
    try:
        assert worker.stdout is not None
        line = await asyncio.to_thread(worker.stdout.readline)
        assert "streaming" in line and "(core input: at most once)" in line, line
        for i in range(20):
            await bus.publish(feature_subject(names, "BTCUSDT"), market.message("BTCUSDT", i))
        await live.wait(20)
        assert await consumers(names.stream(names.features_stream)) == []
    finally:
        worker.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(worker.communicate, timeout=60)
        await cleanup(bus, names)
        await bus.close()
    assert worker.returncode == 0, err
    assert "core input: features come from a core-NATS subscription, at most once" in err
    assert "'acked': 20" in out and "dropped" not in out
