"""The stream worker's store in a child process (StoreProcess) and its group-commit writer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from sigserve.domain import ACTION_CODE, Policy, SignalBatch, SignalDefinition
from sigserve.errors import SignalNotFound, StoreUnavailable
from sigserve.stream import SignalWriter, StoreRunner
from sigserve.stream_storeproc import StoreProcess

T = np.datetime64("2024-03-01T10:00:00", "us")


def batch(n: int, *, start: int = 0, symbol: str = "BTCUSDT", confidence: float = 0.7) -> SignalBatch:
    nan = np.full(n, np.nan)
    return SignalBatch(
        signal_id="trend-1h", symbol=symbol, interval="1h", model_name="trend", model_version=3,
        model_sha256="ab" * 32, source="stream", ts=T + (start + np.arange(n)) * np.timedelta64(1, "h"),
        action=np.full(n, ACTION_CODE["hold"], dtype=np.int8), confidence=np.full(n, confidence),
        raw_output=np.tile([0.3, 0.7], (n, 1)), entry_price=nan, stop_loss=nan, take_profit=nan,
        recommended_size=nan, feature_keys=np.full(n, "fk", dtype=object), latency_ms=np.full(n, 0.25),
        flags=np.full(n, "", dtype=object))


# --- StoreProcess ---------------------------------------------------------------------------------
async def test_a_store_process_answers_as_the_store_does(tmp_path: Path) -> None:
    store = StoreProcess(f"duckdb:///{tmp_path / 'sigserve.duckdb'}")
    await store.open()
    try:
        definition = SignalDefinition("trend-1h", "trend", "@production", "1h", ("BTCUSDT",), Policy())
        await store.create_signal(definition)
        got = await store.get_signal("trend-1h")
        assert got is not None and (got.signal_id, got.model_name, got.symbols) == ("trend-1h", "trend", ("BTCUSDT",))
        # calls made together are answered in the order made (one connection, as on the store thread)
        counts = await asyncio.gather(*(store.write_signals(batch(2, start=2 * i)) for i in range(5)))
        assert counts == [2] * 5
        rows = await store.read_signals("trend-1h", "BTCUSDT", "1h")
        assert len(rows) == 10
        # an upsert again: no duplicate, the later row wins
        assert await store.write_signals(batch(2, confidence=0.9)) == 2
        rows = await store.read_signals("trend-1h", "BTCUSDT", "1h")
        assert len(rows) == 10 and sorted(r["confidence"] for r in rows)[-2:] == [0.9, 0.9]
        assert await store.last_signal_ts("trend-1h", "BTCUSDT", "1h") == T + np.timedelta64(9, "h")
        # a write cycle's batches (pickled one by one, in steps of their own): one call, each counted
        assert await store.write_signal_batches([batch(2, start=10), batch(3, start=12)]) == [2, 3]
        assert len(await store.read_signals("trend-1h", "BTCUSDT", "1h")) == 15
        # a refusal keeps its class, code and details
        with pytest.raises(SignalNotFound) as caught:
            await store.set_signal_status("nope", "retired")
        assert caught.value.code == "signal_not_found" and caught.value.details == {"signal_id": "nope"}
    finally:
        await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get_signal("trend-1h")


async def test_a_second_store_process_on_one_duckdb_file_refuses(tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'sigserve.duckdb'}"
    first = StoreProcess(url)
    await first.open()
    try:
        second = StoreProcess(url)
        with pytest.raises(StoreUnavailable) as caught:
            await second.open()
        assert "lock" in caught.value.message.lower()
        await first.ping()  # the first one is untouched
    finally:
        await first.close()


async def test_a_dead_store_process_fails_its_calls_and_the_next_call_restarts_it(tmp_path: Path) -> None:
    store = StoreProcess(f"duckdb:///{tmp_path / 'sigserve.duckdb'}")
    await store.open()
    try:
        assert await store.write_signals(batch(3)) == 3
        assert store._proc is not None
        store._proc.kill()
        await asyncio.to_thread(store._proc.wait)
        try:  # a call that raced the death fails with store_unavailable; the next one restarts it
            await store.ping()
        except StoreUnavailable:
            await store.ping()
        assert store.restarts >= 1
        assert len(await store.read_signals("trend-1h", "BTCUSDT", "1h")) == 3  # the rows were durable
    finally:
        await store.close()


# --- the group-commit writer ----------------------------------------------------------------------
class FakeStore:
    """Records each write call: ``cycles`` the batches of each ``write_signal_batches`` call
    (all or nothing: one failing symbol fails the call, as PostgreSQL's transaction does),
    ``calls`` each batch that was written."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.cycles: list[list[tuple[str, int]]] = []
        self.fail: set[str] = set()

    async def write_signals(self, b: SignalBatch) -> int:
        if b.symbol in self.fail:
            raise StoreUnavailable("down")
        self.calls.append((b.symbol, len(b)))
        return len(b)

    async def write_signal_batches(self, batches: list[SignalBatch]) -> list[int]:
        self.cycles.append([(b.symbol, len(b)) for b in batches])
        if any(b.symbol in self.fail for b in batches):
            raise StoreUnavailable("down")
        self.calls.extend((b.symbol, len(b)) for b in batches)
        return [len(b) for b in batches]


def writer(store: FakeStore, linger_s: float) -> SignalWriter:
    return SignalWriter(StoreRunner(store), store, linger_s=linger_s)  # type: ignore[arg-type]


async def test_the_writer_merges_a_cycle_per_key_and_answers_each_batch() -> None:
    store = FakeStore()
    w = writer(store, 0.0)
    futures = [w.submit(batch(1, start=i)) for i in range(3)] + [w.submit(batch(2, symbol="ETHUSDT"))]
    assert await asyncio.gather(*futures) == [1, 1, 1, 2]
    assert store.calls == [("BTCUSDT", 3), ("ETHUSDT", 2)]  # one batch per key
    assert store.cycles == [[("BTCUSDT", 3), ("ETHUSDT", 2)]]  # one store call for the cycle
    assert (w.cycles, w.calls) == (1, 2)
    await w.stop()


async def test_a_batch_submitted_while_a_cycle_gathers_its_rows_goes_to_the_next_cycle() -> None:
    store = FakeStore()
    w = writer(store, 0.0)
    first = [w.submit(batch(1)), w.submit(batch(1, symbol="ETHUSDT"))]
    await asyncio.sleep(0)  # the cycle took its rows and steps aside between its keys
    assert not store.cycles
    late = w.submit(batch(2, start=5))
    assert await asyncio.gather(*first, late) == [1, 1, 2]
    assert store.cycles == [[("BTCUSDT", 1), ("ETHUSDT", 1)], [("BTCUSDT", 2)]]
    await w.stop()


async def test_a_failed_key_fails_only_its_batches() -> None:
    store = FakeStore()
    store.fail.add("ETHUSDT")
    w = writer(store, 0.0)
    ok, bad = w.submit(batch(1)), w.submit(batch(1, symbol="ETHUSDT"))
    assert await ok == 1
    with pytest.raises(StoreUnavailable):
        await bad
    # the cycle's call failed whole; each batch was then tried alone, and only one was written
    assert store.cycles == [[("BTCUSDT", 1), ("ETHUSDT", 1)]]
    assert store.calls == [("BTCUSDT", 1)]
    await w.stop()


async def test_an_urgent_batch_does_not_wait_for_the_linger() -> None:
    store = FakeStore()
    w = writer(store, 3600.0)  # an hour: only an urgent batch can start the next cycle
    assert await w.submit(batch(1)) == 1  # the first cycle starts at once
    lingering = w.submit(batch(1, start=1))
    await asyncio.sleep(0)
    assert not lingering.done()
    urgent = w.submit(batch(1, start=2, symbol="ETHUSDT"), urgent=True)
    assert await asyncio.gather(lingering, urgent) == [1, 1]
    assert store.calls == [("BTCUSDT", 1), ("BTCUSDT", 1), ("ETHUSDT", 1)]
    await w.stop()
