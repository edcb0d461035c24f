"""The DuckDB store's signal journal: a write is durable once appended, applied behind, seen by
every reader, and replayed after a crash (a process that exits without closing the store)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from sigserve.domain import ACTION_CODE, SignalBatch
from sigserve.errors import StoreUnavailable
from sigserve.stores import DuckDBStore, open_store
from sigserve.stores.signal_journal import read_segment

T0 = np.datetime64("2024-01-01T00:00:00", "us")
HOUR = np.timedelta64(3_600_000_000, "us")


def signals(hours: list[int], actions: list[str], *, source: str = "stream", shadow: bool = False,
            version: int = 1) -> SignalBatch:
    n = len(hours)
    return SignalBatch(
        signal_id="sig", symbol="BTC", interval="1h", model_name="m", model_version=version,
        model_sha256="ab" * 32, source=source, ts=T0 + np.array(hours) * HOUR,
        action=np.array([ACTION_CODE[a] for a in actions], dtype=np.int8),
        confidence=np.linspace(0.5, 0.9, n), raw_output=np.tile([0.3, 0.7], (n, 1)),
        entry_price=np.full(n, 100.0), stop_loss=np.full(n, np.nan), take_profit=np.full(n, 110.0),
        recommended_size=np.full(n, 0.5), feature_keys=np.array(["k"] * n, dtype=object),
        latency_ms=np.full(n, 1.5), flags=np.array(["levels_invalid"] + [""] * (n - 1), dtype=object),
        shadow=shadow)


def rows_of(path: Path) -> list[tuple[object, ...]]:
    """signal_history as DuckDB holds it, read by a connection of its own (the store closed)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT hour(ts), action, source, stop_loss, flags, shadow FROM signal_history"
                           " ORDER BY ts, shadow").fetchall()
    finally:
        con.close()


async def opened(path: Path, **kwargs: float) -> DuckDBStore:
    store = DuckDBStore(path, **kwargs)  # type: ignore[arg-type]
    await store.open()
    return store


