"""The Bus contract: every implementation passes this suite unchanged.

Only Bus protocol methods are used, so a new backend joins by adding a factory to
``BUS_FACTORIES``. The NATS entry runs against the local server (127.0.0.1:4222, JetStream on);
every test uses subjects, streams and buckets of its own, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sigserve.bus import Bus, BusMessage, MemoryBus, subject_matches
from sigserve.errors import BusUnavailable, ValidationError
from tests.services import require_tcp

NATS_URL = "nats://127.0.0.1:4222"


class World:
    """A bus plus names unique to one test (``prefix`` for subjects, ``name()`` for streams)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.tag = uuid.uuid4().hex[:10]
        self.prefix = f"t{self.tag}"
        self.streams: list[str] = []

    def name(self, base: str) -> str:
        return f"{base}_{self.tag}"

    async def stream(self, base: str, *subjects: str, **kw: float) -> str:
        name = self.name(base)
        await self.bus.ensure_stream(name, [f"{self.prefix}.{s}" for s in subjects], **kw)  # type: ignore[arg-type]
        self.streams.append(name)
        return name

    def subject(self, rest: str) -> str:
        return f"{self.prefix}.{rest}"


async def memory_bus() -> Bus:
    return MemoryBus()


async def nats_bus() -> Bus:
    require_tcp("NATS", "127.0.0.1", 4222)
    from sigserve.bus.nats import NatsBus

    return NatsBus(NATS_URL)


BUS_FACTORIES: list[tuple[str, Callable[[], Awaitable[Bus]]]] = [
    ("memory", memory_bus),
    ("nats", nats_bus),
]


@pytest.fixture(params=[f for _, f in BUS_FACTORIES], ids=[n for n, _ in BUS_FACTORIES])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    bus = await request.param()
    await bus.connect()
    w = World(bus)
    try:
        yield w
    finally:
        for name in w.streams:
            await bus.delete_stream(name)
        await bus.close()


class Collector:
    def __init__(self) -> None:
        self.messages: list[BusMessage] = []
        self.event = asyncio.Event()

    async def __call__(self, msg: BusMessage) -> None:
        self.messages.append(msg)
        self.event.set()

    @property
    def bodies(self) -> list[bytes]:
        return [m.data for m in self.messages]

    async def wait(self, n: int, timeout: float = 5.0) -> list[BusMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(self.messages)} messages, wanted {n}")
            self.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), left)
        return self.messages


async def quiet(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)


# --- subjects ---------------------------------------------------------------------------------


def test_subject_matching() -> None:
    assert subject_matches("features.>", "features.BTC.1h")
    assert subject_matches("features.*.*", "features.BTC.1h")
    assert not subject_matches("features.*.*", "features.deadletter")
    assert not subject_matches("features.>", "features")
    assert subject_matches("a.*.c", "a.b.c") and not subject_matches("a.*.c", "a.b.d")


# --- core ---------------------------------------------------------------------------------------


async def test_publish_reaches_matching_subscribers_in_order(world: World) -> None:
    bus = world.bus
    all_, one = Collector(), Collector()
    await bus.subscribe(world.subject(">"), all_)
    await bus.subscribe(world.subject("a.*"), one)
    await bus.flush()
    for i in range(20):
        await bus.publish(world.subject(f"a.{i % 2}"), str(i).encode(), headers={"k": str(i)})
    await bus.publish(world.subject("b.x.y"), b"other")
    await bus.flush()
    got = await all_.wait(21)
    assert [m.data for m in got[:20]] == [str(i).encode() for i in range(20)]
    assert got[20].subject == world.subject("b.x.y")
    assert got[3].headers is not None and got[3].headers["k"] == "3"
    assert [m.data for m in await one.wait(20)] == [str(i).encode() for i in range(20)]
    await quiet(0.1)
    assert len(one.messages) == 20


