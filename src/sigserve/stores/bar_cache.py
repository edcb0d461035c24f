"""Feature rows and candle closes of recently read bars, kept in memory by the DuckDB store.

A DuckDB file has one writing process, so the store that holds it sees every write to
``feature_values`` and ``candles`` and may keep what it read. A bar that is not here is read with
its whole *block*: the ``block_bars`` bars of its interval around it, aligned on the epoch (one
statement for the feature rows, one for the closes: about what the two point reads of one bar
cost, measured 1.8 + 1.0 ms against 2 x 1.4 ms). The bars after it, as a replay or a trading
engine asks for them in time order, are then answered from memory.

Correctness rests on three rules:

- every write of feature rows or candles of a (symbol, interval) runs inside :meth:`writing`,
  which drops that series' blocks before and after the write;
- a block read while a write is in flight, or before one that finished since, is answered but
  not kept (:meth:`BarCache.version`, :meth:`BarCache.put`);
- the answer is the one the store's window read gives: the row of the pinned ``feature_key``,
  else the newest ``created_at`` (then the greatest key) at each bar; a row whose key lacks a
  requested name is counted ``incomplete``; a candle bar without a feature row ``missing``.

Usage (inside a store; ``load`` reads one block, ``names_of`` gives a key's column names)::

    cache = BarCache()
    read = cache.read(symbol, interval, names, wanted_ts, feature_key, load, names_of)
    with cache.writing(["BTCUSDT"], "1m"):
        ...  # the write
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..domain import FeatureBatch
from ..timeutil import TS_DTYPE, interval_us
from .base import FeatureRead

BLOCK_BARS = 256
PREFETCH_FROM = 0.75  # a read past this share of its block loads the next one in the background
MAX_BLOCKS = 128  # 32,768 bars: about 12 MB with 32 features
MAX_BLOCKS_PER_READ = 8  # a larger set of bars is a window read's job (Arrow, no cache)


@dataclass(frozen=True, slots=True)
class Block:
    """The feature rows and candle closes stored for a span of one (symbol, interval).

    ``ts`` (as int64 microseconds), ``keys``, ``created``, ``start`` and ``width`` have one entry
    per feature row, sorted by (ts, feature_key); row i's values are
    ``values[start[i]:start[i] + width[i]]`` (NULL as NaN). ``candle_ts`` is ascending, with
    ``close`` beside it (NULL as NaN).
    """

    ts: list[int]
    keys: list[str]
    created: list[int]
    start: list[int]
    width: list[int]
    values: np.ndarray
    candle_ts: list[int]
    close: list[float]

    @classmethod
    def from_unnested(cls, ts: np.ndarray, keys: np.ndarray, created: np.ndarray, flat: np.ndarray,
                      candle_ts: np.ndarray, close: np.ndarray) -> Block:
        """From one row per value of ``unnest(list_prepend(len(vals), vals))``, in (ts, key)
        order: each feature row gives its width, then its values."""
        rows_ts: list[int] = []
        rows_key: list[str] = []
        rows_created: list[int] = []
        starts: list[int] = []
        widths: list[int] = []
        ts_us = np.asarray(ts, dtype=TS_DTYPE).astype(np.int64)
        created_us = np.asarray(created, dtype=TS_DTYPE).astype(np.int64)
        i, n = 0, int(flat.shape[0])
        while i < n:
            width = int(flat[i])
            rows_ts.append(int(ts_us[i]))
            rows_key.append(str(keys[i]))
            rows_created.append(int(created_us[i]))
            starts.append(i + 1)
            widths.append(width)
            i += width + 1
        return cls(rows_ts, rows_key, rows_created, starts, widths, flat,
                   np.asarray(candle_ts, dtype=TS_DTYPE).astype(np.int64).tolist(),
                   np.asarray(close, dtype=np.float64).tolist())

    def row_at(self, t: int, feature_key: str | None) -> int | None:
        """The feature row that answers bar ``t``: the pinned key's, else the newest."""
        lo, hi = bisect_left(self.ts, t), bisect_right(self.ts, t)
        if lo == hi:
            return None
        if feature_key is not None:
            for i in range(lo, hi):
                if self.keys[i] == feature_key:
                    return i
            return None
        return max(range(lo, hi), key=lambda i: (self.created[i], self.keys[i]))

    def has_candle(self, t: int) -> bool:
        i = bisect_left(self.candle_ts, t)
        return i < len(self.candle_ts) and self.candle_ts[i] == t

    def close_at(self, t: int) -> float:
        i = bisect_left(self.candle_ts, t)
        return self.close[i] if i < len(self.candle_ts) and self.candle_ts[i] == t else float("nan")


LoadBlock = Callable[[np.datetime64, np.datetime64], Block]
NamesOf = Callable[[str], "tuple[str, ...] | None"]


