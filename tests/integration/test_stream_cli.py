"""``sigserve stream`` and ``sigserve config`` as a user runs them (subprocesses, the local NATS).

- the worker starts on a DuckDB home, answers feature messages with signals, and stops cleanly on
  SIGINT; a second worker on the same DuckDB file refuses at start with a clear
  ``store_unavailable`` line (a DuckDB file has one writing process);
- ``config set`` validates before writing (file or KV) and ``config get`` reads the layers back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest

from sigserve.app import Services
from sigserve.bus.nats import NatsBus
from sigserve.config import Settings
from sigserve.stream import Names
from tests.integration.test_stream import INTERVAL, Market, Signals, cleanup, make_market, seed_store
from tests.services import require_tcp

NATS_URL = "nats://127.0.0.1:4222"
SIGSERVE = [sys.executable, "-m", "sigserve"]


def run(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIGSERVE, "--home", str(home), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), check=False)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGSERVE_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    return env


def start_worker(home: Path, prefix: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*SIGSERVE, "--home", str(home), "stream", "--nats", NATS_URL, "--prefix", prefix,
                             "--log-level", "warning", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


async def seeded_home(tmp_path: Path, bars: int = 20) -> tuple[Path, Market]:
    """A DuckDB home with the stream tests' model and signal for BTCUSDT (no feature rows)."""
    home = tmp_path / "home"
    market = make_market(("BTCUSDT",), bars)
    async with Services.open(Settings(home=home)) as services:
        await seed_store(services, tmp_path, market, store_features=False)
    return home, market


async def test_stream_command_serves_refuses_a_second_duckdb_worker_and_stops(tmp_path: Path) -> None:
    require_tcp("NATS", "127.0.0.1", 4222)
    home, market = await seeded_home(tmp_path)
    names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
    bus = NatsBus(NATS_URL)
    await bus.connect()
    live = Signals()
    await bus.subscribe(names.signals_all, live)
    worker = start_worker(home, names.prefix)
    try:
        assert worker.stdout is not None
        line = await asyncio.to_thread(worker.stdout.readline)
        assert "streaming" in line and "trend-1m" in line, line
        for i in range(20):
            await bus.publish(names.subject(f"features.BTCUSDT.{INTERVAL}"), market.message("BTCUSDT", i))
        got = await live.wait(20)
        assert {m["metadata"]["definition_id"] for m in got} == {"trend-1m"}
        # a second worker on the same DuckDB file: refused at start, one clear line, exit 1
        second = await asyncio.to_thread(run, "stream", "--nats", NATS_URL, "--prefix", names.prefix, home=home)
        assert second.returncode == 1, second.stderr
        assert second.stderr.startswith("store_unavailable: the DuckDB store"), second.stderr
        assert "one writing process" in second.stderr and "Traceback" not in second.stderr
    finally:
        worker.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(worker.communicate, timeout=60)
        await cleanup(bus, names)
        await bus.close()
    assert worker.returncode == 0, err
    assert "stopped" in out and "'acked': 20" in out


def test_stream_command_refusals(tmp_path: Path) -> None:
    home = tmp_path / "home"
    started = time.monotonic()
    unreachable = run("stream", "--nats", "nats://127.0.0.1:1", home=home)
    assert unreachable.returncode == 1 and time.monotonic() - started < 30
    assert unreachable.stderr.strip().splitlines()[-1].startswith("bus_unavailable: cannot connect to NATS")
    require_tcp("NATS", "127.0.0.1", 4222)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    nothing = run("stream", "--nats", NATS_URL, "--prefix", prefix, home=home)
    assert nothing.returncode == 2
    assert "validation_error: no active signal definition to stream" in nothing.stderr
    unknown = run("stream", "--nats", NATS_URL, "--prefix", prefix, "--signals", "nope", home=home)
    assert unknown.returncode == 1 and unknown.stderr.startswith("signal_not_found:")
    # refused before creating anything on the bus: no stream, no bucket

    async def leftovers() -> list[str]:
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            names = [i.config.name for i in await nc.jetstream().streams_info()]
        finally:
            await nc.close()
        return [n for n in names if prefix in n]

    assert asyncio.run(leftovers()) == []


def test_config_get_and_set_in_the_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run("config", "set", "inference_settings.confidence_threshold", "0.65", home=home).returncode == 0
    assert (home / "stream.yaml").exists()
    got = run("config", "get", "inference_settings.confidence_threshold", home=home)
    assert got.returncode == 0 and got.stdout.strip() == "0.65"
    everything = orjson.loads(run("config", "get", "--json", home=home).stdout)
    assert everything["inference_settings"]["confidence_threshold"] == 0.65
    assert everything["model_config"]["auto_reload"] is True
    refused = run("config", "set", "inference_settings.confidence_threshold", "1.5", home=home)
    assert refused.returncode == 2 and refused.stderr.startswith("validation_error: invalid stream config")
    assert run("config", "get", "inference_settings.confidence_threshold", home=home).stdout.strip() == "0.65"
    assert run("config", "set", "bogus.key", "1", home=home).returncode == 2


def test_config_set_in_the_kv_bucket_wins_over_the_file(tmp_path: Path) -> None:
    require_tcp("NATS", "127.0.0.1", 4222)
    home = tmp_path / "home"
    prefix = f"t{uuid.uuid4().hex[:10]}"
    try:
        assert run("config", "set", "model_config.version", "production", home=home).returncode == 0
        done = run("config", "set", "model_config.version", "7", "--nats", NATS_URL, "--prefix", prefix, home=home)
        assert done.returncode == 0 and f"{prefix}_sigserve-config" in done.stdout
        via_kv = run("config", "get", "model_config.version", "--nats", NATS_URL, "--prefix", prefix, home=home)
        assert via_kv.stdout.strip() == '"7"'
        file_only = run("config", "get", "model_config.version", home=home)
        assert file_only.stdout.strip() == '"production"'
    finally:
        async def drop() -> None:
            bus = NatsBus(NATS_URL)
            await bus.connect()
            await bus.delete_stream(f"KV_{prefix}_sigserve-config")
            await bus.close()

        asyncio.run(drop())


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SIGSERVE_NATS_URL", "SIGSERVE_STREAM_CONFIG", "SIGSERVE_KAFKA_BOOTSTRAP"):
        monkeypatch.delenv(key, raising=False)
