"""Stream worker benchmark: feature-publish -> signal-receive latency and sustained throughput.

A real ``sigserve stream`` process (the CLI) serves a 300-tree x 32-feature LightGBM model; this
process publishes feature messages to NATS (loopback, JetStream) and subscribes to ``signals.>``.
Latency is measured per message, from just before the feature publish to the signal's arrival,
on one clock (both ends are in this process). Phases, per store (DuckDB file, PostgreSQL):

- ``rate-1000`` / ``rate-5000``: a fixed-rate publisher (messages spread over the symbols),
  latency p50/p99 and the rate actually answered;
- ``floor-1000``: the transport alone: an echo process (one durable publish per feature, acked
  after the audit stream's ack; no model, no store) in place of the worker;
- ``drain``: a backlog of N messages is loaded into the FEATURES stream before the worker starts;
  the worker's sustained throughput is the backlog over the time from its first signal to its
  last (one worker; with ``--workers 2`` two in a queue group, PostgreSQL only).

    .venv/bin/python bench/stream.py --runs 3                 # both stores, every phase
    .venv/bin/python bench/stream.py --stores duckdb --phases rate-1000

Run it under ``flock /tmp/sigserve-bench.lock`` on a shared machine. The JSON of every run is
written under ``bench/results/stream-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from common import ROOT, bench_home, machine, make_data, percentiles, train_model, write_result

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
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")
DATA_ROWS = 250_000


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
        symbol = SYMBOLS[i % len(SYMBOLS)]
        row = self.values[(i // len(SYMBOLS)) % len(self.values)]
        ts = self.t0 + np.timedelta64(60_000_000, "us") * (i // len(SYMBOLS))
        body = {"symbol": symbol, "interval": INTERVAL, "ts": format_ts(ts), "feature_key": "bench-stream",
                "features": dict(zip(self.names, row.tolist(), strict=True)),
                "close": float(self.close[(i // len(SYMBOLS)) % len(self.close)])}
        subject = f"{prefix}.features.{symbol}.{INTERVAL}"
        return subject, orjson.dumps(body), (symbol, int(ts.astype(np.int64)) // 1000)


async def prepare(home: Path, store_url: str, names: tuple[str, ...]) -> None:
    settings = Settings(home=home, store=store_url)
    async with Services.open(settings) as services:
        store, registry = services.store, services.registry
        if await store.get_signal(SIGNAL) is not None:
            return
        model = bench_home() / "model-300x32.txt"
        if not model.exists():
            print("training the bench model (once) ...", flush=True)
            train_model(make_data(DATA_ROWS), model)
        card = await registry.register(model, name="bench-stream")
        await registry.promote(card.name, card.version, Stage.PRODUCTION, actor="bench")
        await store.register_features(list(names))
        await store.create_signal(SignalDefinition(SIGNAL, "bench-stream", "@production", INTERVAL, SYMBOLS,
                                                   Policy(threshold=0.52, atr_feature="atr_14")))


class Worker:
    def __init__(self, home: Path, store_url: str, prefix: str, group: str | None) -> None:
        self.home, self.store_url, self.prefix, self.group = home, store_url, prefix, group
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        # SIGSERVE_BENCH_WORKER_WRAP: a command prefix for the worker (a profiler, an instrumented
        # entry point), e.g. "py-spy record -o prof.svg --"
        wrap = shlex.split(os.environ.get("SIGSERVE_BENCH_WORKER_WRAP", ""))
        cmd = [*wrap, str(ROOT.parent / ".venv" / "bin" / "sigserve"), "--home", str(self.home), "stream",
               "--nats", NATS, "--store", self.store_url, "--prefix", self.prefix, "--no-catchup",
               "--log-level", "warning"]
        if self.group:
            cmd += ["--queue-group", self.group]
        cmd += shlex.split(os.environ.get("SIGSERVE_BENCH_WORKER_ARGS", ""))  # e.g. "--write-linger-ms 0"
        env = {**os.environ, "SIGSERVE_STREAM_CONFIG": str(self.home / "bench-stream.yaml")}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
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
    def __init__(self) -> None:
        self.sent: dict[tuple[str, int], float] = {}
        self.latency: list[float] = []
        self.worker_latency: list[float] = []
        self.first: float | None = None
        self.last = 0.0
        self.count = 0

    async def __call__(self, msg: Any) -> None:
        now = time.perf_counter()
        body = orjson.loads(msg.data)
        sent = self.sent.pop((body["symbol"], body["timestamp_ms"]), None)
        self.count += 1
        if self.first is None:
            self.first = now
        self.last = now
        if sent is not None:
            self.latency.append((now - sent) * 1000.0)
            self.worker_latency.append(body["metadata"]["prediction_latency_ms"])


async def run_rate(bus: NatsBus, feed: Feed, prefix: str, rate: int, seconds: float) -> dict[str, Any]:
    receiver = Receiver()
    sub = await bus.subscribe(f"{prefix}.signals.>", receiver)
    await bus.flush()
    total = int(rate * seconds)
    began = time.perf_counter()
    for k in range(total):
        due = began + k / rate
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        subject, data, key = feed.next(prefix)
        receiver.sent[key] = time.perf_counter()
        await bus.publish(subject, data)
    published_s = time.perf_counter() - began
    deadline = time.monotonic() + 30
    while receiver.count < total and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await sub.stop()
    lat = percentiles(receiver.latency) if receiver.latency else {}
    return {"phase": f"rate-{rate}", "rate_target": rate, "published": total,
            "publish_rate": round(total / published_s, 1), "received": receiver.count,
            "answered_rate": round(receiver.count / max(1e-9, receiver.last - began), 1),
            "latency_ms": {k: round(v, 3) if isinstance(v, float) else v for k, v in lat.items()},
            "worker_receipt_to_publish_ms": {k: round(v, 3) if isinstance(v, float) else v
                                             for k, v in percentiles(receiver.worker_latency or [0.0]).items()}}


async def echo_worker(prefix: str) -> None:
    """The transport's floor: a process that answers each feature with one durable publish and
    acks it after the audit stream's ack, and does nothing else (no model, no store)."""
    names = Names(prefix=prefix)
    bus = NatsBus(NATS)
    await bus.connect()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def handle(msg: Any) -> None:
        body = orjson.loads(msg.data)
        out = orjson.dumps({"symbol": body["symbol"], "timestamp_ms": 0, "key": body["ts"],
                            "metadata": {"prediction_latency_ms": (time.perf_counter() - msg.received) * 1000}})
        ack = await bus.publish_durable(names.signals(body["symbol"], INTERVAL), out, msg_id=str(uuid.uuid4()))

        async def settle() -> None:
            await ack
            await msg.ack()

        task = loop.create_task(settle())
        pending.add(task)
        task.add_done_callback(pending.discard)

    await bus.consume(names.stream(names.features_stream), "echo", names.subject("features.*.*"), handle)
    await bus.flush()
    print("streaming (echo)", flush=True)
    await asyncio.Event().wait()


