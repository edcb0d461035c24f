"""The HTTP service on the PostgreSQL store.

- The shared development PostgreSQL (a schema per run): the one-bar, backfill and predict
  endpoints give the same rows as on DuckDB's world.
- A throwaway cluster stopped under the running app: /readyz goes 503 and requests get
  ``store_unavailable`` (never a 500, never a hang past the budget); once the server is back the
  same app answers again, with no restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.http_world import BARS, BTC, INTERVAL, SIGNAL, World, build_world, serving, settings_for
from tests.services import require_executables, require_postgres_url

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _with_schema(url: str, schema: str, extra: str = "") -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}{extra}"


def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    async def drop() -> None:
        connection = await asyncpg.connect(url.split("?")[0])
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()

    asyncio.run(drop())


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, str]]:
    url = require_postgres_url()
    schema = f"http_e2e_{uuid.uuid4().hex[:10]}"
    store = _with_schema(url, schema)
    world = build_world(tmp_path_factory.mktemp("http-pg-world"), store_url=store)
    try:
        yield world, store
    finally:
        _drop_schema(url, schema)


async def test_endpoints_on_postgresql_agree_with_duckdb(pg_world: tuple[World, str], world: World,
                                                        home: Path) -> None:
    pg, store = pg_world
    bars = [100, 250, BARS - 1]
    rows = {}
    for name, settings in (("postgresql", settings_for(pg.home, store=store)),
                           ("duckdb", settings_for(home))):
        async with serving(settings) as (_, client):
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            got = []
            for i in bars:
                r = await client.post("/inference/run", json={
                    "signal_id": SIGNAL, "symbol": BTC, "ts": world.t(i), "interval_name": INTERVAL})
                assert r.status_code == 200, (name, r.text)
                got.append(r.json())
            r = await client.post("/api/v1/predict", json={"symbol": BTC})
            assert r.status_code == 200 and r.json()["metadata"]["timestamp"] == world.t(BARS - 1)
            r = await client.post("/inference/backfill", json={
                "signal_id": SIGNAL, "symbol": BTC, "interval_name": INTERVAL,
                "start": world.t(0), "end": world.t(BARS - 1)})
            assert r.status_code == 200, r.text
            got.append({k: v for k, v in r.json().items() if k not in ("elapsed_s", "bars_per_s")})
            rows[name] = [{k: v for k, v in row.items() if k != "latency_ms"} for row in got]
    assert rows["postgresql"] == rows["duckdb"]


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[tuple[Any, World, str]]:
    """A throwaway cluster (stopped and started by the test) with the world in it."""
    from tests.integration.test_postgres_outage import Cluster

    server = Cluster(require_executables("initdb", "pg_ctl"))
    try:
        server.init()
        server.start()
        store = _with_schema(server.url, "outage", "&connect_timeout=2")
        yield server, build_world(tmp_path / "world", store_url=store), store
    finally:
        server.destroy()


async def test_database_goes_away_and_comes_back(outage: tuple[Any, World, str]) -> None:
    cluster, built, store = outage
    run = {"signal_id": SIGNAL, "symbol": BTC, "ts": built.t(200), "interval_name": INTERVAL}
    async with serving(settings_for(built.home, store=store, deadline_ms=5_000)) as (_, client):
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/inference/run", json=run)).status_code == 200

        cluster.stop()
        started = time.perf_counter()
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["error_code"] == "store_unavailable", r.text
        assert r.json()["details"]["checks"]["store"] != "ok"
        for request in (client.post("/inference/run", json=run),
                        client.post("/api/v1/predict", json={"symbol": BTC}),
                        client.get("/models")):
            r = await request
            assert r.status_code == 503, r.text
            assert r.json()["error_code"] == "store_unavailable"
        assert time.perf_counter() - started < 30
        assert (await client.get("/healthz")).status_code == 200

        cluster.start()
        for _ in range(20):  # a pooled connection that died unseen may answer unavailable once
            r = await client.get("/readyz")
            if r.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200, r.text
        r = await client.post("/inference/run", json=run)
        assert r.status_code == 200, r.text