def test_rows_are_applied_in_the_background_and_segments_deleted(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"

    async def main() -> None:
        store = await opened(path, journal_linger_s=0.01)
        journal = store.journal
        assert journal is not None
        for hour in range(5):
            await store.write_signals(signals([hour], ["buy" if hour % 2 else "hold"]))
        deadline = time.monotonic() + 10
        while journal.applied < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert journal.unapplied_rows == 0 and journal.applied == journal.appended == 5
        # only the segment being appended to is left
        assert len(list(journal.directory.glob("*.log"))) == 1
        await store.close()

    asyncio.run(main())
    assert [r[:2] for r in rows_of(path)] == [(0, "hold"), (1, "buy"), (2, "hold"), (3, "buy"), (4, "hold")]
    assert not list((tmp_path / "s.duckdb.journal").glob("*.log"))  # close applies and removes all


def test_readers_see_pending_rows_and_later_writes_win(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "s.duckdb", journal_linger_s=3600.0)
        journal = store.journal
        assert journal is not None
        await store.write_signals(signals([1], ["buy"]))
        await store.write_signals(signals([2, 3], ["sell", "buy"]))
        await store.write_signals(signals([1], ["hold"], shadow=True, version=2))
        assert journal.pending_rows == 4  # bars after the newest of their history: journaled
        got = await store.read_signals("sig", "BTC", "1h")  # applies first
        assert journal.pending_rows == 0
        assert [(r["ts"].hour, r["model_version"], r["action"]) for r in got] == [
            (1, 1, "buy"), (1, 2, "hold"), (2, 1, "sell"), (3, 1, "buy")]
        # a bar again, after its journaled row: journaled too, and the later row wins
        await store.write_signals(signals([4], ["buy"]))
        assert journal.pending_rows == 1
        await store.write_signals(signals([4], ["sell"]))
        assert journal.pending_rows == 2
        assert (await store.position_sides("sig", 1, "BTC", "1h", np.array([T0 + 5 * HOUR]))).tolist() == [-1]
        await store.write_signals(signals([5], ["close_short"]))
        assert (await store.position_sides("sig", 1, "BTC", "1h", np.array([T0 + 6 * HOUR]))).tolist() == [0]
        # a bar inside history loads the history's events (the pending rows applied first)
        assert (await store.position_sides("sig", 1, "BTC", "1h", np.array([T0 + 2 * HOUR]))).tolist() == [1]
        assert journal.pending_rows == 0
        # the position after a journaled bar comes from memory (nothing applied for it), and
        # agrees with the table
        await store.write_signals(signals([6], ["buy"]))
        pending = journal.pending_rows
        assert pending >= 1
        assert (await store.position_sides("sig", 1, "BTC", "1h", np.array([T0 + 7 * HOUR]))).tolist() == [1]
        # inside history too, from the loaded events: bar 6 is pending
        assert (await store.position_sides("sig", 1, "BTC", "1h", T0 + np.array([5, 6, 7]) * HOUR)).tolist() == [
            -1, 0, 1]
        assert journal.pending_rows == pending
        assert [(r["ts"].hour, r["action"]) for r in await store.read_signals("sig", "BTC", "1h")][-3:] == [
            (4, "sell"), (5, "close_short"), (6, "buy")]
        # a bulk write of the same history goes straight to the table, after the pending rows;
        # the bars after it are journaled again
        await store.write_signals(signals([7], ["sell"]))
        bulk_hours = list(range(7, 5007))
        await store.write_signals(signals(bulk_hours, ["hold"] * len(bulk_hours), source="historical_replay"))
        assert journal.pending_rows == 0
        await store.write_signals(signals([5007], ["buy"]))
        assert journal.pending_rows == 1
        counts = await store.signal_action_counts("sig")
        assert counts == {"buy": 4, "sell": 2, "hold": 5000, "close_short": 1}
        await store.close()

    asyncio.run(main())


CRASH = textwrap.dedent("""
    import asyncio, os, sys
    from sigserve.stores import DuckDBStore
    from tests.integration.test_duckdb_signal_journal import signals

    async def main():
        store = DuckDBStore(sys.argv[1], journal_linger_s=3600.0)   # never applied by itself
        await store.open()
        for hour in range(3):
            await store.write_signals(signals([hour], ["buy", "sell", "hold"][hour:hour + 1]))
        await store.write_signals(signals([3], ["close_long"]))
        print("acknowledged", store.journal.pending_rows, flush=True)
        os._exit(0)   # a crash: no close, nothing applied

    asyncio.run(main())
""")


def test_a_crash_loses_no_acknowledged_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.duckdb"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", CRASH, str(path)], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert done.stdout.strip() == "acknowledged 4", done.stdout + done.stderr
    segments = sorted((tmp_path / "s.duckdb.journal").glob("*.log"))
    assert sum(len(read_segment(p)) for p in segments) == 4
    # a torn last record (the append a crash cut short) is dropped, the whole ones kept
    with segments[-1].open("ab") as f:
        f.write(b"SGJ1\x40\x00\x00\x00\x00\x00\x00\x00{\"signal")

    async def reopen() -> list[dict[str, object]]:
        with caplog.at_level(logging.WARNING):
            store = await opened(path)
        rows = await store.read_signals("sig")
        await store.close()
        return rows

    rows = asyncio.run(reopen())
    assert [(r["ts"].hour, r["action"], r["stop_loss"], r["flags"]) for r in rows] == [  # type: ignore[union-attr]
        (0, "buy", None, "levels_invalid"), (1, "sell", None, "levels_invalid"),
        (2, "hold", None, "levels_invalid"), (3, "close_long", None, "levels_invalid")]
    assert "not a whole record" in caplog.text and "applied 4 signal rows" in caplog.text
    assert not list((tmp_path / "s.duckdb.journal").glob("*.log"))