async def run_floor(bus: NatsBus, feed: Feed, prefix: str, rate: int, seconds: float) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, "--echo", prefix], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()
    receiver = Receiver()

    async def receive(msg: Any) -> None:
        body = orjson.loads(msg.data)
        msg.data = orjson.dumps({**body, "timestamp_ms": int(np.datetime64(body["key"].rstrip("Z"), "ms")
                                                             .astype(np.int64))})
        await receiver(msg)

    sub = await bus.subscribe(f"{prefix}.signals.>", receive)
    await bus.flush()
    total = int(rate * seconds)
    began = time.perf_counter()
    for k in range(total):
        delay = began + k / rate - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        subject, data, key = feed.next(prefix)
        receiver.sent[key] = time.perf_counter()
        await bus.publish(subject, data)
    deadline = time.monotonic() + 30
    while receiver.count < total and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await sub.stop()
    proc.terminate()
    proc.wait(10)
    lat = percentiles(receiver.latency) if receiver.latency else {}
    return {"phase": f"floor-{rate}", "rate_target": rate, "published": total, "received": receiver.count,
            "latency_ms": {k: round(v, 3) if isinstance(v, float) else v for k, v in lat.items()}}


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
    workers = start_workers()
    deadline = time.monotonic() + 300
    while receiver.count < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await sub.stop()
    span = receiver.last - (receiver.first or receiver.last)
    return {"phase": "drain", "backlog": n, "received": receiver.count, "workers": len(workers),
            "seconds": round(span, 3), "msg_per_s": round((receiver.count - 1) / span, 1) if span > 0 else None,
            "_workers": workers}


async def bench_store(kind: str, store_url: str, phases: list[str], feed: Feed, drain_n: int,
                      workers: int, seconds: float) -> list[dict[str, Any]]:
    home = bench_home() / "stream" / kind
    home.mkdir(parents=True, exist_ok=True)
    await prepare(home, store_url, feed.names)
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
                    result = await run_floor(bus, feed, prefix, int(phase.split("-")[1]), seconds)
                elif phase.startswith("rate-"):
                    worker = Worker(home, store_url, prefix, None)
                    worker.start()
                    try:
                        result = await run_rate(bus, feed, prefix, int(phase.split("-")[1]), seconds)
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
    parser.add_argument("--phases", default="floor-1000,rate-1000,rate-5000,drain,drain-group")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--drain", type=int, default=40_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--echo", help=argparse.SUPPRESS)  # the floor phase's echo process
    args = parser.parse_args()
    if args.echo:
        asyncio.run(echo_worker(args.echo))
        return
    feed = Feed()
    stores = {"duckdb": f"duckdb:///{bench_home() / 'stream' / 'duckdb' / 'sigserve.duckdb'}",
              "postgres": f"{PG}?schema=bench_stream"}
    runs: list[dict[str, Any]] = []
    for run in range(args.runs):
        for kind in args.stores.split(","):
            phases = [p for p in args.phases.split(",") if not (p == "drain-group" and kind == "duckdb")]
            for result in asyncio.run(bench_store(kind, stores[kind], phases, feed, args.drain, args.workers,
                                                  args.seconds)):
                result["run"] = run
                runs.append(result)
    summary: dict[str, Any] = {}
    for key in sorted({(r["store"], r["phase"]) for r in runs}):
        same = [r for r in runs if (r["store"], r["phase"]) == key]
        if key[1].startswith(("rate", "floor")):
            summary[f"{key[0]} {key[1]}"] = {
                "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in same if r["latency_ms"]),
                "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in same if r["latency_ms"]),
                "answered_rate": statistics.median(r.get("answered_rate", r["received"] / args.seconds)
                                                   for r in same)}
        else:
            summary[f"{key[0]} {key[1]}"] = {
                "msg_per_s": statistics.median(r["msg_per_s"] or 0 for r in same),
                "workers": same[0]["workers"]}
    path = write_result("stream", {"bench": "stream", "machine": machine(), "nats": NATS, "runs": runs,
                                   "summary_medians": summary})
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {path}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
