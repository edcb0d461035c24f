"""The DuckDB store's bar cache (``sigserve.stores.bar_cache``): reads of one bar or a few are
answered from blocks kept in memory, and they must answer exactly as the window read does, and
never with a row or close that a later write replaced."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from sigserve.stores import Candles, DuckDBStore, FeatureRead
from sigserve.stores.bar_cache import BLOCK_BARS, MAX_BLOCKS_PER_READ, BarCache

T0 = np.datetime64("2024-01-01T00:00:00", "us")
MINUTE = np.timedelta64(60_000_000, "us")
NAMES = ("a", "b", "c")


def candles(ts: np.ndarray, close: np.ndarray) -> Candles:
    return Candles(ts, close, close, close, close, close)


async def open_store(tmp_path: Path) -> DuckDBStore:
    store = DuckDBStore(tmp_path / "cache.duckdb")
    await store.open()
    return store


async def fill(store: DuckDBStore, n: int = 2 * BLOCK_BARS + 40) -> np.ndarray:
    """n 1m bars of BTC with candles; features on most of them, with holes, NaNs, NULL closes and
    a second (narrower, newer) feature_key over part of the span."""
    ts = T0 + np.arange(n) * MINUTE
    close = np.arange(n, dtype=np.float64) + 100.0
    close[7] = np.nan
    await store.write_candles("BTC", "1m", candles(ts, close))
    rng = np.random.default_rng(7)
    keep = np.ones(n, dtype=bool)
    keep[[3, 4, 300, n - 1]] = False  # bars with a candle and no feature row
    values = rng.normal(size=(n, 3))
    values[10, 1] = np.nan
    await store.write_features("1m", "wide", NAMES, np.array(["BTC"] * int(keep.sum()), dtype=object),
                               ts[keep], values[keep])
    # a newer computation of bars 20..59 that lacks "c": those bars are incomplete for NAMES
    await store.write_features("1m", "narrow", ("b", "a"), np.array(["BTC"] * 40, dtype=object),
                               ts[20:60], values[20:60, :2][:, ::-1] + 1000.0)
    return ts


def with_filled_store(tmp_path: Path, body: Callable[[DuckDBStore, np.ndarray], Awaitable[None]]) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        try:
            await body(store, await fill(store))
        finally:
            await store.close()

    asyncio.run(main())


def same_rows(cached: FeatureRead, window: FeatureRead, keep: np.ndarray | None = None) -> None:
    """``cached`` holds the rows of ``window`` that ``keep`` selects (all by default)."""
    rows = window.batch if keep is None else window.batch.take(keep)
    assert cached.batch.ts.tolist() == rows.ts.tolist()
    assert cached.batch.feature_keys.tolist() == rows.feature_keys.tolist()
    np.testing.assert_array_equal(cached.batch.values, rows.values)
    np.testing.assert_array_equal(cached.batch.close, rows.close)
    assert cached.batch.values.shape == (len(cached.batch.ts), len(cached.batch.names))


def test_cached_reads_answer_as_the_window_read(tmp_path: Path) -> None:
    async def body(store: DuckDBStore, ts: np.ndarray) -> None:
        rng = np.random.default_rng(1)
        for names, key in ((NAMES, None), (("b", "a"), None), (("b",), "narrow"), (NAMES, "wide"),
                           ((), None)):
            for _ in range(20):
                picked = np.sort(rng.choice(ts, size=int(rng.integers(1, 12)), replace=False))
                cached = await store.read_features("BTC", "1m", names, ts=picked, feature_key=key)
                # the window read of the same span, cut down to the picked bars
                window = await store.read_features("BTC", "1m", names, start=picked[0], end=picked[-1],
                                                   feature_key=key)
                same_rows(cached, window, np.isin(window.batch.ts, picked))

    with_filled_store(tmp_path, body)


def test_one_bar_reads_match_the_window_read_and_count_holes(tmp_path: Path) -> None:
    async def body(store: DuckDBStore, ts: np.ndarray) -> None:
        for i in (0, 3, 7, 10, 25, 255, 256, 300, len(ts) - 1):
            cached = await store.read_features("BTC", "1m", NAMES, ts=ts[i:i + 1])
            window = await store.read_features("BTC", "1m", NAMES, start=ts[i], end=ts[i])
            same_rows(cached, window)
            assert (cached.incomplete, cached.missing) == (window.incomplete, window.missing)
        assert store.bar_cache.hits > 0  # later bars of a block came from memory
        one = await store.read_features("BTC", "1m", NAMES, ts=ts[3:4])
        assert (len(one.batch), one.incomplete, one.missing) == (0, 0, 1)  # a candle, no row
        narrow = await store.read_features("BTC", "1m", NAMES, ts=ts[25:26])
        assert (len(narrow.batch), narrow.incomplete) == (0, 1)  # the newest row lacks "c"
        nan_close = await store.read_features("BTC", "1m", NAMES, ts=ts[7:8])
        assert np.isnan(nan_close.batch.close[0])
        nan_value = await store.read_features("BTC", "1m", NAMES, ts=ts[10:11])
        assert np.isnan(nan_value.batch.values[0, 1])
        outside = await store.read_features("BTC", "1m", NAMES, ts=np.array([T0 - 5 * MINUTE]))
        assert (len(outside.batch), outside.incomplete, outside.missing) == (0, 0, 0)

    with_filled_store(tmp_path, body)


def test_writes_replace_what_the_cache_holds(tmp_path: Path) -> None:
    async def body(store: DuckDBStore, ts: np.ndarray) -> None:
        bar = ts[100:101]
        before = await store.read_features("BTC", "1m", NAMES, ts=bar)
        assert len(store.bar_cache) == 1
        # the same key rewritten: new values
        await store.write_features("1m", "wide", NAMES, np.array(["BTC"], dtype=object), bar,
                                   np.array([[9.0, 8.0, 7.0]]))
        after = await store.read_features("BTC", "1m", NAMES, ts=bar)
        assert after.batch.values.tolist() == [[9.0, 8.0, 7.0]] != before.batch.values.tolist()
        # a new candle close
        await store.write_candles("BTC", "1m", candles(bar, np.array([55.5])))
        assert (await store.read_features("BTC", "1m", NAMES, ts=bar)).batch.close.tolist() == [55.5]
        # a newer computation under another key wins where no key is pinned
        await store.write_features("1m", "newer", NAMES, np.array(["BTC"], dtype=object), bar,
                                   np.array([[1.0, 2.0, 3.0]]))
        newest = await store.read_features("BTC", "1m", NAMES, ts=bar)
        assert newest.batch.feature_keys.tolist() == ["newer"]
        assert newest.batch.values.tolist() == [[1.0, 2.0, 3.0]]
        pinned = await store.read_features("BTC", "1m", NAMES, ts=bar, feature_key="wide")
        assert pinned.batch.values.tolist() == [[9.0, 8.0, 7.0]]
        # a bar that had no row gets one
        hole = ts[300:301]
        assert len((await store.read_features("BTC", "1m", NAMES, ts=hole)).batch) == 0
        await store.write_features("1m", "wide", NAMES, np.array(["BTC"], dtype=object), hole,
                                   np.array([[4.0, 5.0, 6.0]]))
        assert (await store.read_features("BTC", "1m", NAMES, ts=hole)).batch.values.tolist() == [[4.0, 5.0, 6.0]]
        # another symbol's write leaves BTC's blocks alone
        kept = len(store.bar_cache)
        await store.write_candles("ETH", "1m", candles(bar, np.array([1.0])))
        assert len(store.bar_cache) == kept > 0

    with_filled_store(tmp_path, body)


def test_a_failed_write_leaves_no_stale_block(tmp_path: Path) -> None:
    async def body(store: DuckDBStore, ts: np.ndarray) -> None:
        await store.read_features("BTC", "1m", NAMES, ts=ts[150:151])
        with pytest.raises(Exception, match="duplicate"):
            await store.write_features("1m", "wide", NAMES, np.array(["BTC", "BTC"], dtype=object),
                                       np.array([ts[150], ts[150]]), np.zeros((2, 3)))
        assert len(store.bar_cache) == 0
        again = await store.read_features("BTC", "1m", NAMES, ts=ts[150:151])
        assert len(again.batch) == 1

    with_filled_store(tmp_path, body)


def test_sets_over_many_blocks_take_the_window_read(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(tmp_path)
        n = (MAX_BLOCKS_PER_READ + 2) * BLOCK_BARS
        ts = T0 + np.arange(n) * MINUTE
        await store.write_candles("BTC", "1m", candles(ts, np.ones(n)))
        await store.write_features("1m", "wide", NAMES, np.array(["BTC"] * n, dtype=object), ts,
                                   np.arange(3 * n, dtype=np.float64).reshape(n, 3))
        spread = ts[::BLOCK_BARS]  # one bar in each block
        read = await store.read_features("BTC", "1m", NAMES, ts=spread)
        assert len(store.bar_cache) == 0  # not cached: the Arrow window read answered
        assert read.batch.ts.tolist() == spread.tolist()
        np.testing.assert_array_equal(read.batch.values[:, 0], np.arange(0, 3 * n, 3 * BLOCK_BARS))
        few = await store.read_features("BTC", "1m", NAMES, ts=spread[:3])
        assert len(store.bar_cache) == 3 and few.batch.ts.tolist() == spread[:3].tolist()
        await store.close()

    asyncio.run(main())


def test_blocks_read_during_a_write_are_not_kept() -> None:
    cache = BarCache(block_bars=4, max_blocks=2)
    loads: list[int] = []

    def load(first: np.datetime64, end: np.datetime64):  # type: ignore[no-untyped-def]
        from sigserve.stores.bar_cache import Block

        loads.append(int(first.astype(np.int64)))
        return Block([], [], [], [], [], np.empty(0), [], [])

    def read(minute: int) -> None:
        cache.read("BTC", "1m", NAMES, np.array([T0 + minute * MINUTE]), None, load, lambda key: NAMES)

    with cache.writing(["BTC"], "1m"):
        read(0)
        read(0)
    assert len(loads) == 2 and len(cache) == 0
    read(0)
    read(1)  # same block of 4 bars
    assert len(loads) == 3 and len(cache) == 1
    read(4)
    read(8)  # a third block: the least recently used goes
    assert len(cache) == 2
    read(0)
    assert len(loads) == 6
    with cache.writing(["ETH"], "1m"):
        pass
    assert len(cache) == 2  # another series' write drops nothing of BTC


def test_a_live_series_near_the_end_of_a_block_has_the_next_one_loaded_ahead(tmp_path: Path) -> None:
    """Bars asked for in time order, as a live series does: past 3/4 of a block the next block is
    loaded on a worker thread, so the bar that opens it is a hit; and it answers as the window
    read does."""
    async def body(store: DuckDBStore, ts: np.ndarray) -> None:
        cache = store.bar_cache
        early = BLOCK_BARS // 2
        await store.read_features("BTC", "1m", NAMES, ts=ts[early:early + 1])
        await asyncio.sleep(0.2)
        assert (len(cache), cache.prefetched) == (1, 0)  # the first half of a block: nothing ahead
        late = BLOCK_BARS - 10
        await store.read_features("BTC", "1m", NAMES, ts=ts[late:late + 1])
        for _ in range(200):
            if cache.prefetched:
                break
            await asyncio.sleep(0.01)
        assert (len(cache), cache.prefetched) == (2, 1)
        misses = cache.misses
        opening = await store.read_features("BTC", "1m", NAMES, ts=ts[BLOCK_BARS:BLOCK_BARS + 1])
        assert cache.misses == misses  # answered from the block loaded ahead
        window = await store.read_features("BTC", "1m", NAMES, start=ts[BLOCK_BARS], end=ts[BLOCK_BARS])
        same_rows(opening, window)
        # once loaded (or loading), a block is not asked for again
        await store.read_features("BTC", "1m", NAMES, ts=ts[late + 1:late + 2])
        await asyncio.sleep(0.1)
        assert cache.prefetched == 1

    with_filled_store(tmp_path, body)


def test_a_block_loaded_ahead_across_a_write_is_not_kept() -> None:
    cache = BarCache(block_bars=4, max_blocks=4)

    def load(first: np.datetime64, end: np.datetime64):  # type: ignore[no-untyped-def]
        from sigserve.stores.bar_cache import Block

        return Block([], [], [], [], [], np.empty(0), [], [])

    assert cache.next_to_prefetch("BTC", "1m", T0 + 1 * MINUTE) is None  # not in the last quarter
    first = cache.next_to_prefetch("BTC", "1m", T0 + 3 * MINUTE)
    assert first == int((T0 + 4 * MINUTE).astype(np.int64))
    assert cache.next_to_prefetch("BTC", "1m", T0 + 3 * MINUTE) is None  # already on its way
    with cache.writing(["BTC"], "1m"):
        cache.prefetch("BTC", "1m", first, load)
    assert (len(cache), cache.prefetched) == (0, 0)  # read while a write was in flight: dropped
    again = cache.next_to_prefetch("BTC", "1m", T0 + 3 * MINUTE)
    assert again == first
    cache.prefetch("BTC", "1m", first, load)
    assert (len(cache), cache.prefetched) == (1, 1)
    assert cache.next_to_prefetch("BTC", "1m", T0 + 3 * MINUTE) is None  # held


def test_close_waits_for_a_block_loaded_ahead_from_another_event_loop(tmp_path: Path) -> None:
    """The stream worker's StoreRunner calls an in-process DuckDB store on an event loop of its
    own, and the worker closes the store from its main loop: a block still loading ahead is
    waited for, and the close does not fail (it raised "attached to a different loop")."""
    from sigserve.stream import StoreRunner

    async def main() -> None:
        store = await open_store(tmp_path)
        ts = await fill(store)
        load_block = store._load_block
        started = threading.Event()

        def slow_load(*args: object) -> object:  # a block that takes a while to read
            started.set()
            time.sleep(0.3)
            return load_block(*args)  # type: ignore[arg-type]

        store._load_block = slow_load  # type: ignore[method-assign]
        runner = StoreRunner(store)
        runner.start()
        try:
            late = BLOCK_BARS - 10
            await runner.call(lambda: store.read_features("BTC", "1m", NAMES, ts=ts[late:late + 1]))
            assert await asyncio.to_thread(started.wait, 5)  # loading ahead, on the runner's loop
            assert store.bar_cache.prefetched == 0
            await store.close()  # on this loop, while the block still loads
            assert store.bar_cache.prefetched == 1  # the close waited for it
        finally:
            runner.stop()

    asyncio.run(main())
