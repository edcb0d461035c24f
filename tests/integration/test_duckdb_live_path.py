"""The DuckDB store's live path (one bar read, one signal upserted, one position read) runs on
plain parameters: a serving process never imports pyarrow or pandas for it (their import was
~0.3 s of a server's cold start), nor numpy.ma where no value is NULL. Bulk paths keep Arrow,
imported when first used. With the signal journal (the default on a file) the write is an append
to the journal; the journal's applier writes grouped rows through Arrow, off the request path."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sigserve.domain import ACTION_CODE, SignalBatch
from sigserve.stores import Candles, DuckDBStore

T0 = np.datetime64("2024-01-01T00:00:00", "us")
HOUR = np.timedelta64(3_600_000_000, "us")


def one_signal(hour: int, action: str) -> SignalBatch:
    return SignalBatch(
        signal_id="sig", symbol="BTC", interval="1h", model_name="m", model_version=1,
        model_sha256="cd" * 32, source="stream", ts=np.array([T0 + hour * HOUR]),
        action=np.array([ACTION_CODE[action]], dtype=np.int8), confidence=np.array([0.7]),
        raw_output=np.array([[0.3, 0.7]]), entry_price=np.array([100.0]),
        stop_loss=np.array([98.0]), take_profit=np.array([np.nan]), recommended_size=np.array([0.5]),
        feature_keys=np.array(["k"], dtype=object), latency_ms=np.array([1.0]),
        flags=np.array([""], dtype=object))


async def fill(path: Path) -> None:
    store = DuckDBStore(path)
    await store.open()
    ts = T0 + np.arange(4) * HOUR
    close = np.array([1.0, 2.0, 3.0, 4.0])
    await store.write_candles("BTC", "1h", Candles(ts, close, close, close, close, close))
    await store.write_features("1h", "k", ("a", "b"), np.array(["BTC"] * 4, dtype=object), ts,
                               np.arange(8, dtype=np.float64).reshape(4, 2))
    await store.write_signals(one_signal(0, "buy"))
    await store.close()


LIVE = textwrap.dedent("""
    import asyncio, sys
    import numpy as np
    from sigserve.stores import DuckDBStore
    from tests.integration.test_duckdb_live_path import T0, HOUR, one_signal

    journal = sys.argv[2] == "journal"
    heavy = lambda: sorted(m for m in ("pyarrow", "pandas", "numpy.ma") if m in sys.modules)

    async def main():
        # the journal's applier waits an hour: what the requests import is checked before it runs
        store = DuckDBStore(sys.argv[1], journal=journal, journal_linger_s=3600.0)
        await store.open()
        read = await store.read_features("BTC", "1h", ("b", "a"), ts=np.array([T0 + 2 * HOUR]))
        assert read.batch.values.tolist() == [[5.0, 4.0]] and read.batch.close.tolist() == [3.0]
        sides = await store.position_sides("sig", 1, "BTC", "1h", np.array([T0 + 2 * HOUR]))
        assert sides.tolist() == [1], sides
        assert await store.write_signals(one_signal(2, "sell")) == 1
        if journal:
            assert store.journal.pending_rows == 1  # a bar after the newest: journaled
        assert await store.write_signals(one_signal(0, "hold")) == 1  # an upsert inside history
        if journal:
            assert store.journal.pending_rows == 2  # journaled too
            print("imported by the requests:", heavy())
            if heavy():
                sys.exit(1)
            rows = await store.read_signals("sig", "BTC", "1h")  # applies the journal first
            assert [(r["ts"].hour, r["action"]) for r in rows] == [(0, "hold"), (2, "sell")]
            assert store.journal.pending_rows == 0
            return
        stats = await store.feature_window_stats("BTC", "1h", None, None)
        assert stats[0] == 4
        await store.close()

    asyncio.run(main())
    if not journal:
        print("imported:", heavy())
        sys.exit(1 if heavy() else 0)
""")


@pytest.mark.parametrize("mode", ["direct", "journal"])
def test_live_path_imports_neither_pyarrow_nor_pandas(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "live.duckdb"
    asyncio.run(fill(path))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", LIVE, str(path), mode], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_warm_up_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    async def run() -> None:
        store = DuckDBStore(tmp_path / "s.duckdb")
        await store.open()
        try:
            await store.write_signals(one_signal(0, "buy"))
            tables = store._con.execute("SELECT table_name FROM information_schema.tables").fetchall()
            await store.warm_up()
            assert store._con.execute("SELECT table_name FROM information_schema.tables").fetchall() == tables
            assert len(await store.read_signals("sig", "BTC")) == 1
        finally:
            await store.close()

    asyncio.run(run())