async def test_queue_group_delivers_each_message_to_one_member(world: World) -> None:
    bus = world.bus
    a, b, plain = Collector(), Collector(), Collector()
    await bus.subscribe(world.subject("q.>"), a, queue="workers")
    await bus.subscribe(world.subject("q.>"), b, queue="workers")
    await bus.subscribe(world.subject("q.>"), plain)
    await bus.flush()
    for i in range(200):
        await bus.publish(world.subject(f"q.{i}"), str(i).encode())
    await bus.flush()
    await plain.wait(200)
    deadline = time.monotonic() + 5
    while len(a.messages) + len(b.messages) < 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await quiet(0.1)
    bodies = a.bodies + b.bodies
    assert sorted(bodies) == sorted(str(i).encode() for i in range(200))
    assert a.messages and b.messages


async def test_stopped_subscription_receives_nothing(world: World) -> None:
    bus = world.bus
    got = Collector()
    sub = await bus.subscribe(world.subject("s"), got)
    await bus.flush()
    await bus.publish(world.subject("s"), b"1")
    await got.wait(1)
    await sub.stop()
    await bus.publish(world.subject("s"), b"2")
    await bus.flush()
    await quiet(0.1)
    assert got.bodies == [b"1"]


# --- streams --------------------------------------------------------------------------------------


async def test_stream_stores_and_deduplicates_by_msg_id(world: World) -> None:
    bus = world.bus
    name = await world.stream("AUDIT", "sig.>", duplicate_window_s=60)
    live = Collector()
    await bus.subscribe(world.subject("sig.>"), live)
    await bus.flush()
    acks = [await (await bus.publish_durable(world.subject(f"sig.{i}"), b"x", msg_id=f"k{i}"))
            for i in range(5)]
    assert [a.duplicate for a in acks] == [False] * 5
    assert [a.seq for a in acks] == sorted(a.seq for a in acks) and len({a.seq for a in acks}) == 5
    assert {a.stream for a in acks} == {name}
    again = await (await bus.publish_durable(world.subject("sig.0"), b"x", msg_id="k0"))
    assert again.duplicate and again.seq == acks[0].seq
    await bus.publish(world.subject("sig.core"), b"core")  # a core publish is stored too
    await bus.flush()
    await live.wait(6)
    deadline = time.monotonic() + 5
    while await bus.stream_count(name) < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await bus.stream_count(name) == 6
    # ensure_stream is idempotent and keeps the messages
    await bus.ensure_stream(name, [world.subject("sig.>")])
    assert await bus.stream_count(name) == 6


async def test_durable_publish_without_a_stream_fails_with_bus_unavailable(world: World) -> None:
    with pytest.raises(BusUnavailable):
        future = await world.bus.publish_durable(world.subject("nostream.x"), b"x")
        await asyncio.wait_for(future, 10)


async def test_bad_names_are_validation_errors(world: World) -> None:
    with pytest.raises(ValidationError):
        await world.bus.ensure_stream("bad name", [world.subject("x")])
    with pytest.raises(ValidationError):
        await world.bus.publish("bad subject", b"")
    with pytest.raises(ValidationError):
        await world.bus.subscribe("a..b", Collector())


# --- durable consumers ----------------------------------------------------------------------------


async def _fill(world: World, n: int, base: str = "in") -> str:
    name = await world.stream(base.upper(), f"{base}.>")
    for i in range(n):
        await (await world.bus.publish_durable(world.subject(f"{base}.{i % 3}"), str(i).encode()))
    return name


async def test_consumer_delivers_in_order_and_remembers_acks(world: World) -> None:
    bus = world.bus
    stream = await _fill(world, 10)
    got = Collector()
    durable = world.name("c")
    sub = await bus.consume(stream, durable, world.subject("in.>"), got, ack_wait_s=2)
    msgs = await got.wait(10)
    assert [m.data for m in msgs] == [str(i).encode() for i in range(10)]
    assert all(m.num_delivered == 1 for m in msgs)
    for m in msgs[:6]:
        await m.ack()
    await bus.flush()
    await quiet(0.2)
    await sub.stop()
    # a new member of the same durable consumer gets the 4 unacked ones again, then new ones
    again = Collector()
    await bus.consume(stream, durable, world.subject("in.>"), again, ack_wait_s=2)
    await (await bus.publish_durable(world.subject("in.0"), b"10"))
    msgs = await again.wait(5, timeout=15)
    assert sorted(m.data for m in msgs) == [b"10", b"6", b"7", b"8", b"9"]
    assert {m.data: m.num_delivered for m in msgs}[b"10"] == 1
    assert all(m.num_delivered == 2 for m in msgs if m.data != b"10")