class BarCache:
    """Blocks of bars per (symbol, interval), least recently used dropped past ``max_blocks``.

    Thread-safe: a store's bulk writes run on worker threads while reads run on the event loop.
    """

    def __init__(self, *, block_bars: int = BLOCK_BARS, max_blocks: int = MAX_BLOCKS) -> None:
        self.block_bars = block_bars
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[tuple[str, str, int], Block] = OrderedDict()
        self._lock = threading.Lock()
        self._version = 0
        self._writes = 0
        self.hits = 0
        self.misses = 0
        self.prefetched = 0
        self._prefetching: set[tuple[str, str, int]] = set()

    def __len__(self) -> int:
        return len(self._blocks)

    # --- reads ---------------------------------------------------------------------------
    def read(self, symbol: str, interval: str, names: tuple[str, ...], wanted: np.ndarray,
             feature_key: str | None, load: LoadBlock, names_of: NamesOf) -> FeatureRead | None:
        """The feature read of the bars ``wanted`` (unique, ascending), from the blocks here and
        those ``load`` reads; None when they span more than ``MAX_BLOCKS_PER_READ`` blocks."""
        span = self.block_bars * interval_us(interval)
        wanted_us = np.asarray(wanted, dtype=TS_DTYPE).astype(np.int64)
        firsts = (wanted_us // span) * span
        if firsts.size > 1 and np.count_nonzero(np.diff(firsts)) >= MAX_BLOCKS_PER_READ:
            return None
        k = len(names)
        kept_ts: list[int] = []
        kept_keys: list[str] = []
        kept_values: list[np.ndarray] = []
        kept_close: list[float] = []
        incomplete = missing = 0
        block: Block | None = None
        block_first = None
        # per feature_key: where each requested name sits in its rows (None: a name is absent),
        # and whether that is every column in order (the row is taken as it is)
        layouts: dict[str, tuple[list[int], bool] | None] = {}
        for t, first in zip(wanted_us.tolist(), firsts.tolist(), strict=True):
            if block is None or first != block_first:
                block, block_first = self._block(symbol, interval, first, span, load), first
            i = block.row_at(t, feature_key)
            if i is None:
                missing += block.has_candle(t)
                continue
            key = block.keys[i]
            if key not in layouts:
                stored = names_of(key) or ()
                where = {name: j for j, name in enumerate(stored)}
                layouts[key] = (None if any(n not in where for n in names)
                                else ([where[n] for n in names], tuple(stored) == names))
            layout = layouts[key]
            width = block.width[i]
            if layout is None or (k and max(layout[0]) >= width):
                incomplete += 1
                continue
            row = block.values[block.start[i]:block.start[i] + width]
            kept_ts.append(t)
            kept_keys.append(key)
            kept_values.append(row if layout[1] and width == k else row[layout[0]])
            kept_close.append(block.close_at(t))
        n = len(kept_ts)
        values = np.vstack(kept_values) if n else np.empty((0, k))
        batch = FeatureBatch(symbol, interval, np.asarray(kept_ts, dtype=np.int64).astype(TS_DTYPE),
                             values.reshape(n, k), names, np.asarray(kept_keys, dtype=object),
                             np.asarray(kept_close, dtype=np.float64))
        return FeatureRead(batch, incomplete, missing)

    def _block(self, symbol: str, interval: str, first: int, span: int, load: LoadBlock) -> Block:
        slot = (symbol, interval, first)
        with self._lock:
            block = self._blocks.get(slot)
            if block is not None:
                self._blocks.move_to_end(slot)
                self.hits += 1
                return block
            self.misses += 1
            version = None if self._writes else self._version
        return self._load_and_keep(slot, span, version, load)[0]

    def _load_and_keep(self, slot: tuple[str, str, int], span: int, version: int | None,
                       load: LoadBlock) -> tuple[Block, bool]:
        """Load the block of ``slot`` and keep it when no write of any series began or ran since
        ``version`` was read (None: one was running then); whether it was kept."""
        first = slot[2]
        block = load(np.datetime64(first, "us"), np.datetime64(first + span, "us"))
        if version is None or self.max_blocks <= 0:
            return block, False
        with self._lock:
            if self._version != version or self._writes:
                return block, False
            self._blocks[slot] = block
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
        return block, True

    # --- prefetch ------------------------------------------------------------------------
    def next_to_prefetch(self, symbol: str, interval: str, last: np.datetime64) -> int | None:
        """The first bar (us since the epoch) of the block after ``last``'s, when ``last`` lies
        in the final quarter of its block and the next block is neither here nor being loaded
        (the caller then loads it: :meth:`prefetch`); else None.

        Why: a live series asks for each new bar in turn, and the bar that opens a block paid
        its load (two statements, 1.8 + 1.0 ms quiet, 4-6 ms beside the journal's applier) on
        the request path, once every ``block_bars`` bars: most of a c=1 p99.
        """
        span = self.block_bars * interval_us(interval)
        at = int(np.asarray(last, dtype=TS_DTYPE).astype(np.int64))
        first = (at // span) * span
        if at - first < PREFETCH_FROM * span:
            return None
        slot = (symbol, interval, first + span)
        with self._lock:
            if slot in self._blocks or slot in self._prefetching or self.max_blocks <= 0:
                return None
            self._prefetching.add(slot)
        return first + span

    def prefetch(self, symbol: str, interval: str, first: int, load: LoadBlock) -> None:
        """Load the block that starts at ``first`` (from :meth:`next_to_prefetch`) and keep it,
        by the same rules as a read's; call it once for each ``first`` that method gave."""
        slot = (symbol, interval, first)
        try:
            with self._lock:
                if slot in self._blocks:
                    return
                version = None if self._writes else self._version
            if self._load_and_keep(slot, self.block_bars * interval_us(interval), version, load)[1]:
                with self._lock:
                    self.prefetched += 1
        finally:
            with self._lock:
                self._prefetching.discard(slot)

    # --- writes --------------------------------------------------------------------------
    @contextmanager
    def writing(self, symbols: Iterable[str], interval: str) -> Iterator[None]:
        """Around a write of these series' feature rows or candles: their blocks are dropped,
        and no block read meanwhile is kept."""
        series = {(symbol, interval) for symbol in symbols}
        self._forget(series, +1)
        try:
            yield
        finally:
            self._forget(series, -1)

    def _forget(self, series: set[tuple[str, str]], writes: int) -> None:
        with self._lock:
            self._writes += writes
            self._version += 1
            for slot in [s for s in self._blocks if (s[0], s[1]) in series]:
                del self._blocks[slot]

    def clear(self) -> None:
        with self._lock:
            self._version += 1
            self._blocks.clear()