# a crash script's start: a store with bars 0-2 (buy) journaled and applied in the background;
# their records stay in the active segment
THREE_APPLIED = """
    import asyncio, os, sys, time
    import numpy as np
    from sigserve.stores import DuckDBStore
    from tests.integration.test_duckdb_signal_journal import signals, T0, HOUR

    async def main():
        store = DuckDBStore(sys.argv[1], journal_linger_s=0.01)
        await store.open()
        journal = store.journal
        for hour in range(3):
            await store.write_signals(signals([hour], ["buy"]))
        while journal.applied < 3:
            time.sleep(0.01)
"""


def crash_script(steps: str) -> str:
    """THREE_APPLIED, then ``steps`` (inside ``main``), then a crash: no close."""
    return textwrap.dedent(THREE_APPLIED) + textwrap.indent(textwrap.dedent(steps), " " * 4) + textwrap.dedent("""
        os._exit(0)

    asyncio.run(main())
""")


def run_crash(path: Path, script: str) -> str:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def rows_after_reopen(path: Path) -> list[dict[str, object]]:
    async def reopen() -> list[dict[str, object]]:
        store = await opened(path)
        rows = await store.read_signals("sig")
        await store.close()
        return rows

    return asyncio.run(reopen())


CRASH_AFTER_A_STRAIGHT_WRITE = crash_script("""
        kept = sum(p.stat().st_size for p in journal.directory.glob("*.log"))
        # bars 1 to 5,000 again, a bulk write: straight to the table, over the journaled rows
        hours = list(range(1, 5001))
        await store.write_signals(signals(hours, ["sell"] * len(hours), source="historical_replay"))
        await store.write_signals(signals([5001], ["hold"]))   # journaled again
        print("kept", kept > 0, "applied", journal.applied, flush=True)
""")


