"""A do-nothing HTTP/1.1 keep-alive server: the harness floor (what the load generator and the loopback cost).

    python bench/peers/floor_server.py PORT [SPIN_US]

It answers every request with a fixed small JSON body, after reading the request body (Content-Length).
With ``SPIN_US`` it first spins on the CPU that long per request: a server as slow as the one
measured but with no work of its own, so that its tail is what the machine adds to a request of
that length (preemption, other tenants, interrupts), not what a server does.
"""

from __future__ import annotations

import asyncio
import sys
import time

BODY = b'{"ok":true,"score":0.5}'
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


SPIN_S = float(sys.argv[2]) / 1e6 if len(sys.argv) > 2 else 0.0


class Floor(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            length = 0
            for line in self.buffer[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            self.buffer = self.buffer[end:]
            if SPIN_S:
                until = time.perf_counter() + SPIN_S
                while time.perf_counter() < until:
                    pass
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, "127.0.0.1", port, backlog=256)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main(int(sys.argv[1])))
