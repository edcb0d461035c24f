"""Group commit for one-bar requests: concurrent ``predict_bar`` calls share reads and writes.

A server answers ``POST /inference/run`` one bar at a time, and each bar costs a feature read, a
position read and an upsert. On DuckDB every upsert is its own transaction and file sync
(~3 ms measured), and DuckDB runs one statement at a time: sixteen concurrent requests queue
behind sixteen syncs. The batcher takes every request that is waiting when it gets the loop
(a *cycle*) and serves them together, the way a database's group commit does:

- requests are grouped by series: routed model version, symbol, interval and source;
- within a series, the bars are split into runs of consecutive bars (no bar between two of
  them, so no stored signal between them either). A run is one feature read, one position
  read and one vectorised predict, with the position carried through the run's bars in ts
  order, as sequential requests would carry it through the store, and one upsert;
- a run of one request is served by ``Engine.predict_one`` exactly as without the batcher.

What each request sees is what it would see alone: its own row (requests for the same bar share
it), ``feature_value_missing`` or ``feature_spec_mismatch`` for a bar without a row (the others
in its run are served), ``deadline_exceeded`` or a ``deadline_fallback_hold`` row when its budget
ran out before the read or the write (a hold does not move the position, so the run's other
rows are recomputed without the late bar), and the store's error when the read or the write
fails (the run's rows are written whole or not at all). Each row's ``latency_ms`` runs from its
request's start to the write, waiting included. Stage metrics observe a run once.

A request waits for the cycle in progress at most, so at concurrency 1 the cost is one task
switch. A cancelled request (the server's hard stop) is skipped when its run is settled.

Usage::

    batcher = BarBatcher(engine)
    engine.bar_batcher = batcher      # predict_bar(write=True) now submits here
    ...
    await batcher.stop()
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .domain import SignalBatch, merge_batches
from .engine import DEADLINE_FLAG
from .errors import FeatureSpecMismatch
from .timeutil import TS_DTYPE, interval_us

if TYPE_CHECKING:
    from .engine import Engine, Prepared


@dataclass(eq=False)
class BarRequest:
    prepared: Prepared  # the routed version
    symbol: str
    interval: str
    ts: np.datetime64
    source: str
    deadline: float | None
    fallback_to_hold: bool
    started: float
    future: asyncio.Future[dict[str, Any]]

    def late(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


@dataclass
class BatchStats:
    """What the batcher did (tests and benchmarks read it)."""

    requests: int = 0
    cycles: int = 0
    runs: int = 0  # runs of two or more requests served together
    together: int = 0  # requests served in those runs
    alone: int = 0  # requests served by Engine.predict_one
    widest: int = 0  # the most requests in one run
    by_size: dict[int, int] = field(default_factory=dict)


class BarBatcher:
    """Serves concurrent one-bar requests of an engine together (see the module's docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stats = BatchStats()
        self._pending: list[BarRequest] = []
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, prepared: Prepared, symbol: str, interval: str, ts: np.datetime64, *,
                     source: str, deadline: float | None, fallback_to_hold: bool,
                     started: float) -> dict[str, Any]:
        """The signal row of one bar, as ``Engine.predict_one(..., write=True)`` returns it."""
        self.engine.check_target(prepared, symbol, interval)
        if self._closed:
            return await self.engine.predict_one(prepared, symbol, interval, ts, started, source=source,
                                                 deadline=deadline, fallback_to_hold=fallback_to_hold)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending.append(BarRequest(prepared, symbol, interval, ts, source, deadline,
                                        fallback_to_hold, started, future))
        self.stats.requests += 1
        runner = self._runner
        if runner is None or runner.done():
            self._runner = loop.create_task(self._run(), name="sigserve bar batcher")
        return await future

    async def stop(self) -> None:
        """Serve what is queued, then hand later requests to ``Engine.predict_one``."""
        self._closed = True
        runner = self._runner
        if runner is not None:
            await asyncio.shield(runner)

    # --- the cycle ------------------------------------------------------------------------
    async def _run(self) -> None:
        while self._pending:
            taken, self._pending = self._pending, []
            self.stats.cycles += 1
            try:
                series: dict[tuple[int, str, str, str], list[BarRequest]] = {}
                for request in taken:
                    key = (id(request.prepared), request.symbol, request.interval, request.source)
                    series.setdefault(key, []).append(request)
                if len(series) == 1:
                    await self._series(taken)
                else:
                    await asyncio.gather(*(self._series(requests) for requests in series.values()))
            except BaseException as exc:
                for request in taken:
                    _fail(request, exc)
                if not isinstance(exc, Exception):
                    raise

    async def _series(self, requests: list[BarRequest]) -> None:
        """One series' requests: the late ones alone, the others in runs of consecutive bars."""
        now = time.perf_counter()
        live: list[BarRequest] = []
        for request in requests:
            if request.late(now):
                await self._alone(request)  # a hold row or deadline_exceeded, no read
            else:
                live.append(request)
        if not live:
            return
        live.sort(key=lambda r: r.ts)
        step = np.timedelta64(interval_us(live[0].interval), "us")
        run = [live[0]]
        for request in live[1:]:
            gap = request.ts - run[-1].ts
            if gap == np.timedelta64(0, "us") or gap == step:
                run.append(request)
            else:
                await self._serve(run)
                run = [request]
        await self._serve(run)

    async def _serve(self, run: list[BarRequest]) -> None:
        if len(run) == 1:
            await self._alone(run[0])
            return
        try:
            await self._together(run)
        except FeatureSpecMismatch:
            # a row of another spec in the run: which bar it is, each request's own answer says
            for request in run:
                await self._alone(request)
        except Exception as exc:
            for request in run:
                _fail(request, exc)

    async def _alone(self, request: BarRequest) -> None:
        self.stats.alone += 1
        if request.future.done():
            return
        try:
            row = await self.engine.predict_one(
                request.prepared, request.symbol, request.interval, request.ts, request.started,
                source=request.source, deadline=request.deadline,
                fallback_to_hold=request.fallback_to_hold)
        except Exception as exc:
            _fail(request, exc)
        else:
            _settle(request, row)

    async def _together(self, run: list[BarRequest]) -> None:
        engine = self.engine
        first = run[0]
        prepared, symbol, interval, source = first.prepared, first.symbol, first.interval, first.source
        stats = self.stats
        stats.runs += 1
        stats.together += len(run)
        stats.widest = max(stats.widest, len(run))
        stats.by_size[len(run)] = stats.by_size.get(len(run), 0) + 1
        wanted = np.unique(np.array([r.ts for r in run], dtype=TS_DTYPE))
        result = await engine.run_bars(prepared.definition.signal_id, symbol, interval, wanted,
                                       source=source, prepared=prepared, write=False)
        read, features = result.batch, result.features
        row_of = {int(t): i for i, t in enumerate(read.ts.astype(np.int64))}
        by_row: dict[int, list[BarRequest]] = {}
        missing: list[BarRequest] = []
        for request in run:
            i = row_of.get(int(np.asarray(request.ts, dtype=TS_DTYPE).astype(np.int64)))
            if i is None:
                missing.append(request)
            else:
                by_row.setdefault(i, []).append(request)
        now = time.perf_counter()
        # A bar is late when every request for it is. Its row becomes a hold, stored when one of
        # them falls back to hold; a hold does not move the position, so the other bars are
        # recomputed from the same start without it.
        late = sorted(i for i, requests in by_row.items() if all(r.late(now) for r in requests))
        batch = read
        served: dict[int, tuple[SignalBatch, int]] = {i: (read, i) for i in by_row}
        holds: SignalBatch | None = None
        if late and features is not None:
            keep = sorted(set(by_row) - set(late))
            features = features.take(np.array(keep, dtype=np.int64))
            batch, _ = engine.compute(prepared, features, result.start_side, source)
            served = {i: (batch, j) for j, i in enumerate(keep)}
            fallback = [i for i in late if any(r.fallback_to_hold for r in by_row[i])]
            if fallback:
                holds = engine.hold_batch(prepared, symbol, interval, read.ts[fallback], source,
                                          DEADLINE_FLAG, read.feature_keys[fallback])
                served.update({i: (holds, j) for j, i in enumerate(fallback)})
        stamp = time.perf_counter()  # latency: from a bar's first request to its write
        for i, (rows, j) in served.items():
            rows.latency_ms[j] = (stamp - min(r.started for r in by_row[i])) * 1000.0
        parts = [rows for rows in (batch, holds) if rows is not None and len(rows)]
        if parts:
            await engine._write(parts[0] if len(parts) == 1 else merge_batches(parts))
        late_rows = set(late)
        for i, requests in by_row.items():
            for request in requests:
                if i in late_rows and not (request.fallback_to_hold and i in served):
                    _fail(request, _deadline_exceeded(engine, request))
                else:
                    rows, j = served[i]
                    _settle(request, rows.row(j))
        if prepared.shadows and features is not None:
            for j in range(len(batch)):
                one = np.array([j])
                await engine._shadow(prepared, features.take(one), batch.take(one), source, True)
        for request in missing:
            if request.future.done():
                continue
            try:
                await engine.refuse_missing(prepared, symbol, interval, request.ts)
            except Exception as exc:
                _fail(request, exc)


def _deadline_exceeded(engine: Engine, request: BarRequest) -> Exception:
    try:
        engine._late(request.prepared, request.symbol, request.interval,
                     np.array([request.ts], dtype=TS_DTYPE), request.source,
                     request.deadline if request.deadline is not None else time.perf_counter(),
                     False, "the write")
    except Exception as exc:
        return exc
    raise AssertionError("Engine._late refuses without fallback_to_hold")


def _settle(request: BarRequest, row: dict[str, Any]) -> None:
    if not request.future.done():
        request.future.set_result(row)


def _fail(request: BarRequest, exc: BaseException) -> None:
    if not request.future.done():
        if isinstance(exc, asyncio.CancelledError):
            request.future.cancel()
        else:
            request.future.set_exception(exc)
