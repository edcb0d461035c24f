"""The bar batcher (group commit of concurrent one-bar requests) on DuckDB and PostgreSQL.

Concurrent ``predict_bar`` calls through a ``BarBatcher`` must give every caller, and the store,
what sequential calls give: the same rows (positions carried through consecutive bars), the
same refusals per request (a bar without features, a budget that ran out), nothing written by a
run whose write failed. A reference signal on the same model, served one call at a time in ts
order without the batcher, gives the expected rows.
"""

# ruff: noqa: F811  (``models``: test_engine's module-scoped fixture, imported and then requested)
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.bar_batch import BarBatcher
from sigserve.config import Settings
from sigserve.engine import DEADLINE_FLAG
from sigserve.errors import SigserveError, StoreUnavailable
from tests.integration.conftest import postgres_url
from tests.integration.test_engine import (
    BTC,
    ETH,
    INTERVAL,
    ModelFactory,
    add_signal,
    complete_rows,
    import_market,
    market,
    models,  # noqa: F401
    stable,
)

DROP = ("signal_id",)  # the reference and the batched signal differ in their id only
FIRST = 300  # a bar well inside the complete rows


@pytest.fixture(params=["duckdb", "postgres"])
async def services(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Services]:
    store = None if request.param == "duckdb" else postgres_url(tmp_path)
    async with Services.open(Settings(home=tmp_path / "home", store=store)) as opened:
        opened.engine.prepared_ttl_s = 60.0  # as a server keeps them: requests submit at once
        yield opened


async def two_signals(services: Services, models: ModelFactory, symbols: tuple[str, ...] = (BTC,),
                      rows: np.ndarray | None = None) -> None:
    """``ref`` (served alone) and ``bat`` (served through the batcher), on one model."""
    for symbol in symbols:
        await import_market(services, symbol, market(symbol), rows)
    await add_signal(services, models, signal_id="ref")
    await add_signal(services, models, signal_id="bat")
    await add_signal(services, models, signal_id="other")
    await services.engine.prepare("bat")  # the model load is no request's latency


def bars(symbol: str, first: int, n: int) -> list[np.datetime64]:
    return [market(symbol).ts[i] for i in range(first, first + n)]


async def sequential(services: Services, symbol: str, ts: list[np.datetime64], signal: str = "ref",
                     **kwargs: Any) -> list[dict[str, Any] | str]:
    """The reference: one call at a time, in ts order (an error is its code)."""
    out: list[dict[str, Any] | str] = []
    for t in sorted(ts):
        try:
            out.append(await services.engine.predict_bar(signal, symbol, INTERVAL, t, **kwargs))
        except SigserveError as exc:
            out.append(exc.code)
    return out


async def by_runs(services: Services, symbol: str,
                  runs: list[list[np.datetime64]]) -> list[dict[str, Any] | str]:
    """The reference of concurrent runs: the runs (of consecutive bars, ascending) one request at
    a time, the latest run first; the answers in the runs' order."""
    answers = [await sequential(services, symbol, run) for run in runs[::-1]]
    return [a for run in answers[::-1] for a in run]


async def concurrent(services: Services, symbol: str, ts: list[np.datetime64],
                     **kwargs: Any) -> list[dict[str, Any] | str]:
    """Every call at once, through the batcher (an error is its code), in the order of ``ts``."""
    async def one(t: np.datetime64) -> dict[str, Any] | str:
        try:
            return await services.engine.predict_bar("bat", symbol, INTERVAL, t, **kwargs)
        except SigserveError as exc:
            return exc.code

    return list(await asyncio.gather(*(one(t) for t in ts)))


def comparable(row: dict[str, Any] | str) -> dict[str, Any] | str:
    if isinstance(row, str):
        return row
    out = {k: v for k, v in row.items() if k not in (*DROP, "latency_ms")}
    out["raw_output"] = [None if v != v else v for v in row["raw_output"]]
    return out


async def stored(services: Services, signal_id: str, symbol: str = BTC) -> list[dict[str, Any]]:
    rows = stable(await services.store.read_signals(signal_id, symbol, INTERVAL), DROP)
    for row in rows:  # a hold's NaN output: NaN != NaN
        row["raw_output"] = [None if v != v else v for v in row["raw_output"]]
    return rows


