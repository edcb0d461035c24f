"""The backfill driver: whole windows of bars through the engine, in vectorised chunks.

Three modes:

- ``window``: every bar with features in [start, end];
- ``last``: continue after the newest signal row of that signal and symbol, up to the newest
  feature row;
- ``ts-list``: exactly the listed bars.

Each chunk is read, predicted and written in one transaction, so a rerun (or a crash and rerun)
never duplicates or half-writes a chunk. Positions carry from one chunk to the next.

Usage::

    report = await run_backfill(engine, BackfillRequest("trend-1h", "BTCUSDT", "1h",
                                                        mode="window", start=a, end=b),
                                max_rows=5_000_000, chunk_rows=250_000)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .domain import Source
from .engine import Engine
from .errors import BackfillWindowTooLarge, ValidationError
from .timeutil import check_window, format_ts, interval_us, unique_ts

MODES = ("window", "last", "ts-list")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class BackfillRequest:
    signal_id: str
    symbol: str
    interval: str
    mode: str = "window"
    start: np.datetime64 | None = None
    end: np.datetime64 | None = None
    ts: tuple[np.datetime64, ...] = ()
    source: str = Source.HISTORICAL_REPLAY


@dataclass
class BackfillReport:
    signal_id: str
    symbol: str
    interval: str
    mode: str
    start: np.datetime64 | None
    end: np.datetime64 | None
    rows_written: int = 0
    rows_skipped_missing_features: int = 0
    chunks: int = 0
    elapsed_s: float = 0.0
    actions: dict[str, int] = field(default_factory=dict)

    @property
    def bars_per_s(self) -> float:
        return self.rows_written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "signal_id": self.signal_id, "symbol": self.symbol, "interval": self.interval,
            "mode": self.mode,
            "start": format_ts(self.start) if self.start is not None else None,
            "end": format_ts(self.end) if self.end is not None else None,
            "rows_written": self.rows_written,
            "rows_skipped_missing_features": self.rows_skipped_missing_features,
            "chunks": self.chunks, "elapsed_s": round(self.elapsed_s, 4),
            "bars_per_s": round(self.bars_per_s, 1), "actions": self.actions,
        }


async def run_backfill(engine: Engine, request: BackfillRequest, *, max_rows: int,
                       chunk_rows: int, progress: ProgressFn | None = None) -> BackfillReport:
    if request.mode not in MODES:
        raise ValidationError(f"unknown backfill mode {request.mode!r}: use one of {list(MODES)}",
                              details={"mode": request.mode})
    started = time.perf_counter()
    prepared = await engine.prepare(request.signal_id)
    engine.check_target(prepared, request.symbol, request.interval)
    store = engine.store
    step = np.timedelta64(interval_us(request.interval), "us")
    report = BackfillReport(request.signal_id, request.symbol, request.interval, request.mode,
                            request.start, request.end)
    actions = np.zeros(5, dtype=np.int64)

    if request.mode == "ts-list":
        if not request.ts:
            raise ValidationError("ts-list mode needs at least one --ts")
        wanted = unique_ts(request.ts)
        if wanted.size > max_rows:
            raise _too_large(wanted.size, max_rows)
        report.start, report.end = wanted[0], wanted[-1]
        result = await engine.run_bars(request.signal_id, request.symbol, request.interval,
                                       wanted, source=request.source, prepared=prepared)
        report.rows_written = result.rows_written
        report.rows_skipped_missing_features = result.rows_skipped_missing_features
        report.chunks = 1
        for batch in (result.batch, *result.extra):  # a rollout routes bars to two versions
            actions += np.bincount(batch.action, minlength=5)
        if progress:
            progress(int(wanted.size), int(wanted.size))
    else:
        start, end = request.start, request.end
        if request.mode == "last":
            last = await store.last_signal_ts(request.signal_id, request.symbol, request.interval)
            start = last + step if last is not None else None
            end = None
        elif start is None or end is None:
            raise ValidationError("window mode needs --start and --end")
        if start is not None and end is not None:
            check_window(start, end)
        count, first, newest = await store.feature_window_stats(
            request.symbol, request.interval, start, end)
        if count > max_rows:
            raise _too_large(count, max_rows)
        report.start = start if start is not None else first
        report.end = end if end is not None else newest
        lo, hi = report.start, report.end
        if lo is not None and hi is not None and (count or request.mode == "window"):
            side: int | None = None
            span = step * chunk_rows
            chunk_start = lo
            done = 0
            while chunk_start <= hi:
                chunk_end = min(chunk_start + span - np.timedelta64(1, "us"), hi)
                result = await engine.run_window(
                    request.signal_id, request.symbol, request.interval, chunk_start, chunk_end,
                    source=request.source, prepared=prepared, start_side=side)
                side = result.end_side
                report.rows_written += result.rows_written
                report.rows_skipped_missing_features += result.rows_skipped_missing_features
                report.chunks += 1
                for batch in (result.batch, *result.extra):  # a rollout: two versions' rows
                    actions += np.bincount(batch.action, minlength=5)
                    done += len(batch)
                if progress:
                    progress(min(done, count), count)
                chunk_start = chunk_end + np.timedelta64(1, "us")
    from .domain import ACTIONS

    report.actions = {ACTIONS[i]: int(c) for i, c in enumerate(actions) if c}
    report.elapsed_s = time.perf_counter() - started
    return report


def _too_large(rows: int, limit: int) -> BackfillWindowTooLarge:
    return BackfillWindowTooLarge(
        f"the window holds {rows} bars, over SIGSERVE_MAX_BACKFILL_ROWS={limit}: split it",
        details={"rows": int(rows), "max_rows": int(limit)})
