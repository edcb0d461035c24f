"""The Bus protocol: publish/subscribe, durable streams with acks, and a key-value bucket.

Every implementation (``MemoryBus`` in process, ``NatsBus`` on NATS JetStream) passes the same
contract suite in ``tests/integration/test_bus_contract.py``. The rules it holds them to:

- Subjects are dot-separated tokens; a pattern's ``*`` matches one token and a final ``>`` one or
  more. ``publish`` is at most once to every matching core subscription; in a queue group each
  message goes to one member.
- A stream (``ensure_stream``) keeps every message published to its subjects, in order. A message
  with a ``msg_id`` already seen within the stream's duplicate window is not stored again
  (``PublishAck.duplicate``).
- ``consume`` is a durable consumer: at least once, in order for a single member, delivered
  again when ``nak``-ed (after ``delay``) or when not acked within ``ack_wait_s``; ``term`` stops
  it for good. Members of one ``queue`` share the messages. A consumer remembers its acks across
  ``stop`` and a new ``consume`` with the same durable name (and, on NATS, server restarts).
- KV: ``kv_put`` returns a revision that grows; ``kv_watch`` calls its handler with the current
  value of every key first, then with every later change.
- Transport failures are :class:`sigserve.errors.BusUnavailable`; malformed subjects or names
  are :class:`sigserve.errors.ValidationError`.

Usage::

    bus = open_bus("nats://127.0.0.1:4222")     # or "memory://"
    await bus.connect()
    await bus.ensure_stream("FEATURES", ["features.>"])
    sub = await bus.consume("FEATURES", "sigserve", "features.*.*", handler, queue="workers")
    ack = await (await bus.publish_durable("signals.BTC.1h", data, msg_id="key"))
    await bus.close()
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..errors import ValidationError

_TOKEN = re.compile(r"^[^\s.*>]+$")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class PublishAck:
    stream: str
    seq: int
    duplicate: bool = False


class BusMessage:
    """One delivered message. ``received`` is ``time.perf_counter()`` at delivery.

    On a durable consumer ``ack``/``nak``/``term`` settle it; on a core subscription they do
    nothing. ``num_delivered`` counts deliveries (1 the first time).
    """

    __slots__ = ("_settle", "data", "headers", "num_delivered", "received", "settled", "subject")

    def __init__(self, subject: str, data: bytes, headers: Mapping[str, str] | None = None,
                 num_delivered: int = 1,
                 settle: Callable[[str, float | None], Awaitable[None]] | None = None) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers
        self.num_delivered = num_delivered
        self.received = time.perf_counter()
        self.settled = False
        self._settle = settle

    async def _do(self, kind: str, delay: float | None = None) -> None:
        if self.settled or self._settle is None:
            return
        self.settled = True
        await self._settle(kind, delay)

    async def ack(self) -> None:
        await self._do("ack")

    async def nak(self, delay: float | None = None) -> None:
        await self._do("nak", delay)

    async def term(self) -> None:
        await self._do("term")


Handler = Callable[[BusMessage], Awaitable[None]]
KvHandler = Callable[[str, bytes | None], Awaitable[None]]


class Subscription(Protocol):
    async def stop(self) -> None:
        """Stop delivering; unsettled messages of a durable consumer are delivered again later."""


class Bus(Protocol):
    url: str

    @property
    def durable(self) -> bool:
        """True when streams, durable consumers and KV are available (NATS: JetStream on)."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (plain, not async) after the connection came back."""

    async def publish(self, subject: str, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        """Send without waiting (at most once to core subscribers; also stored by any stream
        whose subjects match)."""

    async def flush(self) -> None:
        """Wait until everything published so far reached the server."""

    async def subscribe(self, subject: str, handler: Handler, queue: str | None = None) -> Subscription:
        """A core subscription; ``handler`` is awaited for each message, in order."""

    async def ensure_stream(self, name: str, subjects: list[str], *, max_age_s: float = 0.0,
                            duplicate_window_s: float = 120.0, memory: bool = False) -> None:
        """Create the stream (file storage unless ``memory``) or add missing subjects to it."""

    async def delete_stream(self, name: str) -> None: ...

    async def stream_count(self, name: str) -> int:
        """How many messages the stream holds."""

    async def publish_durable(self, subject: str, data: bytes, *, msg_id: str | None = None,
                              headers: Mapping[str, str] | None = None) -> asyncio.Future[PublishAck]:
        """Send now; the future resolves when a stream stored it (or found it a duplicate), or
        fails with ``BusUnavailable``."""

    async def consume(self, stream: str, durable: str, subject: str, handler: Handler, *,
                      queue: str | None = None, ack_wait_s: float = 30.0,
                      max_ack_pending: int = 20_000) -> Subscription:
        """A durable consumer (created on first use) of ``subject`` within ``stream``."""

    async def kv_get(self, bucket: str, key: str) -> bytes | None: ...

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int: ...

    async def kv_watch(self, bucket: str, handler: KvHandler) -> Subscription: ...


def check_subject(subject: str, *, pattern: bool = False) -> str:
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if _TOKEN.match(token):
            continue
        if pattern and (token == "*" or (token == ">" and i == len(tokens) - 1)):
            continue
        raise ValidationError(f"invalid subject {subject!r}", details={"subject": subject})
    return subject


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name):
        raise ValidationError(f"invalid {what} {name!r}: use A-Z a-z 0-9 _ - (1-128)",
                              details={what: name})
    return name


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` one token, a final ``>`` one or more tokens."""
    if pattern == subject:
        return True
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def open_bus(url: str | None) -> Bus:
    """``memory://`` (or None): the in-process bus; ``nats://host:port[,nats://...]``: NATS."""
    if url is None or url in ("memory", "memory://"):
        from .memory import MemoryBus

        return MemoryBus()
    if url.startswith(("nats://", "tls://")):
        from .nats import NatsBus

        return NatsBus(url)
    raise ValidationError(f"unknown bus URL {url!r}: use nats://host:4222 or memory://",
                          details={"bus": url})