async def test_consumer_filter_subject(world: World) -> None:
    stream = await _fill(world, 9)
    got = Collector()
    await world.bus.consume(stream, world.name("f"), world.subject("in.1"), got)
    msgs = await got.wait(3)
    await quiet(0.2)
    assert [m.data for m in got.messages] == [b"1", b"4", b"7"]
    for m in msgs:
        await m.ack()


async def test_nak_redelivers_after_delay_and_term_stops(world: World) -> None:
    bus = world.bus
    stream = await _fill(world, 2)
    got = Collector()
    await bus.consume(stream, world.name("n"), world.subject("in.>"), got, ack_wait_s=30)
    first, second = await got.wait(2)
    began = time.monotonic()
    await first.nak(delay=0.5)
    await second.term()
    await bus.flush()
    redelivered = (await got.wait(3))[2]
    assert redelivered.data == b"0" and redelivered.num_delivered == 2
    assert time.monotonic() - began >= 0.4
    await redelivered.ack()
    await quiet(0.5)
    assert len(got.messages) == 3


async def test_unacked_message_is_redelivered_after_ack_wait(world: World) -> None:
    stream = await _fill(world, 1)
    got = Collector()
    await world.bus.consume(stream, world.name("w"), world.subject("in.>"), got, ack_wait_s=1.0)
    await got.wait(1)
    msgs = await got.wait(2, timeout=10)
    assert msgs[1].data == b"0" and msgs[1].num_delivered == 2
    await msgs[1].ack()


async def test_queue_group_members_share_one_durable_consumer(world: World) -> None:
    bus = world.bus
    stream = await _fill(world, 0)
    group = world.name("g")
    a, b = Collector(), Collector()

    def acker(c: Collector) -> Callable[[BusMessage], Awaitable[None]]:
        async def handle(msg: BusMessage) -> None:
            await c(msg)
            await msg.ack()
        return handle

    await bus.consume(stream, group, world.subject("in.>"), acker(a), queue=group)
    await bus.consume(stream, group, world.subject("in.>"), acker(b), queue=group)
    await bus.flush()
    for i in range(300):
        await bus.publish(world.subject(f"in.{i % 3}"), str(i).encode())
    await bus.flush()
    deadline = time.monotonic() + 10
    while len(a.messages) + len(b.messages) < 300 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await quiet(0.3)
    bodies = a.bodies + b.bodies
    assert sorted(bodies) == sorted(str(i).encode() for i in range(300))  # each once
    assert a.messages and b.messages


# --- KV -------------------------------------------------------------------------------------------------


async def test_kv_put_get_watch(world: World) -> None:
    bus = world.bus
    bucket = world.name("cfg")
    world.streams.append(f"KV_{bucket}")
    assert await bus.kv_get(bucket, "missing") is None
    r1 = await bus.kv_put(bucket, "inference_settings", b'{"a": 1}')
    r2 = await bus.kv_put(bucket, "model_config", b'{"b": 2}')
    assert r2 > r1
    assert await bus.kv_get(bucket, "inference_settings") == b'{"a": 1}'
    seen: list[tuple[str, bytes | None]] = []
    event = asyncio.Event()

    async def handler(key: str, value: bytes | None) -> None:
        seen.append((key, value))
        event.set()

    watch = await bus.kv_watch(bucket, handler)
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sorted(seen) == [("inference_settings", b'{"a": 1}'), ("model_config", b'{"b": 2}')]
    r3 = await bus.kv_put(bucket, "inference_settings", b'{"a": 3}')
    assert r3 > r2
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert seen[2] == ("inference_settings", b'{"a": 3}')
    assert await bus.kv_get(bucket, "inference_settings") == b'{"a": 3}'
    await watch.stop()


async def test_closed_bus_refuses_with_bus_unavailable(world: World) -> None:
    await world.bus.close()
    with pytest.raises(BusUnavailable):
        await world.bus.publish(world.subject("x"), b"")
