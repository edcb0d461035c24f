"""Shadow predictions in a worker process of their own: the server's request thread only sends
each shadow's feature row down a pipe.

Why a process: shadow work in the server (in the event loop between requests, or in a thread)
shares its interpreter with the requests, and its objects live until the batch runs. Measured at
c=1 with one shadow (``bench/rollout.py``, 300 trees, lleaves): p99 0.50 -> 1.56 ms in the loop,
1.63 ms in a ``SCHED_IDLE`` thread whatever ``sys.setswitchinterval``, against 0.52 ms when the
row is only sent to another process. The worker (``python -m sigserve.routing.shadow_worker``)
runs under ``SCHED_IDLE``: it takes a CPU only when nothing else wants it, so shadows never slow
the champion; ``SIGSERVE_SHADOW_CPUS`` pins it (say, away from a server pinned with taskset).

What crosses the pipe (frames: 4-byte little-endian length, one kind byte, a payload):

- server -> worker: ``L`` a shadow version to load (its definition and model card, and the cards
  of an ensemble's parts; the worker verifies the sha and loads it as the server does), ``J`` one
  job (the row(s) in the shadow's columns, the served actions), ``F`` flush (answer ``D``);
- worker -> server: ``R`` results (the shadow rows to write, the comparisons, jobs done and
  failed), ``D`` flushed up to a sequence number, ``E`` a version that failed to load.

The server writes the returned rows (one write per shadow version and symbol per batch) and
keeps the comparison and the counters, as the in-loop runner does. Jobs in flight (buffered or
in the worker) are bounded by ``maxsize``: more are dropped and counted. A worker that dies fails
its jobs (counted) and is started again on the next job, a second later at the soonest.

Usage::

    runner = ShadowProcessRunner(engine, settings, maxsize=1024, metrics=metrics)
    runner.start()          # in the event loop
    runner.submit(routed, features, served, source, write)
    await runner.idle()     # every job sent so far predicted and written
    await runner.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import subprocess
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from ..domain import FeatureBatch, SignalBatch
from ..timeutil import TS_DTYPE
from .shadow import Comparison, ShadowRecorder, one_per_key

if TYPE_CHECKING:
    from ..config import Settings
    from ..engine import Engine, Prepared

log = logging.getLogger("sigserve.shadow")

LOAD, JOB, FLUSH, RESULTS, FLUSHED, LOAD_FAILED = b"L", b"J", b"F", b"R", b"D", b"E"
_PROTOCOL = pickle.HIGHEST_PROTOCOL
KEEP_VERSIONS = 64  # shadow versions the worker keeps loaded (the oldest is unloaded)
RESTART_AFTER_S = 1.0
PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size


def frame(kind: bytes, payload: bytes) -> bytes:
    return (len(payload) + 1).to_bytes(4, "little") + kind + payload


def read_frames(buffer: bytearray) -> list[tuple[bytes, bytes]]:
    """The whole frames at the start of ``buffer`` (removed from it); a partial one stays."""
    out = []
    at = 0
    while len(buffer) - at >= 4:
        size = int.from_bytes(buffer[at:at + 4], "little")
        if len(buffer) - at - 4 < size:
            break
        body = bytes(buffer[at + 4:at + 4 + size])
        out.append((body[:1], body[1:]))
        at += 4 + size
    del buffer[:at]
    return out


def read_available(fd: int, inbox: bytearray) -> bool:
    """Append what the non-blocking ``fd`` holds now to ``inbox``; True at its end."""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        inbox += chunk


def encode_job(key: int, served_version: int, rows: FeatureBatch, served_actions: np.ndarray,
               source: str, write: bool) -> bytes:
    return frame(JOB, pickle.dumps(
        (key, served_version, rows.symbol, rows.interval, rows.ts.tobytes(), rows.values.tobytes(),
         rows.feature_keys.tolist(), rows.close.tobytes(), served_actions.astype(np.int8).tobytes(),
         source, write), _PROTOCOL))


def decode_job(fields: tuple[Any, ...], names: tuple[str, ...]) -> tuple[int, int, FeatureBatch, np.ndarray, str, bool]:
    """A job's fields (``pickle.loads`` of its payload; the first is its version's key), its rows
    in ``names``, the columns of that version."""
    key, served_version, symbol, interval, ts, values, keys, close, served, source, write = fields
    n = len(ts) // 8
    rows = FeatureBatch(symbol, interval, np.frombuffer(ts, dtype=TS_DTYPE),
                        np.frombuffer(values, dtype=np.float64).reshape(n, len(names)), names,
                        np.array(keys, dtype=object), np.frombuffer(close, dtype=np.float64))
    return key, served_version, rows, np.frombuffer(served, dtype=np.int8), source, write


def load_message(key: int, shadow: Prepared) -> bytes:
    """What the worker needs to load a shadow version as the server did: its definition, its
    card, and the cards of an ensemble's parts."""
    runtime = shadow.runtime
    parts = []
    if shadow.card.flavor == "ensemble":
        parts = [runtime.regime.card, *(p.card for p in runtime.specialists)]  # type: ignore[attr-defined]
        if runtime.meta is not None:  # type: ignore[attr-defined]
            parts.append(runtime.meta.card)  # type: ignore[attr-defined]
    return frame(LOAD, pickle.dumps((key, shadow.definition, shadow.card, parts), _PROTOCOL))


