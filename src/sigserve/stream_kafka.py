"""Optional Kafka archive sink for emitted signals (``pip install 'sigserve[kafka]'``).

The hot path only appends to a bounded in-memory queue (``offer``, never awaits); a background
task sends the records with aiokafka (``acks=all``, idempotent producer) to the topic
``trading_signals_archive``, keyed by the signal's uuid. A failed send is retried with backoff
forever (``retries`` counted, each failure logged) while the queue holds; when the queue is full a
record is counted in ``dropped`` and logged, never dropped silently. ``stats`` has
``offered``, ``sent``, ``failed_attempts``, ``dropped`` and ``pending``.

Usage::

    sink = KafkaSink("127.0.0.1:9092")
    await sink.start()
    sink.offer(b"signal-uuid", b'{"signal_id": ...}')
    await sink.stop()            # flushes what is queued (bounded by ``stop_timeout_s``)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from .errors import BusUnavailable, missing_extra

log = logging.getLogger("sigserve.kafka")


class KafkaSink:
    def __init__(self, bootstrap: str, topic: str = "trading_signals_archive", *,
                 max_queue: int = 100_000, batch: int = 500, stop_timeout_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.max_queue = max_queue
        self.batch = batch
        self.stop_timeout_s = stop_timeout_s
        self.stats: collections.Counter[str] = collections.Counter()
        self._queue: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        try:
            from aiokafka import AIOKafkaProducer
        except ImportError as exc:
            raise missing_extra("aiokafka", "kafka") from exc
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                          enable_idempotence=True, linger_ms=5,
                                          request_timeout_ms=10_000)
        try:
            await self._producer.start()
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            raise BusUnavailable(f"cannot reach Kafka at {self.bootstrap}: {type(exc).__name__}: {exc}",
                                 details={"kafka": self.bootstrap}) from exc
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kafka-sink")

    def offer(self, key: bytes, value: bytes) -> None:
        """Queue one record; never blocks."""
        self.stats["offered"] += 1
        if len(self._queue) >= self.max_queue:
            self.stats["dropped"] += 1
            if self.stats["dropped"] in (1, 10, 100) or self.stats["dropped"] % 1000 == 0:
                log.error("Kafka sink queue full (%d): %d records dropped so far", self.max_queue,
                          self.stats["dropped"])
            return
        self._queue.append((key, value))
        self._wake.set()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = [self._queue[i] for i in range(min(self.batch, len(self._queue)))]
            try:
                futures = [await self._producer.send(self.topic, value=value, key=key) for key, value in chunk]
                await asyncio.gather(*futures)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats["failed_attempts"] += 1
                log.warning("Kafka send of %d records failed (%s: %s); retrying in %.1f s", len(chunk),
                            type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = 0.1
            for _ in chunk:
                self._queue.popleft()
            self.stats["sent"] += len(chunk)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.stop_timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if self._queue:
                log.error("Kafka sink stopped with %d records unsent", len(self._queue))
                self.stats["dropped"] += len(self._queue)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        self.stats["pending"] = len(self._queue)
