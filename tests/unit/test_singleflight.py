"""SingleFlight: one call in flight per key, shared; dropped calls are not owned."""

from __future__ import annotations

import asyncio

import pytest

from sigserve.singleflight import SingleFlight


async def test_concurrent_runs_of_a_key_share_one_call_and_other_keys_do_not() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls: list[str] = []
    release = asyncio.Event()

    async def call(key: str) -> int:
        calls.append(key)
        await release.wait()
        return len(calls)

    runs = [asyncio.ensure_future(flight.run(k, lambda k=k: call(k))) for k in ("a", "a", "a", "b")]
    await asyncio.sleep(0.01)
    assert len(flight) == 2
    release.set()
    assert await asyncio.gather(*runs) == [2, 2, 2, 2]
    assert sorted(calls) == ["a", "b"] and len(flight) == 0


async def test_a_failure_reaches_every_caller_and_the_next_run_calls_again() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    attempts = 0

    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise RuntimeError("first attempt fails")
        return attempts

    results = await asyncio.gather(*(flight.run("k", flaky) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await flight.run("k", flaky) == 2


async def test_a_dropped_call_still_answers_its_callers_but_is_no_longer_owned() -> None:
    flight: SingleFlight[str, bool] = SingleFlight()
    release = asyncio.Event()

    async def call() -> bool:
        await release.wait()
        return flight.owns("k")

    older = asyncio.ensure_future(flight.run("k", call))
    await asyncio.sleep(0.01)
    flight.drop(lambda key: key == "k")
    newer = asyncio.ensure_future(flight.run("k", call))
    await asyncio.sleep(0.01)
    release.set()
    assert await older is False  # dropped: what it found is not to be kept
    assert await newer is True


async def test_a_caller_that_gives_up_leaves_the_call_running() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    release = asyncio.Event()

    async def call() -> str:
        await release.wait()
        return "done"

    impatient = asyncio.ensure_future(flight.run("k", call))
    patient = asyncio.ensure_future(flight.run("k", call))
    await asyncio.sleep(0.01)
    impatient.cancel()
    release.set()
    assert await patient == "done"
    with pytest.raises(asyncio.CancelledError):
        await impatient
