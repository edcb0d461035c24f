"""A server's cache of resolved signals (``Engine.prepared_ttl_s``): past the TTL the cached
resolution is still served while one background task reads the store's catalog version and, only
when it moved, resolves the signal again, so no request waits on those store reads; a refusal
found by that task reaches the next call; ``forget()`` wins over a re-resolution that started
before it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sigserve.app import Services
from sigserve.errors import SignalRetired
from tests.integration.test_engine import ModelFactory, models, ready  # noqa: F401  (fixtures)

TTL = 0.2


class CountingGets:
    """Wraps ``store.get_signal``: counts calls, and can hold them until released."""

    def __init__(self, services: Services) -> None:
        self.store = services.store
        self.original = services.store.get_signal
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, signal_id: str) -> Any:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return await self.original(signal_id)


@pytest.fixture
def counted(ready: Services, monkeypatch: pytest.MonkeyPatch) -> CountingGets:  # noqa: F811
    counter = CountingGets(ready)
    monkeypatch.setattr(ready.store, "get_signal", counter)
    ready.engine.prepared_ttl_s = TTL
    return counter


async def settle(engine: Any) -> None:
    while engine._refreshing:
        await asyncio.sleep(0.01)


async def test_a_stale_resolution_is_served_while_it_is_refreshed(ready: Services,  # noqa: F811
                                                                  counted: CountingGets) -> None:
    engine = ready.engine
    first = await engine.prepare("sig")
    assert counted.calls == 1
    assert await engine.prepare("sig") is first and counted.calls == 1  # within the TTL
    await ready.store.register_features(["unrelated"])  # the catalog moves
    await asyncio.sleep(TTL * 1.5)
    counted.gate = asyncio.Event()  # the re-resolution cannot finish until released
    served = await asyncio.wait_for(engine.prepare("sig"), timeout=1.0)
    assert served is first  # answered without waiting on the store
    await asyncio.sleep(0.05)
    assert counted.calls == 2  # one background resolution, however many calls
    assert await engine.prepare("sig") is first and counted.calls == 2
    counted.gate.set()
    await settle(engine)
    fresh = await engine.prepare("sig")
    assert fresh is not first and fresh.card.sha256 == first.card.sha256


async def test_an_unchanged_catalog_keeps_the_resolution_without_reading_it(
        ready: Services, counted: CountingGets) -> None:  # noqa: F811
    engine = ready.engine
    first = await engine.prepare("sig")
    for _ in range(3):
        await asyncio.sleep(TTL * 1.5)
        assert await engine.prepare("sig") is first  # past the TTL: a check starts
        await settle(engine)
    assert counted.calls == 1  # three checks, no resolution
    checked_at = engine._prepared["sig"][0]
    assert time.monotonic() - checked_at < TTL  # each check renews the entry
    await ready.store.register_features(["unrelated"])
    await asyncio.sleep(TTL * 1.5)
    await engine.prepare("sig")
    await settle(engine)
    assert counted.calls == 2  # the catalog moved: resolved once more
    assert await engine.prepare("sig") is not first


async def test_a_refusal_found_in_the_background_reaches_the_next_call(
        ready: Services, counted: CountingGets) -> None:  # noqa: F811
    engine = ready.engine
    await engine.prepare("sig")
    await ready.store.set_signal_status("sig", "retired")
    await asyncio.sleep(TTL * 1.5)
    await engine.prepare("sig")  # stale, served; the refresh finds the retirement
    await settle(engine)
    with pytest.raises(SignalRetired):
        await engine.prepare("sig")


async def test_forget_wins_over_an_older_refresh(ready: Services, counted: CountingGets) -> None:  # noqa: F811
    engine = ready.engine
    first = await engine.prepare("sig")
    await ready.store.register_features(["unrelated"])  # the catalog moves
    await asyncio.sleep(TTL * 1.5)
    counted.gate = asyncio.Event()
    await engine.prepare("sig")  # starts a refresh that blocks in get_signal
    await asyncio.sleep(0.02)
    engine.forget("sig")
    counted.gate.set()
    await settle(engine)
    assert "sig" not in engine._prepared  # the older answer was not put back
    again = await engine.prepare("sig")  # resolved in line
    assert again is not first and counted.calls == 3


async def test_concurrent_first_calls_share_one_resolution(ready: Services,  # noqa: F811
                                                           counted: CountingGets) -> None:
    engine = ready.engine
    counted.gate = asyncio.Event()  # every caller arrives while the first resolution waits
    calls = [asyncio.ensure_future(engine.prepare("sig")) for _ in range(16)]
    await asyncio.sleep(0.05)
    calls[0].cancel()  # a caller that gives up (its deadline) leaves it to the others
    counted.gate.set()
    answers = await asyncio.gather(*calls[1:])
    assert counted.calls == 1
    assert all(answer is answers[0] for answer in answers)
    assert await engine.prepare("sig") is answers[0]  # kept, as a resolution in line is
    assert counted.calls == 1 and not engine._resolving


async def test_a_shared_refusal_reaches_every_caller_and_is_not_kept(ready: Services,  # noqa: F811
                                                                     counted: CountingGets) -> None:
    engine = ready.engine
    await ready.store.set_signal_status("sig", "retired")
    results = await asyncio.gather(*(engine.prepare("sig") for _ in range(4)), return_exceptions=True)
    assert all(isinstance(r, SignalRetired) for r in results)
    assert counted.calls == 1
    await ready.store.set_signal_status("sig", "active")
    assert (await engine.prepare("sig")).definition.signal_id == "sig"  # resolved anew
    assert counted.calls == 2


async def test_forget_during_a_shared_resolution_starts_a_fresh_one(ready: Services,  # noqa: F811
                                                                    counted: CountingGets) -> None:
    engine = ready.engine
    counted.gate = asyncio.Event()
    older = asyncio.ensure_future(engine.prepare("sig"))
    await asyncio.sleep(0.02)
    engine.forget("sig")  # e.g. a promotion made through this server
    newer = asyncio.ensure_future(engine.prepare("sig"))
    await asyncio.sleep(0.02)
    counted.gate.set()
    first, second = await asyncio.gather(older, newer)
    assert counted.calls == 2  # the caller after forget() did not join the older resolution
    assert engine._prepared["sig"][1] is second  # and only the newer one is kept
    assert first is not second
