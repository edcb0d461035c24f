"""The PostgreSQL store's server lifecycle (issue 3), on a throwaway cluster.

A cluster (``initdb`` + ``pg_ctl`` on a free port) is stopped under an open store: every call
answers ``store_unavailable`` (never hangs, never an internal error), and once the server is back
the same store object answers again, without being reopened. Several processes starting together
on a fresh schema apply the migrations once (advisory lock) and never hand out a version twice.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sigserve.domain import ACTION_CODE, ModelCard, SignalBatch, Task
from sigserve.errors import StoreUnavailable
from sigserve.stores.postgres_store import MIGRATIONS, PostgresStore
from tests.services import require_executables, unavailable

T0 = np.datetime64("2024-01-01T00:00:00", "us")
HOUR = np.timedelta64(3_600_000_000, "us")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """A PostgreSQL cluster in a temporary directory, owned by the ``postgres`` OS user when
    the tests run as root (initdb refuses root)."""

    def __init__(self, tools: dict[str, str]) -> None:
        self.tools = tools
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sigserve-pg-"))
        self.data = self.root / "data"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                unavailable("running as root and there is no 'postgres' OS user to run initdb as")
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.root, ignore_errors=True)
                unavailable("running as root and runuser is missing: cannot run initdb as postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.prefix = [runuser, "-u", "postgres", "--"]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}):"
                               f" {result.stdout[-2000:]}{result.stderr[-2000:]}")

    def init(self) -> None:
        self._run(self.tools["initdb"], "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
                   " -c full_page_writes=off")
        self._run(self.tools["pg_ctl"], "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")

    def ensure_running(self) -> None:
        """Start the server if an earlier test left it stopped."""
        status = subprocess.run([*self.prefix, self.tools["pg_ctl"], "-D", str(self.data), "status"],
                                capture_output=True, timeout=60, check=False)
        if status.returncode != 0:
            self.start()

    def stop(self, mode: str = "fast") -> None:
        self._run(self.tools["pg_ctl"], "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.prefix, self.tools["pg_ctl"], "-D", str(self.data), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_once() -> Iterator[Cluster]:
    tools = require_executables("initdb", "pg_ctl")
    server = Cluster(tools)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def cluster(cluster_once: Cluster) -> Cluster:
    cluster_once.ensure_running()
    return cluster_once


def signals(hours: list[int]) -> SignalBatch:
    n = len(hours)
    ts = T0 + np.asarray(hours) * HOUR
    return SignalBatch(
        signal_id="sig", symbol="BTC", interval="1h", model_name="m", model_version=1,
        model_sha256="cd" * 32, source="stream", ts=ts,
        action=np.full(n, ACTION_CODE["buy"], dtype=np.int8), confidence=np.full(n, 0.7),
        raw_output=np.tile([0.3, 0.7], (n, 1)), entry_price=np.full(n, 100.0),
        stop_loss=np.full(n, 98.0), take_profit=np.full(n, 104.0), recommended_size=np.ones(n),
        feature_keys=np.array(["k"] * n, dtype=object), latency_ms=np.ones(n),
        flags=np.array([""] * n, dtype=object))


async def write_features(store: PostgresStore, hours: list[int], scale: float) -> None:
    ts = T0 + np.asarray(hours) * HOUR
    await store.write_features("1h", "k", ("a",), np.array(["BTC"] * len(hours), dtype=object), ts,
                               np.asarray(hours, dtype=np.float64)[:, None] * scale)


async def test_store_answers_unavailable_while_down_and_recovers(cluster: Cluster) -> None:
    store = PostgresStore(f"{cluster.url}?schema=outage&connect_timeout=3&pool_max=4")
    await store.open()
    try:
        await write_features(store, [0, 1, 2], 1.0)
        await store.write_signals(signals([0]))
        await store.ping()

        cluster.stop()
        with pytest.raises(StoreUnavailable) as down:
            await store.ping()
        assert down.value.code == "store_unavailable" and down.value.http_status == 503
        with pytest.raises(StoreUnavailable):
            await store.read_features("BTC", "1h", ("a",))
        with pytest.raises(StoreUnavailable):
            await store.write_signals(signals([1, 2]))
        # Many calls at once, more than the pool holds: each answers, none wedges the pool.
        results = await asyncio.wait_for(asyncio.gather(
            *(store.last_signal_ts("sig", "BTC", "1h") for _ in range(10)), return_exceptions=True),
            timeout=30)
        assert all(isinstance(r, StoreUnavailable) for r in results), results

        cluster.start()
        await store.ping()  # the same object, not reopened
        read = await store.read_features("BTC", "1h", ("a",))
        assert read.batch.values[:, 0].tolist() == [0.0, 1.0, 2.0]
        assert await store.write_signals(signals([1, 2])) == 2
        assert len(await store.read_signals("sig")) == 3
        await write_features(store, [3], 2.0)
        assert await store.feature_window_stats("BTC", "1h", None, None) == (4, T0, T0 + 3 * HOUR)
        # Every pooled connection recovers, not only the first.
        counts = await asyncio.gather(*(store.signal_action_counts("sig") for _ in range(8)))
        assert all(c == {"buy": 3} for c in counts)
    finally:
        await store.close()


async def test_server_killed_mid_use_then_back(cluster: Cluster) -> None:
    store = PostgresStore(f"{cluster.url}?schema=crash&connect_timeout=3")
    await store.open()
    try:
        await store.register_features(["a"])
        cluster.stop("immediate")  # a crash: no goodbye to the clients
        with pytest.raises(StoreUnavailable):
            await store.feature_statuses(["a"])
        cluster.start()
        for _ in range(3):  # a connection that died unseen may answer unavailable once
            try:
                assert await store.feature_statuses(["a"]) == {"a": "registered"}
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the store did not recover after the server came back")
    finally:
        await store.close()


async def test_open_against_a_dead_port_is_unavailable() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres?connect_timeout=2")
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert info.value.code == "store_unavailable"
    with pytest.raises(StoreUnavailable):
        await store.ping()  # never opened: unavailable, not an internal error


async def test_concurrent_startup_migrates_once_and_versions_stay_unique(cluster: Cluster) -> None:
    import asyncpg

    stores = [PostgresStore(f"{cluster.url}?schema=race&pool_max=3") for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        card = ModelCard(name="m", version=0, flavor="lightgbm", sha256=None, artifact_path=None,
                         task=Task.BINARY, feature_names=("a",), classes=("down", "up"))
        inserted = await asyncio.gather(*(store.insert_model(card) for store in stores for _ in range(3)))
        assert sorted(c.version for c in inserted) == list(range(1, 13))
        # Writers racing on the same new keys: each batch lands whole, one row per key, no error.
        for round_ in range(3):
            hours = list(range(round_ * 50, round_ * 50 + 400))
            written = await asyncio.gather(
                *(write_features(store, hours, float(i + 1)) for i, store in enumerate(stores)),
                *(store.write_signals(signals(hours)) for store in stores))
            assert written[len(stores):] == [len(hours)] * len(stores)
        read = await stores[0].read_features("BTC", "1h", ("a",))
        assert read.batch.ts.tolist() == (T0 + np.arange(500) * HOUR).tolist()
        scale = read.batch.values[1:, 0] / np.arange(1, 500)
        assert set(np.unique(scale)) <= {1.0, 2.0, 3.0, 4.0}
        assert len(await stores[0].read_signals("sig")) == 500
        con = await asyncpg.connect(cluster.url)
        try:
            # each migration applied once, by one of the four racing stores
            applied = [r[0] for r in await con.fetch("SELECT version FROM race.schema_migrations ORDER BY 1")]
            assert applied == [version for version, _ in MIGRATIONS]
        finally:
            await con.close()
    finally:
        await asyncio.gather(*(store.close() for store in stores))