def count_writes(services: Services, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row count of every store write from now on."""
    sizes: list[int] = []
    write = services.store.write_signals

    async def counted(batch: Any) -> int:
        sizes.append(len(batch))
        return await write(batch)

    monkeypatch.setattr(services.store, "write_signals", counted)
    return sizes


async def test_concurrent_bars_equal_sequential_ones_in_one_write(
    services: Services, models: ModelFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await two_signals(services, models)
    ts = bars(BTC, FIRST, 64)
    expected = await sequential(services, BTC, ts, source="stream")
    actions = {r["action"] for r in expected if isinstance(r, dict)}
    assert {"close_long", "close_short"} & actions, actions  # positions are carried, and compared

    batcher = services.engine.bar_batcher = BarBatcher(services.engine)
    writes = count_writes(services, monkeypatch)
    order = np.random.default_rng(5).permutation(len(ts))
    got = await concurrent(services, BTC, [ts[i] for i in order], source="stream")
    by_ts = {r["ts"]: r for r in got if isinstance(r, dict)}
    assert [comparable(by_ts[r["ts"]]) for r in expected if isinstance(r, dict)] == \
        [comparable(r) for r in expected]
    assert await stored(services, "bat") == await stored(services, "ref")
    assert (batcher.stats.groups, batcher.stats.widest, writes) == (1, 64, [64])
    assert all(r["latency_ms"] > 0 for r in by_ts.values())

    # the same bars again (replayed: positions from inside the history), twice each
    again = await concurrent(services, BTC, ts + ts[::-1], source="stream")
    assert [comparable(r) for r in again] == [comparable(by_ts[r["ts"]]) for r in again
                                              if isinstance(r, dict)]
    assert writes == [64, 64]
    assert await stored(services, "bat") == await stored(services, "ref")


async def test_runs_split_at_gaps_and_series_are_independent(
    services: Services, models: ModelFactory,
) -> None:
    await two_signals(services, models, symbols=(BTC, ETH))
    # two runs, with stored bars between them (the second starts from the position they left),
    # and scattered bars (runs of one, each from its own stored position)
    btc_runs = [bars(BTC, FIRST, 10), bars(BTC, FIRST + 40, 10), bars(BTC, FIRST + 55, 1),
                bars(BTC, FIRST + 60, 1), bars(BTC, FIRST + 62, 2)]
    btc = [t for run in btc_runs for t in run]
    eth = bars(ETH, FIRST + 5, 12)
    for signal in ("ref", "bat", "other"):
        await sequential(services, BTC, bars(BTC, FIRST + 10, 30), signal)
    expected_btc = await by_runs(services, BTC, btc_runs)
    expected_eth = await sequential(services, ETH, eth)
    # the runs' start positions differ from an ascending replay's: the test tells them apart
    ascending = await sequential(services, BTC, btc, "other")
    assert [comparable(r) for r in ascending] != [comparable(r) for r in expected_btc]

    batcher = services.engine.bar_batcher = BarBatcher(services.engine)

    async def both() -> tuple[list[Any], list[Any]]:
        a, b = await asyncio.gather(concurrent(services, BTC, btc), concurrent(services, ETH, eth))
        return a, b

    got_btc, got_eth = await both()
    assert [comparable(r) for r in got_btc] == [comparable(r) for r in expected_btc]
    assert [comparable(r) for r in got_eth] == [comparable(r) for r in expected_eth]
    assert batcher.stats.by_size == {24: 1, 12: 1}
    for symbol in (BTC, ETH):
        assert await stored(services, "bat", symbol) == await stored(services, "ref", symbol)


async def test_a_bar_without_features_is_refused_alone(services: Services, models: ModelFactory) -> None:
    rows = complete_rows()
    hole = FIRST + 7
    await two_signals(services, models, rows=rows[rows != hole])
    ts = bars(BTC, FIRST, 16)
    expected = await by_runs(services, BTC, [ts[:7], ts[7:8], ts[8:]])  # split at the hole
    assert expected[7] == "feature_value_missing"
    services.engine.bar_batcher = BarBatcher(services.engine)
    got = await concurrent(services, BTC, ts)
    assert [comparable(r) for r in got] == [comparable(r) for r in expected]
    assert await stored(services, "bat") == await stored(services, "ref")
    assert len(await stored(services, "bat")) == 15


async def slow_reads(services: Services, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    read = services.store.read_features

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(seconds)
        return await read(*args, **kwargs)

    monkeypatch.setattr(services.store, "read_features", slow)


@pytest.mark.parametrize("fallback", [True, False])
async def test_a_budget_that_runs_out_during_the_read(
    services: Services, models: ModelFactory, monkeypatch: pytest.MonkeyPatch, fallback: bool,
) -> None:
    await two_signals(services, models)
    ts = bars(BTC, FIRST, 24)
    late = set(range(3, 24, 4))  # these requests have a budget shorter than the read
    # the reference: the late bars answered past their budget one at a time
    for i, t in enumerate(ts):
        deadline = time.perf_counter() - 1.0 if i in late else None
        try:
            await services.engine.predict_bar("ref", BTC, INTERVAL, t, deadline=deadline,
                                              fallback_to_hold=fallback)
        except SigserveError as exc:
            assert exc.code == "deadline_exceeded" and not fallback
    batcher = services.engine.bar_batcher = BarBatcher(services.engine)
    await slow_reads(services, monkeypatch, 0.05)
    now = time.perf_counter()

    async def one(i: int) -> dict[str, Any] | str:
        deadline = now + (0.01 if i in late else 30.0)
        try:
            return await services.engine.predict_bar("bat", BTC, INTERVAL, ts[i], deadline=deadline,
                                                     fallback_to_hold=fallback)
        except SigserveError as exc:
            assert exc.details["before"] == "the write"
            return exc.code

    got = await asyncio.gather(*(one(i) for i in range(len(ts))))
    assert batcher.stats.groups >= 1
    for i, row in enumerate(got):
        if i not in late:
            assert isinstance(row, dict) and row["flags"] != DEADLINE_FLAG
        elif fallback:
            assert isinstance(row, dict) and (row["action"], row["flags"]) == ("hold", DEADLINE_FLAG)
        else:
            assert row == "deadline_exceeded"
    # the on-time bars were recomputed without the late ones: the history the reference made
    # (a hold made before the read has no feature key, one made after it keeps the row's key)
    bat, ref = await stored(services, "bat"), await stored(services, "ref")
    for row in bat + ref:
        if row["flags"] == DEADLINE_FLAG:
            row.pop("feature_key")
    assert bat == ref
    assert len(await stored(services, "bat")) == (24 if fallback else 24 - len(late))


async def test_a_failed_write_fails_the_run_and_writes_nothing(
    services: Services, models: ModelFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await two_signals(services, models)
    ts = bars(BTC, FIRST, 8)
    services.engine.bar_batcher = BarBatcher(services.engine)
    write = services.store.write_signals

    async def down(batch: Any) -> int:
        raise StoreUnavailable("the database went away")

    monkeypatch.setattr(services.store, "write_signals", down)
    assert await concurrent(services, BTC, ts) == ["store_unavailable"] * 8
    assert await stored(services, "bat") == []
    monkeypatch.setattr(services.store, "write_signals", write)  # it came back
    assert all(isinstance(r, dict) for r in await concurrent(services, BTC, ts))
    assert len(await stored(services, "bat")) == 8


async def test_a_cancelled_request_does_not_stop_the_others(
    services: Services, models: ModelFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await two_signals(services, models)
    ts = bars(BTC, FIRST, 12)
    # The cancelled bar is not written and the others are computed without it: the history of
    # the other bars alone. Cancel a bar whose absence changes the bars after it.
    with_it = await sequential(services, BTC, ts, "other")
    k = 0
    moves = [i for i in range(1, 10) if isinstance(row := with_it[i], dict) and row["action"] != "hold"]
    for n, candidate in enumerate(moves):
        await add_signal(services, models, signal_id=f"ref{n}")
        expected = await sequential(services, BTC, ts[:candidate] + ts[candidate + 1:], f"ref{n}")
        if [comparable(r) for r in with_it[candidate + 1:]] != [comparable(r) for r in expected[candidate:]]:
            k, ref = candidate, f"ref{n}"
            break
    assert k, "no bar in the window changes the bars after it"
    batcher = services.engine.bar_batcher = BarBatcher(services.engine)
    await slow_reads(services, monkeypatch, 0.05)
    tasks = [asyncio.ensure_future(services.engine.predict_bar("bat", BTC, INTERVAL, t)) for t in ts]
    await asyncio.sleep(0.01)
    tasks[k].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[k], asyncio.CancelledError)
    assert [comparable(r) for r in done[:k] + done[k + 1:]] == [comparable(r) for r in expected]
    assert await stored(services, "bat") == await stored(services, ref)
    await batcher.stop()
    # stopped: a call is served alone
    row = await services.engine.predict_bar("bat", BTC, INTERVAL, ts[0])
    assert comparable(row) == comparable(expected[0])
    assert batcher.stats.requests == 12
