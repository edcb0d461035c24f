"""The position of each signal history, kept in memory by the DuckDB store.

A bar's policy needs the position the signal held before it: the side of the newest non-hold,
non-shadow row of its history (signal_id, model_version, symbol, interval) before the bar. A
DuckDB file has one writing process, so the store that holds it sees every write and can answer
from memory instead of SQL (a point SELECT costs ~1 ms here, and needs the signal journal applied
first, which waits for the applier's DuckDB commit).

Two levels per history:

- its *summary*: the newest row's ts, the side after it, and the ts of the newest non-hold row.
  It answers a bar after everything written (the live case) and costs one aggregate scan to
  learn;
- its *events*: the ts and side of every non-hold row, sorted, loaded on the first read inside
  history (a replay, a correction). It answers any bar with a binary search, and takes the writes
  of replays without SQL. Loaded events are bounded (``MAX_EVENTS`` in all, least recently used
  histories dropped first; a history of more than ``MAX_HISTORY_EVENTS`` non-hold rows is not
  loaded); a history not loaded is read with SQL, as before.

Every write of a history's rows (journaled, straight, or a bulk chunk once committed) goes
through :meth:`PositionBook.remember`; a history whose write cannot be followed exactly is
forgotten and learnt again on its next read. Reads and writes may come from the event loop and
from worker threads (bulk chunks): one lock guards the book, and every step under it is a
binary search or a copy bounded by the history's events (a write of more than ``MERGE_ROWS``
rows drops the history's events instead: loaded again by the next read inside it).

Usage::

    book = PositionBook()
    book.learn(key, newest_ts, side, last_event_ts)   # from one aggregate scan
    book.learn_empty(key)                             # ... which found no row
    side = book.side_after_newest(key, ts)            # None: not known, or ts is inside history
    book.load_events(key, event_ts, event_sides)      # from one scan of the non-hold rows
    sides = book.sides_before(key, before)            # None: the events are not loaded
    book.remember(batch)                              # after every write of signal rows
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..domain import ACTIONS, BUY, FLAT, HOLD, LONG, SELL, SHORT, SignalBatch
from ..timeutil import TS_DTYPE

Key = tuple[str, int, str, str]  # signal_id, model_version, symbol, interval


def history_of(batch: SignalBatch) -> Key:
    """The signal history a batch's rows belong to."""
    return (batch.signal_id, int(batch.model_version), batch.symbol, batch.interval)
MAX_EVENTS = 4_000_000  # loaded events in all: ~36 MB (8-byte ts, 1-byte side)
MERGE_ROWS = 4_096  # a write of more rows drops the history's events instead of merging them
# A history with more non-hold rows is not loaded (read with SQL): a row put inside history
# shifts the later ones, ~0.07 ms at this size (a 16-row group: 1.1 ms; at 1M rows 0.25 / 4 ms)
MAX_HISTORY_EVENTS = 262_144
PUT_ROWS = 64  # up to this many rows are put one by one; more are merged (two passes)
# side after an action code: hold keeps the position, so it is never an event
SIDE_OF_CODE = np.zeros(len(ACTIONS), dtype=np.int8)  # FLAT for hold (never used), close_long, close_short
SIDE_OF_CODE[[BUY, SELL]] = LONG, SHORT
_NEVER = np.iinfo(np.int64).min


