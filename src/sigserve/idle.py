"""A count of the work that must not wait, for background work to find gaps in it.

A server's edge counts its requests in flight; its shadow runner waits for a moment with none
before each step (``sigserve.routing.shadow``). A stream worker's background steps (its write
cycle's) step aside with :func:`give_way`.
"""

from __future__ import annotations

import asyncio


class IdleGate:
    """Counts the work that must not wait (a server's requests in flight, fed by its edge), and
    lets background work wait for a moment with none.

    Why: a background task that yields with ``sleep(0)`` between steps gets a turn at every loop
    iteration, and one request spans several (read, route, respond), so each step's pause was
    paid several times over by a request running meanwhile (measured: p99 +0.4-0.7 ms with one
    shadow, 45 us steps). Waiting for no request in flight, a step runs in the gaps between
    requests and delays at most the one request that arrives during it.

    Usage::

        gate = IdleGate()
        gate.enter(); ...; gate.leave()        # around each request (EdgeMiddleware)
        await gate.idle(timeout_s=0.1)         # a background step waits for a free moment
    """

    def __init__(self) -> None:
        self.busy = 0
        # futures of the background steps waiting for a free moment (made on the waiter's own
        # loop, so one gate serves whichever loop runs the server)
        self._waiters: list[asyncio.Future[None]] = []

    def enter(self) -> None:
        self.busy += 1

    def leave(self) -> None:
        self.busy -= 1
        if self.busy <= 0:
            self.busy = 0
            if self._waiters:
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    async def idle(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight, ``timeout_s`` at most; True when idle."""
        if not self.busy:
            return True
        if timeout_s <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            return False
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


# A feature message takes this many loop turns from the socket to its signal's publish: the bus
# client's read loop, its subscription's task, the worker's processing loop, the client's flusher.
MESSAGE_TURNS = 4


async def give_way(turns: int = MESSAGE_TURNS) -> None:
    """Let the event loop run ``turns`` times before going on: between the steps of background
    work that shares a loop with messages.

    Why more than one ``sleep(0)``: after one, the next step ran as soon as a message that had
    arrived during the step before was read, and each further turn of that message waited for
    another step (a stream's write cycle held a message 1-1.5 ms in 0.2-0.4 ms steps). After
    ``MESSAGE_TURNS`` turns that message is published before the next step starts.

    Usage::

        for part in parts:
            work(part)          # a fraction of a millisecond
            await give_way()
    """
    for _ in range(turns):
        await asyncio.sleep(0)
