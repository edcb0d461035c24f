"""Rollouts across processes on the shared PostgreSQL store: a change made by another process
(the ``sigserve rollout`` CLI) reaches a running server within its prepared TTL, under load, and
a rollback made through the server's admin endpoint takes effect on the next request."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.http_world import BTC, SIGNAL, World, build_world, serving, settings_for
from tests.e2e.test_http_postgres import _drop_schema, _with_schema
from tests.services import require_postgres_url

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
TTL = 0.5


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, str]]:
    url = require_postgres_url()
    schema = f"rollout_e2e_{uuid.uuid4().hex[:10]}"
    store = _with_schema(url, schema)
    world = build_world(tmp_path_factory.mktemp("rollout-pg-world"), store_url=store)
    try:
        yield world, store
    finally:
        _drop_schema(url, schema)


def _cli(world: World, store: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGSERVE_")}
    subprocess.run([sys.executable, "-m", "sigserve", "--home", str(world.home), "--store", store,
                    "rollout", *args], check=True, capture_output=True, env=env, timeout=60)


async def test_cli_change_reaches_a_running_server_within_the_ttl(pg_world: tuple[World, str]) -> None:
    world, store = pg_world
    async with serving(settings_for(world.home, store=store, server_prepared_ttl_s=TTL)) as (_, client):
        seen: list[tuple[float, int]] = []
        failures: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            i = 100
            while not stop.is_set():
                r = await client.post("/api/v1/predict", json={
                    "symbol": BTC, "timestamp": world.t(i), "features": world.feature_dict(BTC, i)})
                if r.status_code == 200:
                    seen.append((time.perf_counter(), r.json()["metadata"]["model_version"]))
                else:
                    failures.append(r.text)
                i = 100 + (i + 1) % 200
                await asyncio.sleep(0.001)

        worker = asyncio.create_task(load())
        await asyncio.sleep(0.3)
        # another process: all traffic to version 2
        await asyncio.to_thread(_cli, world, store, "start", SIGNAL, "--version", "2", "--share", "1")
        changed = time.perf_counter()
        await asyncio.sleep(TTL + 0.5)
        first = next((t for t, v in seen if t > changed and v == 2), None)
        assert first is not None and first - changed <= TTL + 0.25, (first, changed)
        # through this server's admin endpoint: the very next request
        began = time.perf_counter()
        r = await client.post(f"/admin/rollouts/{SIGNAL}/rollback")
        answered = time.perf_counter()
        assert r.status_code == 200
        await asyncio.sleep(0.2)
        stop.set()
        await worker
        after = [v for t, v in seen if t > answered]
        assert after and set(after) == {1}
        assert answered - began < 1.0
        assert failures == []
        status: dict[str, Any] = (await client.get(f"/admin/rollouts/{SIGNAL}")).json()
        assert [e["actor"].split(":")[0] for e in status["events"]] == ["cli", "token"]