@dataclass(slots=True)
class _Events:
    """Sorted event ts (int64 us) and sides, in arrays with room to grow at the end."""

    ts: np.ndarray
    side: np.ndarray
    count: int

    @classmethod
    def of(cls, ts: np.ndarray, side: np.ndarray) -> _Events:
        n = int(ts.shape[0])
        room = max(16, n + n // 4)
        out = cls(np.empty(room, dtype=np.int64), np.empty(room, dtype=np.int8), n)
        out.ts[:n] = ts
        out.side[:n] = side
        return out

    def sides_before(self, before: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.ts[:self.count], before, side="left") - 1
        return np.where(at >= 0, self.side[np.maximum(at, 0)], np.int8(FLAT)).astype(np.int8)

    def last(self) -> tuple[int, int]:
        """(ts, side) of the newest event; (_NEVER, FLAT) when there is none."""
        if self.count == 0:
            return _NEVER, FLAT
        return int(self.ts[self.count - 1]), int(self.side[self.count - 1])

    def put(self, ts: int, side: int | None) -> None:
        """The row at ``ts`` is now an event of ``side``, or not one (None)."""
        n = self.count
        i = int(np.searchsorted(self.ts[:n], ts, side="left"))
        present = i < n and int(self.ts[i]) == ts
        if side is None:
            if present:
                self.ts[i:n - 1] = self.ts[i + 1:n].copy()
                self.side[i:n - 1] = self.side[i + 1:n].copy()
                self.count = n - 1
            return
        if present:
            self.side[i] = side
            return
        if n == self.ts.shape[0]:
            self.ts = np.concatenate((self.ts, np.empty(n, dtype=np.int64)))
            self.side = np.concatenate((self.side, np.empty(n, dtype=np.int8)))
        if i < n:  # inside: shift the later events by one (bounded by the history's events)
            self.ts[i + 1:n + 1] = self.ts[i:n].copy()
            self.side[i + 1:n + 1] = self.side[i:n].copy()
        self.ts[i] = ts
        self.side[i] = side
        self.count = n + 1

    def merge(self, ts: np.ndarray, side: np.ndarray) -> None:
        """Several rows at once (``ts`` unique, any order): rows at those ts replaced, non-hold
        ones added. Two passes over the events (a delete and an insert, both sorted): no sort
        of the whole history."""
        n = self.count
        order = np.argsort(ts, kind="stable")
        ts, side = ts[order], side[order]
        old_ts, old_side = self.ts[:n], self.side[:n]
        at = np.searchsorted(old_ts, ts)
        hit = (at < n) & (old_ts[np.minimum(at, max(n - 1, 0))] == ts) if n else np.zeros(ts.shape, bool)
        kept_ts, kept_side = np.delete(old_ts, at[hit]), np.delete(old_side, at[hit])
        events = side != np.int8(-128)  # -128 marks a hold row (see PositionBook.remember)
        where = np.searchsorted(kept_ts, ts[events])
        merged = _Events.of(np.insert(kept_ts, where, ts[events]), np.insert(kept_side, where, side[events]))
        self.ts, self.side, self.count = merged.ts, merged.side, merged.count


@dataclass(slots=True)
class _History:
    newest: int  # ts (us) of the newest row, any action
    side: int  # the side after it
    last_event: int  # ts (us) of the newest non-hold row; _NEVER when none
    events: _Events | None = field(default=None)


class PositionBook:
    """What the store knows of each history's positions (see the module docstring)."""

    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self.max_events = max_events
        self._lock = threading.Lock()
        self._histories: dict[Key, _History] = {}
        self._loaded: OrderedDict[Key, int] = OrderedDict()  # histories with events, LRU first
        self._loaded_events = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._histories

    @property
    def loaded_events(self) -> int:
        return self._loaded_events

    def learn(self, key: Key, newest: np.datetime64, side: int, last_event: np.datetime64 | None) -> None:
        """The summary of a history, from the table (after its pending rows are applied)."""
        with self._lock:
            self._histories[key] = _History(_us(newest), int(side),
                                            _NEVER if last_event is None else _us(last_event))

    def learn_empty(self, key: Key) -> None:
        """A history with no row (its first write is followed like any append)."""
        with self._lock:
            self._histories[key] = _History(_NEVER, FLAT, _NEVER)

    def known_empty(self, key: Key) -> bool:
        history = self._histories.get(key)
        return history is not None and history.newest == _NEVER

    def summary(self, key: Key) -> tuple[np.datetime64, int, np.datetime64 | None] | None:
        """(newest ts, side after it, ts of the newest non-hold row) of a known history with
        rows; None when it is not known or has none."""
        history = self._histories.get(key)
        if history is None or history.newest == _NEVER:
            return None
        last = None if history.last_event == _NEVER else np.datetime64(history.last_event, "us")
        return np.datetime64(history.newest, "us"), history.side, last

    def side_after_newest(self, key: Key, before: np.ndarray) -> int | None:
        """The side for bars all after the history's newest row (the live case); None when the
        history is not known or a bar is not after it."""
        history = self._histories.get(key)
        if history is None or int(np.asarray(before, dtype=TS_DTYPE).astype(np.int64).min()) <= history.newest:
            return None
        return history.side

    def sides_before(self, key: Key, before: np.ndarray) -> np.ndarray | None:
        """The side before each bar of ``before``; None when the history's events are not loaded."""
        with self._lock:
            history = self._histories.get(key)
            if history is None or history.events is None:
                return None
            self._loaded.move_to_end(key)
            return history.events.sides_before(np.asarray(before, dtype=TS_DTYPE).astype(np.int64))

    def load_events(self, key: Key, ts: np.ndarray, actions: np.ndarray) -> bool:
        """Every non-hold row of a known history (ascending ``ts``, action codes), read from the
        table after its pending rows were applied; False when they would not fit."""
        ts_us = np.asarray(ts, dtype=TS_DTYPE).astype(np.int64)
        n = int(ts_us.shape[0])
        if n > min(MAX_HISTORY_EVENTS, self.max_events // 2):
            return False
        with self._lock:
            history = self._histories.get(key)
            if history is None:
                return False
            self._drop_events(key)
            while self._loaded and self._loaded_events + n > self.max_events:
                self._drop_events(next(iter(self._loaded)))
            history.events = _Events.of(ts_us, SIDE_OF_CODE[np.asarray(actions, dtype=np.int64)])
            self._loaded[key] = n
            self._loaded_events += n
            return True

    def remember(self, batch: SignalBatch) -> None:
        """A committed or journaled write of ``batch``'s rows (one row per ts)."""
        if batch.shadow or len(batch) == 0:
            return
        key = history_of(batch)
        with self._lock:
            history = self._histories.get(key)
            if history is None:
                return
            ts = np.asarray(batch.ts, dtype=TS_DTYPE).astype(np.int64)
            codes = np.asarray(batch.action, dtype=np.int64)
            lo, hi = int(ts.min()), int(ts.max())
            events = history.events
            if events is not None and ts.shape[0] > MERGE_ROWS:
                # a bulk write (a backfill chunk, on a worker thread): dropping the events is
                # O(1) under the lock, where a merge would hold up every other history's reads
                # and writes; the next read inside this history loads them again
                self._drop_events(key)
                events = None
            if events is None:
                if lo > history.newest:  # an append: the live case
                    history.newest = hi
                    self._append_events(history, ts, codes)
                elif hi >= history.last_event:  # the newest event may have changed: learn again
                    del self._histories[key]
                else:  # rows before the newest event, which decides the newest position
                    history.newest = max(history.newest, hi)
                return
            if ts.shape[0] <= PUT_ROWS or (lo > history.newest and lo > events.last()[0]):
                # one by one: a few rows, or an append (each put at the end)
                for t, code in zip(ts.tolist(), codes.tolist(), strict=True):
                    events.put(t, None if code == HOLD else int(SIDE_OF_CODE[code]))
            else:
                sides = np.where(codes == HOLD, -128, SIDE_OF_CODE[codes]).astype(np.int8)
                events.merge(ts, sides)
            grown = events.count - self._loaded[key]
            self._loaded[key] = events.count
            self._loaded_events += grown
            history.newest = max(history.newest, hi)
            history.last_event, history.side = events.last()
            if self._loaded_events > self.max_events:
                self._drop_events(next(iter(self._loaded)))

    # --- under the lock ---------------------------------------------------------------------
    def _append_events(self, history: _History, ts: np.ndarray, codes: np.ndarray) -> None:
        entries = np.flatnonzero(codes != HOLD)
        if entries.size:
            last = int(entries[-1])
            history.side, history.last_event = int(SIDE_OF_CODE[int(codes[last])]), int(ts[last])

    def _drop_events(self, key: Key) -> None:
        n = self._loaded.pop(key, None)
        if n is None:
            return
        self._loaded_events -= n
        history = self._histories.get(key)
        if history is not None:
            history.events = None


def _us(ts: np.datetime64) -> int:
    return int(np.asarray(ts, dtype=TS_DTYPE).astype(np.int64))
