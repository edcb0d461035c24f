"""The stream worker under faults, counted end to end.

- nats-server (our own, on a free port, file storage) is killed with SIGKILL and restarted in
  the middle of a stream: every published feature gives exactly one stored row and exactly one
  message in the audit stream; nothing is lost, nothing duplicated;
- the database (a throwaway PostgreSQL cluster) stops: the worker stops acking, does not crash,
  and drains the backlog once the database is back;
- two workers in one queue group on PostgreSQL share the load; each bar is processed once;
- the Kafka sink archives every published signal (only with SIGSERVE_KAFKA_BOOTSTRAP).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sigserve.app import Services
from sigserve.bus import Bus
from sigserve.bus.nats import NatsBus
from sigserve.config import Settings
from sigserve.errors import BusUnavailable
from sigserve.stream import Names, StreamOptions, StreamWorker
from tests.integration.test_postgres_outage import Cluster, cluster, cluster_once  # noqa: F401  (fixtures)
from tests.integration.test_stream import (
    INTERVAL,
    SIGNAL,
    Signals,
    cleanup,
    make_market,
    seed_store,
    until,
    until_async,
)
from tests.services import require_tcp, unavailable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """A nats-server of this test's own (JetStream, file storage under a temp directory)."""

    def __init__(self) -> None:
        binary = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server")
                                                 else None)
        if binary is None:
            unavailable("nats-server not found on PATH: install it to run the NATS fault tests")
        self.binary = binary
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sigserve-nats-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.root / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                          "-sd", str(self.root / "js")], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nats-server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def destroy(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


async def publish_reliably(bus: Bus, subject: str, data: bytes, msg_id: str, deadline_s: float = 60) -> None:
    """An upstream publisher: retry until the stream confirms it (the msg id makes retries safe)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            await asyncio.wait_for(await bus.publish_durable(subject, data, msg_id=msg_id), 3)
            return
        except (BusUnavailable, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_nats_killed_and_restarted_mid_stream_loses_and_duplicates_nothing(
        nats_server: NatsServer, services: Services, tmp_path: Path) -> None:
    n = 2_000
    market = make_market(("BTCUSDT",), n, seed=5)
    await seed_store(services, tmp_path, market, store_features=False)
    names = Names(prefix=f"t{uuid.uuid4().hex[:8]}")
    bus, upstream = NatsBus(nats_server.url), NatsBus(nats_server.url)
    await bus.connect()
    await upstream.connect()
    worker = StreamWorker(services, bus, StreamOptions(names=names, ack_wait_s=3.0, catchup=False))
    await worker.start()
    subject = names.subject(f"features.BTCUSDT.{INTERVAL}")
    killed = False
    try:
        for i in range(n):
            if i == n // 2:
                nats_server.kill()  # SIGKILL: no goodbye to anyone
                killed = True
                await asyncio.sleep(1.0)
                nats_server.start()
            await publish_reliably(upstream, subject, market.message("BTCUSDT", i), f"BTCUSDT.{i}")
        assert killed and worker.stats["reconnects"] >= 1

        async def rows() -> int:
            return len(await worker.runner.call(lambda: services.store.read_signals(SIGNAL)))

        audit = names.stream(names.signals_stream)
        await until_async(lambda: _equals(rows, n), 90, f"{n} stored rows")
        await until_async(lambda: _stream_at_least(bus, audit, n), 60, f"{n} audit messages")
        await until(lambda: worker.stats["acked"] >= n, 60, "every message acked")
        await asyncio.sleep(4)  # longer than ack_wait: anything unacked would come back now
        stored = await worker.runner.call(lambda: services.store.read_signals(SIGNAL))
        assert len(stored) == n and len({r["ts"] for r in stored}) == n
        assert await bus.stream_count(audit) == n  # once each: Nats-Msg-Id = the upsert key
        assert await bus.stream_count(names.stream(names.features_stream)) == n
        assert worker.stats["deadlettered"] == 0 and worker.stats["batch_errors"] == 0
    finally:
        await worker.stop()
        await cleanup(bus, names)
        await upstream.close()
        await bus.close()


async def _equals(fn: Any, n: int) -> bool:
    return bool(await fn() == n)


async def _stream_at_least(bus: Bus, stream: str, n: int) -> bool:
    try:
        return await bus.stream_count(stream) >= n
    except BusUnavailable:
        return False


# --- PostgreSQL -----------------------------------------------------------------------------------
@pytest.fixture
def pg_cluster(cluster: Cluster) -> Cluster:  # noqa: F811  (the imported fixture)
    """A throwaway PostgreSQL cluster of our own (the outage tests' fixture): stopping it leaves
    the shared server alone. Each test writes its own schema."""
    return cluster


def nats_bus() -> NatsBus:
    require_tcp("NATS", "127.0.0.1", 4222)
    return NatsBus("nats://127.0.0.1:4222")


@contextlib.asynccontextmanager
async def pg_services(tmp_path: Path, url: str) -> AsyncIterator[Services]:
    settings = Settings(home=tmp_path / "home", store=url)
    async with Services.open(settings) as services:
        yield services


async def test_database_outage_stops_acks_and_the_backlog_drains_after(pg_cluster: Any, tmp_path: Path) -> None:
    url = f"{pg_cluster.url}?schema=stream&connect_timeout=2&pool_max=4"
    market = make_market(("BTCUSDT",), 400, seed=8)
    bus = nats_bus()
    await bus.connect()
    names = Names(prefix=f"t{uuid.uuid4().hex[:8]}")
    live = Signals()
    await bus.subscribe(names.signals_all, live)
    subject = names.subject(f"features.BTCUSDT.{INTERVAL}")
    try:
        async with pg_services(tmp_path, url) as services:
            await seed_store(services, tmp_path, market, store_features=False)
            worker = StreamWorker(services, bus, StreamOptions(names=names, catchup=False, ack_wait_s=5.0))
            await worker.start()
            try:
                for i in range(100):
                    await bus.publish(subject, market.message("BTCUSDT", i))
                await until(lambda: worker.stats["acked"] >= 100, 30, "the first 100 acked")
                pg_cluster.stop("immediate")
                for i in range(100, 400):
                    await bus.publish(subject, market.message("BTCUSDT", i))
                await until(lambda: worker.stats["store_outages"] >= 1, 30, "the outage noticed")
                await asyncio.sleep(3)
                acked_while_down = worker.stats["acked"]
                assert acked_while_down < 400  # nothing is acked without its row
                assert worker.started.is_set() and all(not t.done() for t in worker._tasks)  # alive
                pg_cluster.start()
                await until(lambda: worker.stats["acked"] >= 400, 90, "the backlog drained")
                rows = await services.store.read_signals(SIGNAL)
                assert len(rows) == 400 and len({r["ts"] for r in rows}) == 400
                audit = names.stream(names.signals_stream)
                await until_async(lambda: _stream_at_least(bus, audit, 400), 30)
                assert await bus.stream_count(audit) == 400
                assert worker.stats["deadlettered"] == 0
                assert worker.stats["naked"] > 0
            finally:
                await worker.stop()
    finally:
        await cleanup(bus, names)
        await bus.close()


async def test_two_workers_in_a_queue_group_share_the_load_each_bar_once(pg_cluster: Any, tmp_path: Path) -> None:
    url = f"{pg_cluster.url}?schema=group&pool_max=4"
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")
    n = 300
    market = make_market(symbols, n, seed=9)
    bus_a, bus_b = nats_bus(), nats_bus()
    await bus_a.connect()
    await bus_b.connect()
    names = Names(prefix=f"t{uuid.uuid4().hex[:8]}")
    group = f"g{uuid.uuid4().hex[:6]}"
    try:
        async with pg_services(tmp_path, url) as a, pg_services(tmp_path, url) as b:  # one artifact dir
            await seed_store(a, tmp_path, market, store_features=False)
            options = StreamOptions(names=names, queue_group=group, catchup=False)
            workers = [StreamWorker(a, bus_a, options), StreamWorker(b, bus_b, options)]
            for worker in workers:
                await worker.start()
            try:
                for i in range(n):
                    for symbol in symbols:
                        await bus_a.publish(names.subject(f"features.{symbol}.{INTERVAL}"),
                                            market.message(symbol, i))
                total = n * len(symbols)
                await until(lambda: sum(w.stats["acked"] for w in workers) >= total, 60, "all acked")
                rows = await a.store.read_signals(SIGNAL)
                assert len(rows) == total
                assert sum(w.stats["signals"] for w in workers) == total  # each bar once
                assert all(w.stats["signals"] > 0 for w in workers)  # both took a share
                assert await bus_a.stream_count(names.stream(names.signals_stream)) == total
            finally:
                for worker in workers:
                    await worker.stop()
    finally:
        await cleanup(bus_a, names)
        await bus_a.close()
        await bus_b.close()


# --- Kafka ---------------------------------------------------------------------------------------------
async def test_kafka_sink_archives_every_published_signal(services: Services, tmp_path: Path) -> None:
    bootstrap = os.environ.get("SIGSERVE_KAFKA_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("SIGSERVE_KAFKA_BOOTSTRAP is not set: no Kafka broker to test the archive sink against")
    from aiokafka import AIOKafkaConsumer

    market = make_market(("BTCUSDT",), 50, seed=2)
    await seed_store(services, tmp_path, market, store_features=False)
    bus = nats_bus()
    await bus.connect()
    names = Names(prefix=f"t{uuid.uuid4().hex[:8]}")
    topic = f"trading_signals_archive_{names.prefix}"
    worker = StreamWorker(services, bus, StreamOptions(names=names, catchup=False, kafka_bootstrap=bootstrap,
                                                       kafka_topic=topic))
    await worker.start()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"test-{names.prefix}")
    await consumer.start()
    try:
        for i in range(50):
            await bus.publish(names.subject(f"features.BTCUSDT.{INTERVAL}"), market.message("BTCUSDT", i))
        await until(lambda: worker.kafka.stats["sent"] >= worker.stats["published"] >= 50, 60)
        got: set[str] = set()
        deadline = time.monotonic() + 30
        while len(got) < 50 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                got.update(orjson.loads(r.value)["signal_id"] for r in records)
        assert len(got) == 50
        assert worker.kafka.stats["dropped"] == 0
    finally:
        await consumer.stop()
        await worker.stop()
        await cleanup(bus, names)
        await bus.close()


