"""``bench/native/pacer.c``, the stream bench's measuring client, against the local NATS.

The bench's latency figures are only as good as this client's stamps and parsing, so it is held
to what ``bench/stream.py`` reads from it:

- every frame is sent once, at the asked rate, stamped on CLOCK_MONOTONIC (Python's
  ``time.perf_counter``), with its lateness against the schedule;
- every message on the subscription comes back whole (plain ``MSG`` and ``HMSG`` with headers,
  as the worker's audited signals arrive), stamped no earlier than the send it answers;
- a FRAMES file that is not NATS ``PUB`` frames is refused with exit status 2.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from types import ModuleType

from sigserve.bus import BusMessage
from sigserve.bus.nats import NatsBus
from tests.bench_modules import load_bench_module
from tests.services import require_executables, require_tcp

NATS_HOST, NATS_PORT = "127.0.0.1", 4222


def native_client() -> ModuleType:
    """``bench/native_client.py``, the bench's own build and file readers."""
    return load_bench_module("native_client")


def build_pacer(tmp_path: Path) -> Path:
    require_executables("cc")
    binary: Path = native_client().build(tmp_path / "pacer", ("-O2", "-Wall", "-Werror"))
    return binary


def run_pacer(binary: Path, tmp_path: Path, rate: int, subscribe: str, expected: int) -> tuple[str, int]:
    with subprocess.Popen([str(binary), NATS_HOST, str(NATS_PORT), str(rate), subscribe,
                           str(tmp_path / "frames"), str(tmp_path / "sends"), str(tmp_path / "received"),
                           str(expected), "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        done = proc.stdout.readline().strip()
        return done, proc.wait(30)


async def test_pacer_paces_stamps_and_reads_headers(tmp_path: Path) -> None:
    require_tcp("NATS", NATS_HOST, NATS_PORT)
    binary = build_pacer(tmp_path)
    prefix = f"p{uuid.uuid4().hex[:8]}"
    n, rate = 300, 2000
    bodies = [b'{"k":%d,"pad":"%s"}' % (k, b"x" * (k % 50)) for k in range(n)]
    client = native_client()
    (tmp_path / "frames").write_bytes(client.frames((f"{prefix}.features.S{k % 3}.1m", body)
                                                    for k, body in enumerate(bodies)))

    bus = NatsBus(f"nats://{NATS_HOST}:{NATS_PORT}")
    await bus.connect()
    echoed = 0

    async def echo(msg: BusMessage) -> None:  # answers with headers: the subscriber gets HMSG
        nonlocal echoed
        echoed += 1
        await bus.publish(msg.subject.replace(".features.", ".signals.", 1), msg.data,
                          {"Nats-Msg-Id": f"id-{echoed}", "Sigserve-Test": "yes"})

    sub = await bus.subscribe(f"{prefix}.features.>", echo)
    await bus.flush()
    try:
        began = time.perf_counter()
        done, status = await asyncio.to_thread(run_pacer, binary, tmp_path, rate, f"{prefix}.signals.>", n)
        ended = time.perf_counter()
    finally:
        await sub.stop()
        await bus.close()

    assert status == 0 and done == f"done {n} {n}"
    sent, late = client.read_sends(tmp_path / "sends", n)
    assert len(sent) == len(late) == n
    assert began <= sent[0] and sent[-1] <= ended  # the same clock as time.perf_counter
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) > 0
    assert abs(statistics.median(gaps) - 1 / rate) < 0.1 / rate
    assert min(late) >= 0

    received = client.read_received(tmp_path / "received")
    assert sorted(body for _, body in received) == sorted(bodies)  # whole, once each
    index = {body: k for k, body in enumerate(bodies)}
    for stamp, body in received:
        assert stamp >= sent[index[body]]


def test_pacer_refuses_frames_that_are_not_pub(tmp_path: Path) -> None:
    require_tcp("NATS", NATS_HOST, NATS_PORT)
    binary = build_pacer(tmp_path)
    (tmp_path / "frames").write_bytes(b'{"not": "a frame"}\n')
    proc = subprocess.run([str(binary), NATS_HOST, str(NATS_PORT), "1000", "x.>", str(tmp_path / "frames"),
                           str(tmp_path / "sends"), str(tmp_path / "received"), "1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "not a sequence of PUB frames" in proc.stderr
