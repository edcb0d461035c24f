"""Group commit for one-bar requests: concurrent ``predict_bar`` calls share reads and writes.

A server answers ``POST /inference/run`` one bar at a time, and each bar costs a feature read, a
position read and an upsert. On DuckDB every upsert is its own transaction and file sync
(~3 ms measured), and DuckDB runs one statement at a time: sixteen concurrent requests queue
behind sixteen syncs. The batcher takes every request that is waiting when it gets the loop
(a *cycle*) and serves them together, the way a database's group commit does:

- requests are grouped by series: signal, routed model version, symbol, interval and source;
- a series' requests are one feature read, one position read (the position before each run of
  consecutive bars among them) and one upsert; each run is one vectorised predict, with the
  position carried through its bars in ts order, as one request after another carries it
  through the store. Runs start from the store as it was before the cycle: the answer
  sequential requests give in descending order of runs (a later run's rows never move the
  position before an earlier one), and concurrent requests may be answered in any order;
- a series with one request is served by ``Engine.predict_one`` exactly as without the batcher.

What each request sees is what it would see alone: its own row (requests for the same bar share
it), ``feature_value_missing`` or ``feature_spec_mismatch`` for a bar without a row (the others
in its run are served), ``deadline_exceeded`` or a ``deadline_fallback_hold`` row when its budget
ran out before the read or the write (a hold does not move the position, so the run's other
rows are recomputed without the late bar), and the store's error when the read or the write
fails (the series' rows are written whole or not at all). Each row's ``latency_ms`` runs from its
request's start to the write, waiting included. Stage metrics observe a group once.

A request waits for the cycle in progress at most, plus ``linger_s`` when the last cycle served
several requests (their answers come back as the next burst a little later; without the wait,
16 connections settled into groups of ~5). At concurrency 1 the cost is one task switch. A
cancelled request (the server's hard stop) is skipped when its group is settled.

Usage::

    batcher = BarBatcher(engine)
    engine.bar_batcher = batcher      # predict_bar(write=True) now submits here
    ...
    await batcher.stop()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .domain import merge_batches
from .engine import DEADLINE_FLAG
from .errors import FeatureSpecMismatch

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
    alone: int = 0  # requests served by Engine.predict_one
    by_size: dict[int, int] = field(default_factory=dict)  # groups of two or more, by size

    @property
    def groups(self) -> int:
        return sum(self.by_size.values())

    @property
    def together(self) -> int:
        """Requests served in groups."""
        return sum(size * n for size, n in self.by_size.items())

    @property
    def widest(self) -> int:
        return max(self.by_size, default=0)


class BarBatcher:
    """Serves concurrent one-bar requests of an engine together (see the module's docstring)."""

    def __init__(self, engine: Engine, on_group: Callable[[int], None] | None = None,
                 linger_s: float = 0.0005) -> None:
        self.engine = engine
        self.on_group = on_group  # called with each group's size (a server's metrics)
        # After a cycle of several requests, the next waits this long for more to join: the
        # answers of one cycle come back as the next burst of requests a little later
        self.linger_s = linger_s
        self._last_cycle = 0
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
            if self._last_cycle > 1 and self.linger_s > 0:
                await asyncio.sleep(self.linger_s)
            taken, self._pending = self._pending, []
            self._last_cycle = len(taken)
            self.stats.cycles += 1
            try:
                series: dict[tuple[str, int, str, str, str], list[BarRequest]] = {}
                for request in taken:
                    card = request.prepared.card
                    key = (request.prepared.definition.signal_id, card.version, request.symbol,
                           request.interval, request.source)
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
        """One series' requests: the late ones alone, the others together."""
        now = time.perf_counter()
        live: list[BarRequest] = []
        for request in requests:
            if request.late(now):
                await self._alone(request)  # a hold row or deadline_exceeded, no read
            else:
                live.append(request)
        if live and self.on_group is not None:
            self.on_group(len(live))
        if len(live) == 1:
            await self._alone(live[0])
        elif live:
            try:
                await self._together(live)
            except FeatureSpecMismatch:
                # a row of another spec among them: which bar it is, each request's answer says
                for request in live:
                    await self._alone(request)
            except Exception as exc:  # the store's error is every request's answer
                for request in live:
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

    async def _together(self, requests: list[BarRequest]) -> None:
        """One read, one position read, a predict per run of consecutive bars, one write.

        Every run starts from the position the store holds before it, read before this cycle
        writes anything (``Engine.read_runs``). That is what sequential requests give when the
        runs come in descending ts order (a run's rows never change the position before an
        earlier run), and concurrent requests may be answered in any order; within a run the
        position is carried in ts order, as one request after another carries it through the store.
        """
        engine = self.engine
        first = requests[0]
        prepared, symbol, interval, source = first.prepared, first.symbol, first.interval, first.source
        self.stats.by_size[len(requests)] = self.stats.by_size.get(len(requests), 0) + 1
        runs = await engine.read_runs(prepared, symbol, interval, np.array([r.ts for r in requests]))
        by_row: dict[int, list[BarRequest]] = {}
        missing: list[BarRequest] = []
        for request in requests:
            i = runs.row_of(request.ts)
            if i is None:
                missing.append(request)
            else:
                by_row.setdefault(i, []).append(request)
        parts, served = engine.compute_runs(prepared, runs, source)
        now = time.perf_counter()
        # A bar is late when every request for it is late or gone (the server's hard stop
        # answered it 504: its row is not written, as a lone request's cancelled write is not).
        # Its row becomes a hold, stored when a request still waiting falls back to hold; a hold
        # does not move the position, so the other bars of its run are recomputed without it.
        late = {i for i, waiting in by_row.items() if all(r.late(now) or r.future.done() for r in waiting)}
        if late:
            parts, served = engine.compute_runs(prepared, runs, source, skip=late)
            fallback = sorted(i for i in late
                              if any(r.fallback_to_hold and not r.future.done() for r in by_row[i]))
            if fallback:
                features = runs.features
                holds = engine.hold_batch(prepared, symbol, interval, features.ts[fallback], source,
                                          DEADLINE_FLAG, features.feature_keys[fallback])
                parts.append(holds)
                served.update({i: (holds, j) for j, i in enumerate(fallback)})
        stamp = time.perf_counter()  # latency: from a bar's first request to its write
        for i, (rows, j) in served.items():
            rows.latency_ms[j] = (stamp - min(r.started for r in by_row[i])) * 1000.0
        if parts:
            await engine._write(parts[0] if len(parts) == 1 else merge_batches(parts))
        for i, waiting in by_row.items():
            for request in waiting:
                if i in late and not (request.fallback_to_hold and i in served):
                    deadline = request.deadline if request.deadline is not None else now
                    _fail(request, engine.deadline_error(prepared, deadline, "the write"))
                else:
                    rows, j = served[i]
                    _settle(request, rows.row(j))
        if prepared.shadows:
            for i, (rows, j) in served.items():
                if i not in late:
                    await engine._shadow(prepared, runs.features.take(np.array([i])),
                                         rows.take(np.array([j])), source, True)
        for request in missing:
            if request.future.done():
                continue
            try:
                await engine.refuse_missing(prepared, symbol, interval, request.ts)
            except Exception as exc:
                _fail(request, exc)


def _settle(request: BarRequest, row: dict[str, Any]) -> None:
    if not request.future.done():
        request.future.set_result(row)


def _fail(request: BarRequest, exc: BaseException) -> None:
    if not request.future.done():
        if isinstance(exc, asyncio.CancelledError):
            request.future.cancel()
        else:
            request.future.set_exception(exc)