def test_a_crash_never_replays_a_journaled_row_over_a_later_straight_write(tmp_path: Path) -> None:
    """The applier keeps applied records in the active segment; a write straight to the table
    closes and deletes every segment with records first, so the replay after a crash cannot put
    the older journaled row back over it."""
    path = tmp_path / "s.duckdb"
    assert run_crash(path, CRASH_AFTER_A_STRAIGHT_WRITE) == "kept True applied 3"
    segments = sorted((tmp_path / "s.duckdb.journal").glob("*.log"))
    replayed = [entry for p in segments for entry in read_segment(p)]
    assert [int((batch.ts[0] - T0) // HOUR) for batch, _ in replayed] == [5001]  # only the later bar
    rows = rows_after_reopen(path)
    got = [(r["action"], r["source"]) for r in rows]
    assert len(rows) == 5002
    assert got[:3] == [("buy", "stream"), ("sell", "historical_replay"), ("sell", "historical_replay")]
    assert got[-2:] == [("sell", "historical_replay"), ("hold", "stream")]


CRASH_AFTER_A_REPLAY = crash_script("""
    store._journal_linger_s = 3600.0   # nothing more applied before the crash
    before = await store.position_sides("sig", 1, "BTC", "1h", np.array([T0 + 2 * HOUR]))
    # bar 1 again, inside history: journaled after the applied rows
    await store.write_signals(signals([1], ["sell"], source="historical_replay"))
    after = await store.position_sides("sig", 1, "BTC", "1h", np.array([T0 + 2 * HOUR]))
    print("pending", journal.pending_rows, "sides", int(before[0]), int(after[0]), flush=True)
""")


def test_a_replayed_bar_is_journaled_and_its_row_wins_after_a_crash(tmp_path: Path) -> None:
    """A bar inside history is journaled like a new one (its position before it is read from
    memory); after a crash, the segment's records are applied in order, so the replay's row
    replaces the older one at its key."""
    path = tmp_path / "s.duckdb"
    # the position before bar 2 follows the journaled sell at bar 1 (long, then short), with
    # nothing applied
    assert run_crash(path, CRASH_AFTER_A_REPLAY) == "pending 1 sides 1 -1"
    rows = rows_after_reopen(path)
    assert [(r["ts"].hour, r["action"], r["source"]) for r in rows] == [  # type: ignore[union-attr]
        (0, "buy", "stream"), (1, "sell", "historical_replay"), (2, "buy", "stream")]


def test_the_active_segment_keeps_applied_records_until_it_is_rotated(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "s.duckdb", journal_linger_s=0.01)
        journal = store.journal
        assert journal is not None
        first = sorted(journal.directory.glob("*.log"))
        for hour in range(20):
            await store.write_signals(signals([hour], ["buy"]))
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + 10
        while journal.applied < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # applies happened, and no segment was opened for them: every record is in the first
        assert journal.applied == 20 and sorted(journal.directory.glob("*.log")) == first
        assert len(read_segment(first[0])) == 20
        # a reader of the table applies pending rows and keeps the segment (no sync for it)
        await store.write_signals(signals([20], ["sell"]))
        assert len(await store.read_signals("sig")) == 21
        assert journal.pending_rows == 0 and sorted(journal.directory.glob("*.log")) == first
        # a bulk write straight to the table retires it: a fresh, empty segment from there on
        hours = list(range(21, 5021))
        await store.write_signals(signals(hours, ["hold"] * len(hours), source="historical_replay"))
        now = sorted(journal.directory.glob("*.log"))
        assert now != first and [len(read_segment(p)) for p in now] == [0]
        await store.close()

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_a_reader_waiting_for_the_applier_raises_it_to_normal_priority(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The applier runs at idle priority; a reader that must wait for its apply (the lock is
    held) raises it to normal priority, so the wait is the apply's work, not the time until the
    core is free; the applier goes back to idle on its next cycle."""
    async def main() -> None:
        store = await opened(tmp_path / "s.duckdb", journal_linger_s=0.01)
        real = store._apply_entries
        seen: list[int] = []
        applying = threading.Event()

        def slow(con: object, entries: list[object]) -> None:
            if threading.get_native_id() == store._applier_tid and not seen:
                seen.append(os.sched_getscheduler(0))
                applying.set()
                deadline = time.monotonic() + 5
                while not store._applier_hurried and time.monotonic() < deadline:
                    time.sleep(0.005)
                seen.append(os.sched_getscheduler(0))
            real(con, entries)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "_apply_entries", slow)
        await store.write_signals(signals([1], ["buy"]))
        assert await asyncio.to_thread(applying.wait, 5)
        rows = await store.read_signals("sig")  # waits for the applier's lock
        assert seen == [os.SCHED_IDLE, os.SCHED_OTHER]
        assert [r["action"] for r in rows] == ["buy"]
        await store.write_signals(signals([2], ["sell"]))  # the next cycle: idle again
        deadline = time.monotonic() + 5
        while os.sched_getscheduler(store._applier_tid) != os.SCHED_IDLE and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert os.sched_getscheduler(store._applier_tid) == os.SCHED_IDLE
        await store.close()

    asyncio.run(main())


def test_a_failed_apply_keeps_the_rows_and_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "s.duckdb", journal_linger_s=3600.0)
        await store.write_signals(signals([1], ["buy"]))
        real = store._apply_entries
        calls = []

        def failing(con: object, entries: list[object]) -> None:
            calls.append(len(entries))
            if len(calls) == 1:
                raise duckdb.IOException("disk gone")
            real(con, entries)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "_apply_entries", failing)
        with pytest.raises(StoreUnavailable):
            await store.read_signals("sig")
        await store.write_signals(signals([2], ["sell"]))
        rows = await store.read_signals("sig")
        assert calls == [1, 2]  # the failed entry again, first, with the new one
        assert [(r["ts"].hour, r["action"]) for r in rows] == [(1, "buy"), (2, "sell")]
        await store.close()

    asyncio.run(main())


def test_journal_off_writes_straight_into_the_file(tmp_path: Path) -> None:
    async def main() -> None:
        store = open_store(f"duckdb:///{tmp_path}/s.duckdb?journal=off")
        await store.open()
        assert isinstance(store, DuckDBStore) and store.journal is None
        await store.write_signals(signals([1], ["buy"]))
        await store.close()

    asyncio.run(main())
    assert rows_of(tmp_path / "s.duckdb")[0][:2] == (1, "buy")
    assert not (tmp_path / "s.duckdb.journal").exists()


def test_one_insert_applies_the_new_bars_of_every_history(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream's write cycle (a run of new bars per symbol) is applied as one INSERT, not one
    statement per history; a replay in the same apply still replaces its row."""
    path = tmp_path / "s.duckdb"
    inserts: list[int] = []
    smalls: list[str] = []
    real_insert, real_small = DuckDBStore._insert_runs, DuckDBStore._write_small

    def insert_runs(self: DuckDBStore, con: object, runs: list[object]) -> None:
        inserts.append(len(runs))
        real_insert(self, con, runs)  # type: ignore[arg-type]

    def write_small(self: DuckDBStore, con: object, batch: SignalBatch, **kwargs: object) -> int:
        smalls.append(batch.symbol)
        return real_small(self, con, batch, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DuckDBStore, "_insert_runs", insert_runs)
    monkeypatch.setattr(DuckDBStore, "_write_small", write_small)

    def of(symbol: str, hours: list[int], actions: list[str]) -> SignalBatch:
        one = signals(hours, actions)
        one.symbol = symbol
        return one

    async def main() -> None:
        store = await opened(path, journal_linger_s=3600.0)  # applied by the reads below
        symbols = ("BTC", "ETH", "SOL", "XRP")
        assert await store.write_signal_batches([of(s, [0, 1], ["buy", "hold"]) for s in symbols]) == [2] * 4
        rows = await store.read_signals("sig")
        assert len(rows) == 8 and (inserts, smalls) == ([4], [])
        # a replay of ETH's first bar beside new bars of the others: one INSERT, one replace
        await store.write_signal_batches([of("BTC", [2], ["sell"]), of("ETH", [0], ["sell"]),
                                          of("SOL", [2], ["hold"])])
        rows = await store.read_signals("sig")
        assert (inserts, smalls) == ([4, 2], ["ETH"])
        got = {(r["symbol"], int((np.datetime64(r["ts"], "us") - T0) // HOUR)): r["action"] for r in rows}
        assert len(rows) == 10 and got[("ETH", 0)] == "sell" and got[("BTC", 2)] == "sell"
        assert (await store.position_sides("sig", 1, "ETH", "1h", T0 + np.array([1]) * HOUR)).tolist() == [-1]
        await store.close()

    asyncio.run(main())


def test_the_journal_linger_is_a_store_url_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sigserve.errors import ValidationError
    from sigserve.stream_cli import STREAM_JOURNAL_LINGER_MS, _open_services

    async def main() -> None:
        store = open_store(f"duckdb:///{tmp_path}/s.duckdb?journal_linger_ms=20")
        await store.open()
        assert isinstance(store, DuckDBStore) and store._journal_linger_s == pytest.approx(0.02)
        started = time.monotonic()
        await store.write_signals(signals([1], ["buy"]))
        journal = store.journal
        assert journal is not None
        while journal.applied < 1 and time.monotonic() - started < 5:
            await asyncio.sleep(0.005)
        assert journal.applied == 1  # applied by the background applier, after its linger
        await store.close()
        for bad in ("journal_linger_ms=-1", "journal_linger_ms=soon", "journal_linger_ms=60001", "linger=5"):
            with pytest.raises(ValidationError):
                open_store(f"duckdb:///{tmp_path}/t.duckdb?{bad}")

    asyncio.run(main())
    # the stream worker's store process asks for its own linger unless the URL names one
    from sigserve.config import Settings

    seen: list[str] = []

    class Recorder:
        def __init__(self, url: str, **kwargs: object) -> None:
            seen.append(url)

    import sigserve.stream_storeproc as storeproc

    monkeypatch.setattr(storeproc, "StoreProcess", Recorder)
    for url in (f"duckdb:///{tmp_path}/a.duckdb", f"duckdb:///{tmp_path}/b.duckdb?journal_linger_ms=7"):
        _open_services(Settings(home=tmp_path, store=url), store_process=True)
    assert seen == [f"duckdb:///{tmp_path}/a.duckdb?journal_linger_ms={STREAM_JOURNAL_LINGER_MS}",
                    f"duckdb:///{tmp_path}/b.duckdb?journal_linger_ms=7"]
