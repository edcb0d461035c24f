"""PostgreSQL only: the lane of connections kept out of asyncpg's pool between calls.

A cleanly ended call keeps its connection in the lane (bounded, never the pool's last one); a
call that fails or is cancelled gives its connection back to the pool; a lane connection that the
server dropped while it waited is discarded, and the next call is served by a fresh one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sigserve.errors import SigserveError
from tests.integration.conftest import postgres
from tests.services import require_postgres_url


async def _backend_pid(store: object) -> int:
    async with store._connection() as con:  # type: ignore[attr-defined]
        return int(await con.fetchval("SELECT pg_backend_pid()"))


async def test_clean_calls_keep_their_connections_up_to_the_lane_size(tmp_path: Path) -> None:
    store = await postgres(tmp_path)  # pool_max=4: a lane of 3
    try:
        assert store._lane_size == 3  # type: ignore[attr-defined]
        first = await _backend_pid(store)
        assert await _backend_pid(store) == first  # the same connection again, from the lane
        pids = await asyncio.gather(*(_backend_pid(store) for _ in range(4)))  # the pool's whole size
        assert len(set(pids)) == 4
        assert len(store._lane) == 3  # type: ignore[attr-defined]
        assert await store.schema_version() > 0
    finally:
        await store.close()


async def test_a_failed_or_cancelled_call_gives_its_connection_back_to_the_pool(tmp_path: Path) -> None:
    store = await postgres(tmp_path)
    try:
        await _backend_pid(store)
        assert len(store._lane) == 1  # type: ignore[attr-defined]
        with pytest.raises(SigserveError):
            async with store._connection() as con:  # type: ignore[attr-defined]
                await con.execute("SELECT 1/0")
        assert store._lane == []  # type: ignore[attr-defined]

        async def slow() -> None:
            async with store._connection() as con:  # type: ignore[attr-defined]
                await con.execute("SELECT pg_sleep(5)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store._lane == []  # type: ignore[attr-defined]
        # the pool cleaned the cancelled connection up: every call works again
        assert await store.schema_version() > 0
        assert len(store._lane) == 1  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_a_lane_connection_the_server_dropped_is_replaced(tmp_path: Path) -> None:
    store = await postgres(tmp_path)
    try:
        pid = await _backend_pid(store)
        assert len(store._lane) == 1  # type: ignore[attr-defined]
        import asyncpg

        other = await asyncpg.connect(require_postgres_url())
        try:  # another session ends the lane's connection, as a server restart would
            assert await other.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await other.close()
        await asyncio.sleep(0.3)  # the client sees the socket close
        assert await store.schema_version() > 0
        assert await _backend_pid(store) != pid
    finally:
        await store.close()


async def test_warm_up_opens_and_primes_connections_and_writes_nothing(tmp_path: Path) -> None:
    from tests.integration.test_store_contract import batch

    store = await postgres(tmp_path)
    try:
        await store.write_signals(batch([0, 1], ["buy", "hold"]))
        before = await store.read_signals("sig")
        await store.warm_up(connections=2)  # type: ignore[attr-defined]
        assert len(store._lane) == 2  # type: ignore[attr-defined]
        for con in store._lane:  # type: ignore[attr-defined]
            # the staged write's statements are in the driver's cache, and staging is empty
            assert len(con._stmt_cache) >= 3 and await con.fetchval("SELECT count(*) FROM _in_signals") == 0
        assert await store.read_signals("sig") == before
        assert await store.write_signal_batches([batch([2, 3], ["sell", "hold"]),
                                                 batch([0], ["sell"], symbol="ETH")]) == [2, 1]
        assert len(await store.read_signals("sig")) == 5
    finally:
        await store.close()
