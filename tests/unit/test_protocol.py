"""The coalescing transport under sigserve's uvicorn protocol: a response's head and body reach
the socket in one write, in order, and nothing is held back (close, a streamed body)."""

from __future__ import annotations

import asyncio
from typing import Any

from sigserve.api.protocol import CoalescingTransport


class RecordingTransport:
    """Stands in for the socket's transport: records every write that reaches it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.paused = True


async def test_one_step_of_writes_is_one_write_on_the_next_turn() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert raw.writes == []
    assert transport.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


async def test_flush_sends_now_and_the_scheduled_flush_is_then_a_no_op() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.writelines([b"a", b"b"])
    transport.flush()
    assert raw.writes == [b"ab"]
    await asyncio.sleep(0)
    assert raw.writes == [b"ab"]


async def test_order_is_kept_across_turns_and_close_sends_what_is_pending() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    for chunk in (b"1", b"2"):
        transport.write(chunk)
        await asyncio.sleep(0)  # a streamed body: one write per turn of the loop
    transport.write(b"3")
    transport.close()
    assert raw.writes == [b"1", b"2", b"3"] and raw.closed
    await asyncio.sleep(0)
    assert raw.writes == [b"1", b"2", b"3"]  # nothing written after close


async def test_a_write_pending_when_the_peer_went_away_is_dropped() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"late")
    raw.closed = True  # connection_lost happened before the loop turned
    await asyncio.sleep(0)
    assert raw.writes == []


def test_everything_else_is_the_wrapped_transports() -> None:
    raw = RecordingTransport()
    loop: Any = object()
    transport = CoalescingTransport(raw, loop)  # type: ignore[arg-type]
    transport.pause_reading()
    assert raw.paused and transport.is_closing() is False
