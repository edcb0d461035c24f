"""The Python side of ``bench/native/pacer.c``, the stream bench's native measuring client: its
build, the frames it sends and the files it writes. ``bench/stream.py`` drives it;
``tests/integration/test_bench_pacer.py`` holds it to its stamps and parsing through these same
functions, so what the test checks is what the bench reads.

    binary = build()                                   # bench/.build/pacer, rebuilt when stale
    folder.joinpath("frames").write_bytes(frames([(subject, body), ...]))
    ...                                                # run: see bench/stream.py native_paced
    sent_s, late_ms = read_sends(folder / "sends", n)
    received = read_received(folder / "received")      # [(receipt s, payload), ...]
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).parent / "native" / "pacer.c"
BINARY = Path(__file__).parent / ".build" / "pacer"
RECORD = struct.Struct("<qi")  # a receipt's CLOCK_MONOTONIC ns and its payload's length


def build(binary: Path = BINARY, flags: Sequence[str] = ("-O2",)) -> Path:
    """``pacer.c`` compiled to ``binary`` (again when the source is newer) with the machine's C
    compiler (``$CC``, ``cc`` or ``gcc``); without one, an error that names ``--client python``."""
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench/stream.py: the native measuring client needs a C compiler (cc or gcc);"
                         " install one, or run with --client python")
    binary.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, *flags, "-pthread", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def frames(messages: Iterable[tuple[str, bytes]]) -> bytes:
    """The NATS ``PUB`` frames of (subject, payload) pairs, in order: the client's FRAMES file."""
    return b"".join(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(body), body) for subject, body in messages)


def read_sends(path: Path, count: int) -> tuple[list[float], list[float]]:
    """The SENDS_OUT file: each frame's send time (s, ``time.perf_counter``'s clock on Linux) and
    its lateness against the schedule (ms)."""
    stamps = np.fromfile(path, dtype=np.int64)
    if stamps.size != 2 * count:
        raise ValueError(f"{path}: {stamps.size} stamps for {count} frames (expected {2 * count})")
    return (stamps[:count] / 1e9).tolist(), (stamps[count:] / 1e6).tolist()


def read_received(path: Path) -> list[tuple[float, bytes]]:
    """The RECEIVED_OUT file: (receipt time s, payload) of every message, in arrival order."""
    raw, at, out = path.read_bytes(), 0, []
    while at < len(raw):
        stamp, size = RECORD.unpack_from(raw, at)
        at += RECORD.size
        out.append((stamp / 1e9, raw[at:at + size]))
        at += size
    return out
