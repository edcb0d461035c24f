"""The DuckDB store's positions (its position book) agree with the signal rows it holds, through
journaled appends, journaled replays, bulk rewrites straight to the table, and a reopen."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from sigserve.domain import ACTIONS, FLAT, LONG, SHORT
from sigserve.stores import DuckDBStore
from tests.integration.test_duckdb_signal_journal import HOUR, T0, signals

SIDE = {"buy": LONG, "sell": SHORT, "close_long": FLAT, "close_short": FLAT}


async def truth(store: DuckDBStore, hours: np.ndarray) -> list[int]:
    """The side before each hour of ``hours`` (every hour from the first, ascending), from the
    rows as ``read_signals`` gives them (after the journal is applied): the newest non-hold,
    non-shadow row before it."""
    rows = {r["ts"]: r["action"] for r in await store.read_signals("sig")
            if not r["shadow"] and r["model_version"] == 1}
    out, side = [], FLAT
    for hour in hours.tolist():  # ascending
        out.append(side)
        action = rows.get((T0 + hour * HOUR).astype("datetime64[us]").item(), "hold")
        if action != "hold":
            side = SIDE[action]
    return out


def test_positions_follow_appends_replays_bulk_rewrites_and_a_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    path = tmp_path / "s.duckdb"
    probe = np.arange(0, 5300)  # every bar, asked 1,000 at a time (the book's reads)

    def random_actions(n: int) -> list[str]:
        return [ACTIONS[i] for i in rng.integers(0, 5, n)]

    async def sides(store: DuckDBStore) -> list[int]:
        out: list[int] = []
        for chunk in np.array_split(probe, 6):
            out += (await store.position_sides("sig", 1, "BTC", "1h", T0 + chunk * HOUR)).tolist()
        return out

    async def main() -> None:
        store = DuckDBStore(path, journal_linger_s=0.01)
        await store.open()
        for start in range(0, 300, 50):  # appends, journaled
            await store.write_signals(signals(list(range(start, start + 50)), random_actions(50)))
        assert await sides(store) == await truth(store, probe)  # loads the history's events
        for hour in rng.integers(0, 300, 40).tolist():  # replays inside history, journaled
            await store.write_signals(signals([hour], random_actions(1), source="historical_replay"))
        # a shadow's rows (its own model version) are not the served version's position
        await store.write_signals(signals([150, 151], ["sell", "buy"], shadow=True, version=2))
        assert store.journal is not None and store.journal.unapplied_rows > 0
        got = await sides(store)  # from memory, before anything is applied
        assert got == await truth(store, probe)
        # a bulk rewrite straight to the table (drops the loaded events), then more replays
        hours = list(range(100, 5200))
        await store.write_signals(signals(hours, random_actions(len(hours)), source="historical_replay"))
        for hour in rng.integers(0, 5200, 20).tolist():
            await store.write_signals(signals([hour], random_actions(1), source="historical_replay"))
        assert await sides(store) == await truth(store, probe)
        expected = await truth(store, probe)
        await store.close()
        reopened = DuckDBStore(path)
        await reopened.open()
        # a bar after the newest (the live case) needs the history's summary only
        live = await reopened.position_sides("sig", 1, "BTC", "1h", np.array([T0 + 6000 * HOUR]))
        assert live.tolist() == [expected[-1]]  # the probe's last bar is after the newest too
        assert reopened.position_book.loaded_events == 0
        assert await sides(reopened) == expected
        assert reopened.position_book.loaded_events > 0
        await reopened.close()

    asyncio.run(main())
