"""PostgreSQL only: a bulk load refreshes the planner's statistics of the table it filled.

Without fresh statistics, a point read of a table that was just loaded filtered ts instead of
seeking it in the primary key (16.7 ms against 0.8 ms per live bar on the bench data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
