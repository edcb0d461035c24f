"""One call in flight per key: concurrent callers share it.

A cold signal asked for by many clients at once used to be resolved, and its model loaded, once
per client (measured: 16 concurrent first requests made 16 loads of one lleaves model, and 6
failed on a half-imported module). ``Engine.prepare`` and ``ModelRegistry.runtime`` put their
first, uncached call behind a :class:`SingleFlight`.

Usage::

    loads: SingleFlight[str, Runtime] = SingleFlight()
    runtime = await loads.run(sha, lambda: load(sha))   # callers meanwhile await the same task
    loads.drop(sha)                                     # a later call starts a fresh one

The shared call runs in a task of its own and each caller awaits it shielded: a caller that
gives up (its deadline, a disconnect) leaves it running for the others. A failure reaches every
caller waiting and is not kept: the next call starts again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """``call()``'s answer, shared with every concurrent ``run`` of ``key`` on this loop."""
        loop = asyncio.get_running_loop()
        task = self._tasks.get(key)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(call())
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task)

    def owns(self, key: K) -> bool:
        """Whether the running task is ``key``'s current call (not dropped meanwhile): what it
        found may be kept."""
        return self._tasks.get(key) is asyncio.current_task()

    def drop(self, matches: Callable[[K], bool] | None = None) -> None:
        """Forget the calls in flight (all, or those whose key matches): a later ``run`` starts
        a fresh one; their callers still get their answers."""
        for key in [k for k in self._tasks if matches is None or matches(k)]:
            del self._tasks[key]

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved here too: every caller may have gone
