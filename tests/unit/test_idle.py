"""The idle gate: background work waits for a moment with nothing in flight, for a bounded time."""

from __future__ import annotations

import asyncio

from sigserve.idle import IdleGate


async def test_nothing_in_flight_is_idle_at_once() -> None:
    gate = IdleGate()
    assert await gate.idle(timeout_s=0.0)


async def test_a_waiter_wakes_when_the_last_one_in_flight_leaves() -> None:
    gate = IdleGate()
    gate.enter()
    gate.enter()
    waiting = asyncio.get_running_loop().create_task(gate.idle(timeout_s=5.0))
    await asyncio.sleep(0.01)
    gate.leave()
    await asyncio.sleep(0.01)
    assert not waiting.done()  # one still in flight
    gate.leave()
    assert await waiting is True
    assert gate.busy == 0 and not gate._waiters


async def test_a_waiter_gives_up_at_its_timeout_and_is_forgotten() -> None:
    gate = IdleGate()
    gate.enter()
    assert await gate.idle(timeout_s=0.05) is False
    assert not await gate.idle(timeout_s=0.0)
    assert not gate._waiters
    gate.leave()
    assert await gate.idle(timeout_s=0.0)


async def test_an_unbalanced_leave_does_not_go_below_zero() -> None:
    gate = IdleGate()
    gate.leave()
    assert gate.busy == 0
    gate.enter()
    assert gate.busy == 1


async def test_give_way_lets_a_message_through_its_turns_before_the_next_step() -> None:
    """A chain of MESSAGE_TURNS tasks, each woken by the one before (as a message goes from the
    bus client's read loop to its publish), finishes while a background step gives way once;
    one ``sleep(0)`` let only its first hop run."""
    from sigserve.idle import MESSAGE_TURNS, give_way

    async def chain(done: list[int]) -> None:
        for hop in range(MESSAGE_TURNS):  # each hop wakes the next one a loop turn later
            done.append(hop)
            await asyncio.sleep(0)

    after_one: list[int] = []
    task = asyncio.get_running_loop().create_task(chain(after_one))
    await asyncio.sleep(0)
    assert len(after_one) < MESSAGE_TURNS
    await task

    done: list[int] = []
    task = asyncio.get_running_loop().create_task(chain(done))
    await give_way()
    assert done == list(range(MESSAGE_TURNS))
    await task
