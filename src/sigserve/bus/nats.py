"""The NATS bus (nats-py): core publish/subscribe, JetStream streams, durable push consumers
(queue groups share one), asynchronous publish acks, and KV buckets.

nats-py exceptions are translated here into :mod:`sigserve.errors` (``bus_unavailable`` for
transport and server failures, ``validation_error`` for bad names), with ``raise ... from exc``.
The client reconnects on its own, forever; subscriptions and durable consumers resume after a
server restart (file storage keeps the streams and the consumers' acks).

Usage::

    bus = NatsBus("nats://127.0.0.1:4222")
    await bus.connect()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson

from ..errors import BusUnavailable, ValidationError, missing_extra
from .base import BusMessage, Handler, KvHandler, PublishAck, check_name, check_subject

log = logging.getLogger("sigserve.bus")
T = TypeVar("T")
MSG_ID = "Nats-Msg-Id"


def _nats() -> Any:
    try:
        import nats
        import nats.errors
        import nats.js.errors
    except ImportError as exc:  # pragma: no cover - nats-py is a core dependency
        raise missing_extra("nats-py", "nats") from exc
    return nats


def _num_delivered(msg: Any) -> int:
    """Deliveries of a JetStream message, from its ack subject ($JS.ACK.<stream>.<consumer>.
    <delivered>...; the long form carries a domain and an account hash first)."""
    reply = msg.reply or ""
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[4])
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


async def _reachable(url: str, timeout: float) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


class _Sub:
    def __init__(self, stop: Callable[[], Awaitable[None]]) -> None:
        self._stop = stop

    async def stop(self) -> None:
        await self._stop()


class NatsBus:
    """:class:`sigserve.bus.base.Bus` on NATS. ``durable`` is False when the server runs
    without JetStream (then only core publish/subscribe work)."""

    def __init__(self, url: str, *, name: str = "sigserve", request_timeout_s: float = 5.0,
                 connect_timeout_s: float = 2.0) -> None:
        self.url = url
        self.name = name
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._nc: Any = None
        self._js: Any = None
        self._durable = False
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._kv: dict[str, Any] = {}
        self._ack_prefix: str | None = None
        self._ack_deadlines: collections.deque[tuple[float, str, str]] = collections.deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._subjects_ok: set[str] = set()
        self._ack_seq = itertools.count(1)
        self._acks: dict[str, asyncio.Future[PublishAck]] = {}

    @property
    def durable(self) -> bool:
        return self._durable

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    # --- errors -----------------------------------------------------------------------------
    async def _call(self, what: str, coro: Awaitable[T]) -> T:
        """Await a nats-py call, translating its exceptions."""
        nats = _nats()
        try:
            return await coro
        except (BusUnavailable, ValidationError):
            raise
        except nats.js.errors.APIError as exc:
            description = getattr(exc, "description", None) or str(exc)
            raise BusUnavailable(f"NATS refused {what}: {description}",
                                 details={"bus": self.url, "what": what,
                                          "err_code": getattr(exc, "err_code", None)}) from exc
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise BusUnavailable(f"NATS {what} failed: {type(exc).__name__}: {exc}".rstrip(": "),
                                 details={"bus": self.url, "what": what}) from exc

    def _need_js(self, what: str) -> Any:
        if self._nc is None:
            raise BusUnavailable("not connected to NATS", details={"bus": self.url})
        if not self._durable:
            raise BusUnavailable(f"{what} needs JetStream: start nats-server with -js",
                                 details={"bus": self.url})
        return self._js

    # --- lifecycle ----------------------------------------------------------------------------
    async def connect(self) -> None:
        nats = _nats()

        async def reconnected() -> None:
            log.warning("NATS connection back (%s)", self.url)
            for callback in list(self._reconnect_callbacks):
                callback()

        async def disconnected() -> None:
            if self._nc is not None:
                log.warning("NATS connection lost (%s); reconnecting", self.url)

        async def error(exc: Exception) -> None:
            log.warning("NATS: %s: %s", type(exc).__name__, exc)

        servers = [u.strip() for u in self.url.split(",") if u.strip()]
        # nats-py retries the first connect as often as reconnects (forever here): fail fast
        # instead when no server answers now, and reconnect forever once connected.
        if not any([await _reachable(u, self.connect_timeout_s) for u in servers]):
            raise BusUnavailable(f"cannot connect to NATS at {self.url}: no server accepts connections",
                                 details={"bus": self.url})
        try:
            self._nc = await nats.connect(
                servers=servers, name=self.name, connect_timeout=self.connect_timeout_s,
                max_reconnect_attempts=-1, reconnect_time_wait=0.25, allow_reconnect=True,
                reconnected_cb=reconnected, disconnected_cb=disconnected, error_cb=error,
                pending_size=64 * 1024 * 1024, ping_interval=5, max_outstanding_pings=3)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"cannot connect to NATS at {self.url}: {type(exc).__name__}: {exc}",
                                 details={"bus": self.url}) from exc
        self._js = self._nc.jetstream(timeout=self.request_timeout_s, publish_async_max_pending=100_000)
        try:
            await self._js.account_info()
            self._durable = True
        except (nats.js.errors.Error, nats.errors.NoRespondersError):
            self._durable = False
            log.warning("NATS at %s has no JetStream: core publish/subscribe only", self.url)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"NATS at {self.url} did not answer: {exc}",
                                 details={"bus": self.url}) from exc

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._nc is not None:
            nc, self._nc = self._nc, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5)
            with contextlib.suppress(Exception):
                await nc.close()

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._reconnect_callbacks.append(callback)

    # --- core ---------------------------------------------------------------------------------
    async def publish(self, subject: str, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        check_subject(subject)
        if self._nc is None:
            raise BusUnavailable("not connected to NATS", details={"bus": self.url})
        await self._call("publish", self._nc.publish(subject, data, headers=dict(headers) if headers else None))

    async def flush(self) -> None:
        if self._nc is None:
            raise BusUnavailable("not connected to NATS", details={"bus": self.url})
        await self._call("flush", self._nc.flush(timeout=int(max(1, self.request_timeout_s))))

    async def subscribe(self, subject: str, handler: Handler, queue: str | None = None) -> _Sub:
        check_subject(subject, pattern=True)
        if self._nc is None:
            raise BusUnavailable("not connected to NATS", details={"bus": self.url})

        async def cb(msg: Any) -> None:
            try:
                await handler(BusMessage(msg.subject, msg.data, msg.headers))
            except Exception:
                log.exception("bus handler failed")

        sub = await self._call("subscribe", self._nc.subscribe(subject, queue=queue or "", cb=cb,
                                                                pending_msgs_limit=1_000_000,
                                                                pending_bytes_limit=1 << 30))
        return _Sub(lambda: self._unsubscribe(sub))

    async def _unsubscribe(self, sub: Any) -> None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
            if self._nc is not None:
                await self._nc.flush(timeout=2)

    # --- streams --------------------------------------------------------------------------------
    async def ensure_stream(self, name: str, subjects: list[str], *, max_age_s: float = 0.0,
                            duplicate_window_s: float = 120.0, memory: bool = False) -> None:
        check_name(name, "stream")
        for subject in subjects:
            check_subject(subject, pattern=True)
        js = self._need_js("a stream")
        from nats.js.api import StorageType, StreamConfig

        nats = _nats()
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            config = StreamConfig(name=name, subjects=list(subjects),
                                  storage=StorageType.MEMORY if memory else StorageType.FILE,
                                  max_age=max_age_s or None, duplicate_window=duplicate_window_s)
            await self._call(f"creating stream {name}", js.add_stream(config))
            return
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"NATS stream_info {name} failed: {exc}", details={"bus": self.url}) from exc
        missing = [s for s in subjects if s not in (info.config.subjects or [])]
        if missing:
            info.config.subjects = [*(info.config.subjects or []), *missing]
            await self._call(f"updating stream {name}", js.update_stream(info.config))

    async def delete_stream(self, name: str) -> None:
        js = self._need_js("a stream")
        nats = _nats()

        async def delete() -> None:
            with contextlib.suppress(nats.js.errors.NotFoundError):  # absent: nothing to delete
                await js.delete_stream(name)

        await self._call(f"deleting stream {name}", delete())

    async def stream_count(self, name: str) -> int:
        js = self._need_js("a stream")
        info = await self._call(f"stream_info {name}", js.stream_info(name))
        return int(info.state.messages)

    async def publish_durable(self, subject: str, data: bytes, *, msg_id: str | None = None,
                              headers: Mapping[str, str] | None = None) -> asyncio.Future[PublishAck]:
        """A publish with a reply inbox of ours: JetStream answers it with the PubAck. Unlike
        nats-py's ``publish_async`` this never yields to the event loop, so a batch of publishes
        leaves in one socket write instead of one write each."""
        if subject not in self._subjects_ok:
            check_subject(subject)
            if len(self._subjects_ok) < 100_000:
                self._subjects_ok.add(subject)
        if not self._durable or self._nc is None:
            self._need_js("a durable publish")
        hdrs = dict(headers) if headers else {}
        if msg_id:
            hdrs[MSG_ID] = msg_id
        if self._ack_prefix is None:
            prefix = self._nc.new_inbox() + "."
            await self._call("subscribe", self._nc.subscribe(prefix + "*", cb=self._on_pub_ack,
                                                              pending_msgs_limit=1_000_000))
            self._ack_prefix = prefix
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="nats-ack-sweeper")
        token = str(next(self._ack_seq))
        out: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()
        self._acks[token] = out
        try:
            await self._nc.publish(subject, data, reply=self._ack_prefix + token, headers=hdrs or None)
        except Exception as exc:
            self._acks.pop(token, None)
            err = BusUnavailable(f"NATS publish failed: {type(exc).__name__}: {exc}", details={"bus": self.url})
            err.__cause__ = exc
            out.set_exception(err)
            return out
        self._ack_deadlines.append((time.monotonic() + self.request_timeout_s, token, subject))
        return out

    async def _sweep(self) -> None:
        """Fail the publish acks that did not come within the request timeout."""
        deadlines = self._ack_deadlines
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            while deadlines and deadlines[0][0] <= now:
                _, token, subject = deadlines.popleft()
                self._expire(token, subject)

    async def _on_pub_ack(self, msg: Any) -> None:
        token = msg.subject[msg.subject.rfind(".") + 1:]
        out = self._acks.pop(token, None)
        if out is None or out.done():
            return
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            out.set_exception(BusUnavailable(f"no stream stores subject {msg.subject!r}",
                                             details={"bus": self.url}))
            return
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            out.set_exception(BusUnavailable("NATS sent an unreadable publish ack", details={"bus": self.url}))
            return
        error = body.get("error")
        if error:
            out.set_exception(BusUnavailable(f"NATS did not store the message: {error.get('description', error)}",
                                             details={"bus": self.url, "err_code": error.get("err_code")}))
            return
        out.set_result(PublishAck(body.get("stream", ""), int(body.get("seq", 0)), bool(body.get("duplicate"))))

    def _expire(self, token: str, subject: str) -> None:
        out = self._acks.pop(token, None)
        if out is not None and not out.done():
            out.set_exception(BusUnavailable(f"no publish ack for {subject} within"
                                             f" {self.request_timeout_s} s", details={"subject": subject}))

    async def consume(self, stream: str, durable: str, subject: str, handler: Handler, *,
                      queue: str | None = None, ack_wait_s: float = 30.0,
                      max_ack_pending: int = 20_000) -> _Sub:
        check_name(durable, "durable")
        check_subject(subject, pattern=True)
        js = self._need_js("a durable consumer")
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                ack_wait=ack_wait_s, max_ack_pending=max_ack_pending,
                                deliver_policy=DeliverPolicy.ALL, max_deliver=-1,
                                filter_subject=subject, deliver_group=queue)

        async def cb(msg: Any) -> None:
            async def settle(kind: str, delay: float | None) -> None:
                try:
                    if kind == "ack":
                        await msg.ack()
                    elif kind == "nak":
                        await msg.nak(delay=delay)
                    else:
                        await msg.term()
                except Exception as exc:  # the server will deliver it again after ack_wait
                    log.warning("NATS %s failed: %s", kind, exc)

            delivered = _num_delivered(msg)
            try:
                await handler(BusMessage(msg.subject, msg.data, msg.headers, delivered, settle))
            except Exception:
                log.exception("bus handler failed")

        if queue is not None and durable != queue:
            # nats-py names a queue subscription's durable after the queue
            raise ValidationError("a queue group's durable consumer is named after the group:"
                                  f" durable {durable!r} != queue {queue!r}",
                                  details={"durable": durable, "queue": queue})
        for attempt in range(20):
            try:
                sub = await self._call(f"consuming {stream}/{durable}", js.subscribe(
                    subject, queue=queue, durable=durable, stream=stream, cb=cb, manual_ack=True,
                    config=config, pending_msgs_limit=max_ack_pending * 2 + 1024,
                    pending_bytes_limit=1 << 30))
                break
            except BusUnavailable as exc:
                # a member that just stopped is still bound for a moment on the server
                if "already bound" not in exc.message or attempt == 19:
                    raise
                await asyncio.sleep(0.1)
        return _Sub(lambda: self._unsubscribe(sub))

    # --- KV ---------------------------------------------------------------------------------------
    async def _bucket(self, bucket: str, *, create: bool = True) -> Any:
        check_name(bucket, "bucket")
        kv = self._kv.get(bucket)
        if kv is not None:
            return kv
        js = self._need_js("a KV bucket")
        nats = _nats()
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                return None
            kv = await self._call(f"creating KV bucket {bucket}", js.create_key_value(bucket=bucket, history=10))
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"NATS KV {bucket} failed: {exc}", details={"bus": self.url}) from exc
        self._kv[bucket] = kv
        return kv

    async def kv_get(self, bucket: str, key: str) -> bytes | None:
        kv = await self._bucket(bucket, create=False)  # reading creates nothing
        if kv is None:
            return None
        nats = _nats()
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"NATS KV get {bucket}/{key} failed: {exc}", details={"bus": self.url}) from exc
        return None if entry.value is None else bytes(entry.value)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        check_subject(key)
        kv = await self._bucket(bucket)
        return int(await self._call(f"KV put {bucket}/{key}", kv.put(key, value)))

    async def kv_watch(self, bucket: str, handler: KvHandler) -> _Sub:
        kv = await self._bucket(bucket)
        watcher = await self._call(f"KV watch {bucket}", kv.watchall())

        async def pump() -> None:
            async for entry in watcher:
                if entry is None:  # end of the initial values
                    continue
                value = None if entry.operation in ("DEL", "PURGE") else entry.value
                try:
                    await handler(entry.key, None if value is None else bytes(value))
                except Exception:
                    log.exception("KV watch handler failed")

        task = asyncio.get_running_loop().create_task(pump(), name=f"kv-watch-{bucket}")

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await watcher.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

        return _Sub(stop)
