"""The in-process bus: the default when no NATS URL is given, and the reference the contract
suite checks NATS against. Streams, durable consumers and KV live in this process's memory, so
they last as long as the ``MemoryBus`` object (a restart loses them: use NATS for durability).

Usage::

    bus = MemoryBus()
    await bus.connect()
    await bus.subscribe("signals.>", handler)
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import BusUnavailable, ValidationError
from .base import (
    BusMessage,
    Handler,
    KvHandler,
    PublishAck,
    check_name,
    check_subject,
    subject_matches,
)

log = logging.getLogger("sigserve.bus")
MSG_ID = "Nats-Msg-Id"


class _Worker:
    """Awaits a handler for each queued item, in order, on a task of its own."""

    def __init__(self, handler: Callable[..., object], name: str) -> None:
        self.handler = handler
        self.queue: asyncio.Queue[tuple[object, ...] | None] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def _run(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            try:
                await self.handler(*item)  # type: ignore[misc]
            except Exception:  # a handler's bug must not stop delivery to it
                log.exception("bus handler failed")

    async def stop(self) -> None:
        self.queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class _CoreSub:
    def __init__(self, bus: MemoryBus, pattern: str, handler: Handler, queue: str | None) -> None:
        self.bus, self.pattern, self.queue = bus, pattern, queue
        self.worker = _Worker(handler, f"bus-sub-{pattern}")

    async def stop(self) -> None:
        if self in self.bus._subs:
            self.bus._subs.remove(self)
        await self.worker.stop()


@dataclass
class _Stored:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None
    at: float


@dataclass
class _Stream:
    name: str
    subjects: list[str]
    max_age_s: float
    duplicate_window_s: float
    messages: list[_Stored] = field(default_factory=list)
    last_seq: int = 0
    msg_ids: dict[str, tuple[int, float]] = field(default_factory=dict)
    consumers: dict[str, _Consumer] = field(default_factory=dict)

    def index(self, seq: int) -> int:
        """Position of the first stored message with sequence >= seq."""
        if not self.messages:
            return 0
        return max(0, seq - self.messages[0].seq)


class _Member:
    def __init__(self, consumer: _Consumer, handler: Handler) -> None:
        self.consumer = consumer
        self.worker = _Worker(handler, f"bus-consumer-{consumer.durable}")

    async def stop(self) -> None:
        consumer = self.consumer
        if self in consumer.members:
            consumer.members.remove(self)
        await self.worker.stop()
        if not consumer.members:  # nobody left: everything unsettled is due again
            now = time.monotonic()
            for seq in consumer.pending:
                consumer.pending[seq] = math.inf
                heapq.heappush(consumer.due, (now, seq))
            consumer.wake.set()


class _Consumer:
    def __init__(self, stream: _Stream, durable: str, subject: str, ack_wait_s: float,
                 max_ack_pending: int) -> None:
        self.stream, self.durable, self.subject = stream, durable, subject
        self.ack_wait_s, self.max_ack_pending = ack_wait_s, max_ack_pending
        self.next_seq = 1
        self.pending: dict[int, float] = {}  # seq -> ack deadline (inf while a nak delay runs)
        self.deliveries: dict[int, int] = {}
        self.due: list[tuple[float, int]] = []  # (when, seq) redeliveries
        self.members: list[_Member] = []
        self.rr = itertools.count()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"consumer-{self.durable}")

    def _deliver(self, stored: _Stored, now: float) -> None:
        seq = stored.seq
        count = self.deliveries.get(seq, 0) + 1
        self.deliveries[seq] = count
        self.pending[seq] = now + self.ack_wait_s
        member = self.members[next(self.rr) % len(self.members)]

        async def settle(kind: str, delay: float | None, seq: int = seq) -> None:
            self._settle(seq, kind, delay)

        msg = BusMessage(stored.subject, stored.data, stored.headers, count, settle)
        member.worker.queue.put_nowait((msg,))

    def _settle(self, seq: int, kind: str, delay: float | None) -> None:
        if seq not in self.pending:
            return
        if kind == "nak":
            self.pending[seq] = math.inf
            heapq.heappush(self.due, (time.monotonic() + (delay or 0.0), seq))
        else:  # ack or term
            del self.pending[seq]
            self.deliveries.pop(seq, None)
        self.wake.set()

    def _find(self, seq: int) -> _Stored | None:
        stream = self.stream
        i = stream.index(seq)
        if i < len(stream.messages) and stream.messages[i].seq == seq:
            return stream.messages[i]
        return None

    async def _run(self) -> None:
        while True:
            self.wake.clear()
            now = time.monotonic()
            timeout: float | None = None
            if self.members:
                # redeliveries first: nak-ed ones that are due, then expired ack deadlines
                while self.due and self.due[0][0] <= now:
                    _, seq = heapq.heappop(self.due)
                    stored = self._find(seq)
                    if seq in self.pending and stored is not None:
                        self._deliver(stored, now)
                for seq, deadline in list(self.pending.items()):
                    if deadline <= now:
                        stored = self._find(seq)
                        if stored is None:
                            del self.pending[seq]
                        else:
                            self._deliver(stored, now)
                stream = self.stream
                i = stream.index(self.next_seq)
                while len(self.pending) < self.max_ack_pending and i < len(stream.messages):
                    stored = stream.messages[i]
                    i += 1
                    self.next_seq = stored.seq + 1
                    if subject_matches(self.subject, stored.subject):
                        self._deliver(stored, now)
                waits = [d for d in self.pending.values() if d != math.inf]
                if self.due:
                    waits.append(self.due[0][0])
                if waits:
                    timeout = max(0.0, min(waits) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)


class _KvWatch:
    def __init__(self, bus: MemoryBus, bucket: str, handler: KvHandler) -> None:
        self.bus, self.bucket = bus, bucket
        self.worker = _Worker(handler, f"kv-watch-{bucket}")

    async def stop(self) -> None:
        watchers = self.bus._kv_watchers.get(self.bucket, [])
        if self in watchers:
            watchers.remove(self)
        await self.worker.stop()


class MemoryBus:
    """An in-process implementation of :class:`sigserve.bus.base.Bus`."""

    def __init__(self) -> None:
        self.url = "memory://"
        self._subs: list[_CoreSub] = []
        self._streams: dict[str, _Stream] = {}
        self._kv: dict[str, dict[str, tuple[bytes, int]]] = {}
        self._kv_rev: dict[str, int] = {}
        self._kv_watchers: dict[str, list[_KvWatch]] = {}
        self._rr = itertools.count()
        self._open = False
        self._members: list[_Member] = []

    @property
    def durable(self) -> bool:
        return True

    async def connect(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        for sub in list(self._subs):
            await sub.stop()
        for member in list(self._members):
            await member.stop()
        for watchers in self._kv_watchers.values():
            for watcher in list(watchers):
                await watcher.stop()
        for stream in self._streams.values():
            for consumer in stream.consumers.values():
                if consumer.task is not None:
                    consumer.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await consumer.task

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """An in-process bus never disconnects."""

    def _check_open(self) -> None:
        if not self._open:
            raise BusUnavailable("the in-process bus is closed", details={"bus": self.url})

    # --- core ---------------------------------------------------------------------------------
    async def publish(self, subject: str, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        self._check_open()
        check_subject(subject)
        hdrs = dict(headers) if headers else None
        self._store(subject, data, hdrs)
        self._fan_out(subject, data, hdrs)

    def _fan_out(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        groups: dict[str, list[_CoreSub]] = {}
        for sub in self._subs:
            if not subject_matches(sub.pattern, subject):
                continue
            if sub.queue is None:
                sub.worker.queue.put_nowait((BusMessage(subject, data, headers),))
            else:
                groups.setdefault(sub.queue, []).append(sub)
        for members in groups.values():
            chosen = members[next(self._rr) % len(members)]
            chosen.worker.queue.put_nowait((BusMessage(subject, data, headers),))

    async def flush(self) -> None:
        self._check_open()
        await asyncio.sleep(0)

    async def subscribe(self, subject: str, handler: Handler, queue: str | None = None) -> _CoreSub:
        self._check_open()
        check_subject(subject, pattern=True)
        sub = _CoreSub(self, subject, handler, queue)
        self._subs.append(sub)
        return sub

    # --- streams --------------------------------------------------------------------------------
    async def ensure_stream(self, name: str, subjects: list[str], *, max_age_s: float = 0.0,
                            duplicate_window_s: float = 120.0, memory: bool = False) -> None:
        self._check_open()
        check_name(name, "stream")
        for subject in subjects:
            check_subject(subject, pattern=True)
        stream = self._streams.get(name)
        if stream is None:
            for other in self._streams.values():
                overlap = [s for s in subjects for o in other.subjects
                           if subject_matches(s, o) or subject_matches(o, s)]
                if overlap:
                    raise ValidationError(f"subjects {overlap} overlap stream {other.name!r}",
                                          details={"stream": other.name})
            self._streams[name] = _Stream(name, list(subjects), max_age_s, duplicate_window_s)
        else:
            stream.subjects.extend(s for s in subjects if s not in stream.subjects)

    async def delete_stream(self, name: str) -> None:
        stream = self._streams.pop(name, None)
        if stream is not None:
            for consumer in stream.consumers.values():
                for member in list(consumer.members):
                    await member.stop()
                if consumer.task is not None:
                    consumer.task.cancel()

    async def stream_count(self, name: str) -> int:
        self._check_open()
        stream = self._streams.get(name)
        if stream is None:
            raise ValidationError(f"no stream {name!r}", details={"stream": name})
        self._expire(stream, time.time())
        return len(stream.messages)

    def _expire(self, stream: _Stream, now: float) -> None:
        if stream.max_age_s > 0:
            cut = now - stream.max_age_s
            drop = 0
            while drop < len(stream.messages) and stream.messages[drop].at < cut:
                drop += 1
            if drop:
                del stream.messages[:drop]
        window = now - stream.duplicate_window_s
        if len(stream.msg_ids) > 10_000:
            stream.msg_ids = {k: v for k, v in stream.msg_ids.items() if v[1] >= window}

    def _store(self, subject: str, data: bytes, headers: dict[str, str] | None) -> PublishAck | None:
        for stream in self._streams.values():
            if any(subject_matches(p, subject) for p in stream.subjects):
                now = time.time()
                self._expire(stream, now)
                msg_id = headers.get(MSG_ID) if headers else None
                if msg_id:
                    seen = stream.msg_ids.get(msg_id)
                    if seen is not None and seen[1] >= now - stream.duplicate_window_s:
                        return PublishAck(stream.name, seen[0], duplicate=True)
                stream.last_seq += 1
                stream.messages.append(_Stored(stream.last_seq, subject, data, headers, now))
                if msg_id:
                    stream.msg_ids[msg_id] = (stream.last_seq, now)
                for consumer in stream.consumers.values():
                    consumer.wake.set()
                return PublishAck(stream.name, stream.last_seq)
        return None

    async def publish_durable(self, subject: str, data: bytes, *, msg_id: str | None = None,
                              headers: Mapping[str, str] | None = None) -> asyncio.Future[PublishAck]:
        self._check_open()
        check_subject(subject)
        hdrs = dict(headers) if headers else {}
        if msg_id:
            hdrs[MSG_ID] = msg_id
        future: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()
        ack = self._store(subject, data, hdrs or None)
        if ack is None:
            future.set_exception(BusUnavailable(f"no stream stores subject {subject!r}",
                                                details={"subject": subject}))
        else:
            future.set_result(ack)
            # as on NATS, core subscribers get every publish; only the stream drops a duplicate
            self._fan_out(subject, data, hdrs or None)
        return future

    async def consume(self, stream: str, durable: str, subject: str, handler: Handler, *,
                      queue: str | None = None, ack_wait_s: float = 30.0,
                      max_ack_pending: int = 20_000) -> _Member:
        self._check_open()
        check_name(durable, "durable")
        check_subject(subject, pattern=True)
        found = self._streams.get(stream)
        if found is None:
            raise ValidationError(f"no stream {stream!r}", details={"stream": stream})
        consumer = found.consumers.get(durable)
        if consumer is None:
            consumer = _Consumer(found, durable, subject, ack_wait_s, max_ack_pending)
            found.consumers[durable] = consumer
        elif consumer.members and queue is None:
            raise ValidationError(f"consumer {durable!r} is already bound; use a queue group to share it",
                                  details={"durable": durable})
        member = _Member(consumer, handler)
        consumer.members.append(member)
        self._members.append(member)
        consumer.start()
        consumer.wake.set()
        return member

    # --- KV ---------------------------------------------------------------------------------------
    async def kv_get(self, bucket: str, key: str) -> bytes | None:
        self._check_open()
        check_name(bucket, "bucket")
        entry = self._kv.get(bucket, {}).get(key)
        return None if entry is None else entry[0]

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        self._check_open()
        check_name(bucket, "bucket")
        check_subject(key)
        revision = self._kv_rev.get(bucket, 0) + 1
        self._kv_rev[bucket] = revision
        self._kv.setdefault(bucket, {})[key] = (value, revision)
        for watcher in self._kv_watchers.get(bucket, []):
            watcher.worker.queue.put_nowait((key, value))
        return revision

    async def kv_watch(self, bucket: str, handler: KvHandler) -> _KvWatch:
        self._check_open()
        check_name(bucket, "bucket")
        watcher = _KvWatch(self, bucket, handler)
        for key, (value, _) in self._kv.get(bucket, {}).items():
            watcher.worker.queue.put_nowait((key, value))
        self._kv_watchers.setdefault(bucket, []).append(watcher)
        return watcher