class ShadowProcessRunner(ShadowRecorder):
    """The shadow runner of a server, with the predictions in a worker process (see the module
    docstring); the same interface as :class:`.shadow.ShadowRunner`."""

    def __init__(self, engine: Engine, settings: Settings, *, maxsize: int = 1024, metrics: Any = None,
                 linger_s: float = 0.1, max_batch: int = 1024, cpus: set[int] | None = None) -> None:
        super().__init__(metrics)
        self.engine = engine
        self.settings = settings
        self.maxsize = maxsize
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.cpus = cpus
        self.process: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = 0.0
        self._keys: dict[int, tuple[int, Prepared]] = {}  # id(shadow Prepared) -> (key, it)
        self._next_key = 0
        self._in_flight = 0  # jobs sent (or buffered) and not reported back
        self._unsent: list[tuple[Prepared, FeatureBatch, SignalBatch, str, bool]] = []
        self._out: deque[bytes] = deque()  # frames the pipe did not take yet
        self._inbox = bytearray()
        self._control: int | None = None  # the write end of the worker's wake-up pipe
        self._flush_seq = 0
        self._flushed: dict[int, asyncio.Future[None]] = {}
        self._writes: asyncio.Queue[list[SignalBatch]] | None = None
        self._writer: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._writes = asyncio.Queue()
        self._writer = self._loop.create_task(self._write_rows(), name="shadow-writer")
        self._spawn()

    async def stop(self, drain_s: float = 2.0) -> None:
        if self._loop is None:
            return
        if self.process is not None and drain_s > 0:
            with contextlib.suppress(TimeoutError):
                await self.idle(drain_s)
        self._close_process(kill_after_s=1.0)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._writer = None
        self._loop = None

    async def idle(self, timeout_s: float = 5.0) -> None:
        """Wait until every job sent so far is predicted and its rows written (tests, stop)."""
        loop = self._loop
        if loop is None:
            return
        async with asyncio.timeout(timeout_s):
            if self.process is not None:
                self._send_unsent()  # the jobs queued in this turn of the loop go first
                self._flush_seq += 1
                waiter = self._flushed[self._flush_seq] = loop.create_future()
                self._send(frame(FLUSH, self._flush_seq.to_bytes(8, "little")))
                self._wake()
                await waiter
            assert self._writes is not None
            await self._writes.join()

    # --- the hot path ---------------------------------------------------------------------
    def submit(self, routed: Prepared, features: FeatureBatch, served: SignalBatch, source: str,
               write: bool) -> bool:
        """Queue the shadows of one served prediction; False (and counted) when ``maxsize`` jobs
        are in flight or no worker can run now. The rows are encoded and sent after the request
        step that submitted them (a turn of the loop later, in one write), not inside it:
        measured, encoding in the request cost it 18 us at p50."""
        if self._in_flight >= self.maxsize or (self.process is None and not self._spawn()):
            self.dropped()
            return False
        self._in_flight += len(routed.shadows)
        if not self._unsent:
            assert self._loop is not None
            self._loop.call_soon(self._send_unsent)
        self._unsent.append((routed, features, served, source, write))
        return True

    def _send_unsent(self) -> None:
        unsent, self._unsent = self._unsent, []
        if not unsent:
            return
        frames = []
        for routed, features, served, source, write in unsent:
            items = self.rows_of(routed, features, served, source, write)
            self._in_flight -= len(routed.shadows) - len(items)  # skipped: not sent
            for item in items:
                known = self._keys.get(id(item.shadow))
                if known is None or known[1] is not item.shadow:
                    frames.append(self._load(item.shadow))
                    known = self._keys[id(item.shadow)]
                frames.append(encode_job(known[0], item.served_version, item.features, item.served_actions,
                                         item.source, item.write))
        self._send(b"".join(frames))

    def _load(self, shadow: Prepared) -> bytes:
        """A key for a shadow version the worker has not loaded yet; its load frame."""
        self._next_key += 1
        self._keys[id(shadow)] = (self._next_key, shadow)
        while len(self._keys) > KEEP_VERSIONS:  # the worker drops the same oldest one
            del self._keys[next(iter(self._keys))]
        return load_message(self._next_key, shadow)

    def _send(self, data: bytes) -> None:
        process = self.process
        if process is None or process.stdin is None:
            return
        if not self._out:
            try:
                sent = os.write(process.stdin.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError:  # the worker is gone: its reader sees the end and fails the jobs
                return
            if sent == len(data):
                return
            data = data[sent:]
            assert self._loop is not None
            self._loop.add_writer(process.stdin.fileno(), self._drain_out)
        self._out.append(data)

    def _drain_out(self) -> None:
        process = self.process
        if process is None or process.stdin is None:
            return
        fd = process.stdin.fileno()
        while self._out:
            data = self._out[0]
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                return
            except OSError:
                self._out.clear()
                break
            if sent < len(data):
                self._out[0] = data[sent:]
                return
            self._out.popleft()
        assert self._loop is not None
        self._loop.remove_writer(fd)
        if self._flushed:
            self._wake()  # the flush frame is in the pipe now

    def _wake(self) -> None:
        """Cut the worker's linger short: it reads its jobs (and a flush) now."""
        if self._control is not None:
            with contextlib.suppress(OSError):
                os.write(self._control, b"!")

    # --- the worker process ---------------------------------------------------------------
    def _spawn(self) -> bool:
        now = time.monotonic()
        if self._started_at and now - self._started_at < RESTART_AFTER_S:
            return False
        self._started_at = now
        settings = self.settings
        cmd = [sys.executable, "-m", "sigserve.routing.shadow_worker",
               "--home", str(settings.home.resolve()), "--threads", str(settings.predict_threads),
               "--linger-ms", str(self.linger_s * 1000.0), "--max-batch", str(self.max_batch)]
        if self.cpus:
            cmd += ["--cpus", ",".join(str(c) for c in sorted(self.cpus))]
        # the worker sleeps out a linger on this pipe alone, so that jobs do not wake it
        control_read, control = os.pipe()
        cmd += ["--control-fd", str(control_read)]
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       pass_fds=(control_read,))
        except OSError as exc:
            log.error("the shadow worker could not start: %s", exc)
            os.close(control)
            return False
        finally:
            os.close(control_read)
        os.set_blocking(control, False)
        self._control = control
        assert process.stdin is not None and process.stdout is not None
        # a linger's jobs wait in the pipe while the worker sleeps (~300 bytes a job)
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(process.stdin.fileno(), False)
        os.set_blocking(process.stdout.fileno(), False)
        self.process = process
        self._keys.clear()
        self._inbox.clear()
        assert self._loop is not None
        self._loop.add_reader(process.stdout.fileno(), self._on_readable)
        return True

    def _close_process(self, kill_after_s: float) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        loop = self._loop
        assert process.stdin is not None and process.stdout is not None
        if loop is not None:
            loop.remove_reader(process.stdout.fileno())
            loop.remove_writer(process.stdin.fileno())
        self._out.clear()
        self._unsent.clear()  # counted in _in_flight: failed below
        if self._control is not None:
            os.close(self._control)
            self._control = None
        with contextlib.suppress(OSError):
            process.stdin.close()  # the worker exits at the end of its input
        try:
            process.wait(kill_after_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        if self._in_flight:
            self.stats["failed"] += self._in_flight
            self._in_flight = 0
        for waiter in self._flushed.values():
            if not waiter.done():
                waiter.set_result(None)
        self._flushed.clear()

    def _on_readable(self) -> None:
        process = self.process
        assert process is not None and process.stdout is not None
        ended = read_available(process.stdout.fileno(), self._inbox)
        for kind, payload in read_frames(self._inbox):
            self._on_frame(kind, payload)
        if ended:
            log.error("the shadow worker exited (code %s); %d shadow jobs failed", process.poll(),
                      self._in_flight)
            self._close_process(kill_after_s=1.0)

    def _on_frame(self, kind: bytes, payload: bytes) -> None:
        if kind == RESULTS:
            rows, comparisons, done, failed = pickle.loads(payload)
            self._in_flight = max(0, self._in_flight - done - failed)
            self.stats["batches"] += 1
            self.stats["failed"] += failed
            self.record([Comparison(*c) for c in comparisons])
            if rows:
                assert self._writes is not None
                self._writes.put_nowait(rows)
        elif kind == FLUSHED:
            waiter = self._flushed.pop(int.from_bytes(payload, "little"), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == LOAD_FAILED:
            key, code, message = pickle.loads(payload)
            log.error("shadow version %s cannot be predicted (%s): %s", key, code, message)

    async def _write_rows(self) -> None:
        writes = self._writes
        assert writes is not None
        while True:
            rows = await writes.get()
            try:
                for batch in one_per_key(rows):
                    await self.engine.store.write_signals(batch)
            except Exception:  # a shadow never takes the server down
                self.stats["failed"] += sum(len(b) for b in rows)
                log.exception("shadow rows could not be written")
            finally:
                writes.task_done()
