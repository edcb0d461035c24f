"""PostgreSQL only: a bulk load refreshes the planner's statistics of the table it filled.

Without fresh statistics, a point read of a table that was just loaded filtered ts instead of
seeking it in the primary key (16.7 ms against 0.8 ms per live bar on the bench data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sigserve.stores import Candles
from tests.integration.conftest import postgres, postgres_schema

T0 = np.datetime64("2024-01-01T00:00:00", "us")


async def analyzed(store: object, table: str, schema: str) -> bool:
    async with store._connection() as con:  # type: ignore[attr-defined]
        stamp = await con.fetchval(
            "SELECT coalesce(last_analyze, last_autoanalyze) FROM pg_stat_user_tables"
            " WHERE schemaname = $1 AND relname = $2", schema, table)
    return stamp is not None


async def test_bulk_writes_refresh_statistics_small_ones_do_not(tmp_path: Path) -> None:
    store = await postgres(tmp_path)
    schema = postgres_schema(tmp_path)
    try:
        ts = T0 + np.arange(12_000) * np.timedelta64(60, "s")
        prices = np.linspace(100.0, 110.0, ts.size)
        await store.write_candles("BTC", "1m", Candles(ts[:10], prices[:10], prices[:10] + 1, prices[:10] - 1,
                                                       prices[:10], np.ones(10)))
        assert not await analyzed(store, "candles", schema)  # a handful of rows: no ANALYZE
        await store.write_candles("BTC", "1m", Candles(ts, prices, prices + 1, prices - 1, prices,
                                                       np.ones(ts.size)))
        assert await analyzed(store, "candles", schema)
        await store.register_features(["a", "b"])
        await store.write_features("1m", "k", ("a", "b"), np.full(ts.size, "BTC", dtype=object), ts,
                                   np.column_stack([prices, prices]))
        assert await analyzed(store, "feature_values", schema)
    finally:
        await store.close()


async def test_live_statements_run_one_generic_plan_made_after_the_load(tmp_path: Path) -> None:
    # The one-bar read is prepared while the table is empty, then the table is bulk loaded: the
    # statement keeps running generic plans (no planning per call), and the load's ANALYZE made
    # PostgreSQL re-plan it, so the plan in use seeks the primary key.
    store = await postgres(tmp_path)
    try:
        async with store._connection() as con:
            if con.get_server_version() < (14, 0):
                pytest.skip("pg_prepared_statements counts plans from PostgreSQL 14 on")
        await store.register_features(["a", "b"])
        names = ("a", "b")
        assert len((await store.read_bar("BTC", "1m", names, T0, position=("s", 1)))[0].batch) == 0
        ts = T0 + np.arange(12_000) * np.timedelta64(60, "s")
        values = np.column_stack([np.arange(ts.size, dtype=float), -np.arange(ts.size, dtype=float)])
        await store.write_features("1m", "k", names, np.full(ts.size, "BTC", dtype=object), ts, values)
        for i in (5, 500, 5_000, 11_999, 7):
            read, side = await store.read_bar("BTC", "1m", names, ts[i], position=("s", 1))
            assert read.batch.values.tolist() == [[float(i), -float(i)]] and side == 0
        async with store._connection() as con:  # the lane's connection: the one that ran them
            generic, custom = await con.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE 'WITH f AS (SELECT DISTINCT ON (ts)%'")
            plan = "\n".join(r[0] for r in await con.fetch(
                "EXPLAIN SELECT ts FROM feature_values WHERE symbol = 'BTC' AND interval = '1m'"
                " AND ts = ANY(ARRAY[now()::timestamp])"))
        assert custom == 0 and generic >= 6, (generic, custom)
        assert "feature_values_pkey" in plan, plan
    finally:
        await store.close()
