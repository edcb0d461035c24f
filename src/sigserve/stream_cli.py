"""``sigserve stream`` and ``sigserve config get|set`` (registered on the main CLI by cli.py).

    sigserve stream --nats nats://127.0.0.1:4222 --signals trend-1h --queue-group workers
    sigserve stream --input core         # core-NATS input: lowest latency, at most once
    sigserve config get                                  # the effective config (file + KV)
    sigserve config set inference_settings.confidence_threshold 0.6 --nats nats://127.0.0.1:4222
    sigserve config set model_config.version 3           # into the YAML file (no --nats)

Refusals print ``error_code: message`` and exit non-zero, as everywhere in the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli import JsonOpt, _settings, _split, app, console
from .config import Settings
from .errors import StoreUnavailable, ValidationError

config_app = typer.Typer(no_args_is_help=True,
                         help="Hot configuration of the stream worker: YAML file + NATS KV bucket sigserve-config.")
app.add_typer(config_app, name="config")

NatsOpt = Annotated[str | None, typer.Option("--nats", envvar="SIGSERVE_NATS_URL",
                                             help="NATS URL(s), comma-separated.")]
PrefixOpt = Annotated[str, typer.Option(help="Namespace for subjects, streams and the KV bucket (default none).")]
FileOpt = Annotated[Path | None, typer.Option("--config-file", envvar="SIGSERVE_STREAM_CONFIG",
                                              help="YAML config file (default: HOME/stream.yaml).")]


class StreamInput(StrEnum):
    """``--input``: how the worker takes feature messages in (``StreamOptions.input``)."""

    durable = "durable"
    core = "core"


INPUT_HELP = (
    "durable (default): a JetStream durable consumer of the FEATURES stream: at least once, a"
    " message is acked after its row is written and its signal stored by the audit stream, and"
    " redelivered otherwise. core: at-most-once input straight from core NATS (queue group"
    " honoured), no JetStream hop in front of the worker, nothing redelivered: a message lost"
    " while the worker is down, disconnected or paused is recovered only by catch-up/fallback"
    " from the store's features. Signals go to the audit stream TRADING_SIGNALS in both modes.")


def _config_file(settings: Settings, path: Path | None) -> Path:
    return path if path is not None else settings.home / "stream.yaml"


@app.command("stream")
def stream_cmd(
    nats: NatsOpt = None,
    signals: Annotated[list[str] | None, typer.Option(help="Signal ids (a,b); default: every active signal.")] = None,
    queue_group: Annotated[str | None, typer.Option(help="NATS queue group: workers in one share the load.")] = None,
    subject: Annotated[str | None, typer.Option(help="Feature subject, wildcards allowed (features.*.*).")] = None,
    prefix: PrefixOpt = "",
    store: Annotated[str | None, typer.Option(help="Store URL (overrides SIGSERVE_STORE).")] = None,
    config_file: FileOpt = None,
    write_first: Annotated[bool, typer.Option(help="Write each row before publishing its signal.")] = False,
    catchup: Annotated[bool, typer.Option(help="Compute stored bars missed since the last signal.")] = True,
    max_batch: Annotated[int, typer.Option(min=1, help="Most messages handled together.")] = 2048,
    write_linger_ms: Annotated[float | None, typer.Option(
        min=0.0, help="Group commit: store write cycles start at most every N ms (default: 100 on"
                      " DuckDB, 50 on PostgreSQL); acks wait for the write.")] = None,
    kafka: Annotated[str | None, typer.Option(envvar="SIGSERVE_KAFKA_BOOTSTRAP",
                                              help="Kafka bootstrap servers for the archive sink.")] = None,
    store_process: Annotated[bool, typer.Option(
        help="Run a DuckDB store in a child process of its own (default): its writes never hold"
             " the worker's GIL or stall its loop.")] = True,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
    input_: Annotated[StreamInput, typer.Option("--input", case_sensitive=False, help=INPUT_HELP)]
    = StreamInput.durable,
) -> None:
    """Live worker: features.{symbol}.{interval} in, signals.{symbol}.{interval} out (JetStream:
    durable input by default, audit stream TRADING_SIGNALS, acks after the row is written;
    --input core trades redelivery for latency)."""
    from .bus.nats import NatsBus
    from .stream import Names, StreamOptions, StreamWorker

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise ValidationError(f"--log-level {log_level!r}: use debug, info, warning or error")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings()
    if store is not None:
        settings = settings.model_copy(update={"store": store})
    options = StreamOptions(
        signals=tuple(_split(signals)), subject=subject, queue_group=queue_group,
        names=Names(prefix=prefix), config_file=_config_file(settings, config_file),
        max_batch=max_batch, write_first=write_first, write_linger_ms=write_linger_ms, catchup=catchup,
        kafka_bootstrap=kafka, input=input_.value)
    url = nats or "nats://127.0.0.1:4222"

    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            opened = _open_services(settings, store_process)
            services = await opened.__aenter__()
        except StoreUnavailable as exc:
            if settings.store_url.startswith("duckdb") and "lock" in exc.message.lower():
                raise StoreUnavailable(
                    f"the DuckDB store {settings.store_url} is open in another process: a DuckDB file"
                    " has one writing process, so run one stream worker on it (or use a PostgreSQL"
                    " store, --store postgresql://..., for several workers in a queue group)",
                    details={"store": settings.store_url}) from exc
            raise
        try:
            bus = NatsBus(url)
            await bus.connect()
            try:
                worker = StreamWorker(services, bus, options)
                await worker.start()
                console.print(f"streaming {options.feature_subject} -> {options.names.signals_all} on {url}"
                              f" for {', '.join(sorted(worker.routes))}"
                              + (f" (queue group {queue_group})" if queue_group else "")
                              + (" (core input: at most once)" if worker.core and bus.durable else "")
                              + "; Ctrl-C stops", highlight=False, soft_wrap=True)
                try:
                    await stop.wait()
                finally:
                    await worker.stop()
                return dict(worker.stats)
            finally:
                await bus.close()
        finally:
            await opened.__aexit__(None, None, None)

    stats = _run(main())
    console.print(f"stopped: {stats}", highlight=False, soft_wrap=True)


# The store process's niceness: its writes (acks wait for them, publishes do not) yield the CPU
# to the worker's receive -> publish path and to the NATS server on a small machine.
STORE_PROCESS_NICE = 5
# The DuckDB journal's apply linger in the worker's store process (the store's default is 50 ms,
# for a server's reads): applies cost DuckDB's per-statement work, and every apply, even at idle
# priority, moved the stream's tail. Measured at 1,000 msg/s (core input, alternated runs on
# VM-K), p99: 50 ms 3.97 / 3.53 / 3.71 / 3.62 / 2.99, 500 ms 3.35 / 2.98 / 3.23 / 2.92 / 2.51,
# 1 s 3.02 / 2.50 / 2.33 / 2.70, 2 s 2.46 / 2.84. Nothing waits for it: rows are durable in the
# journal once written, and a read of signal_history applies what is pending first.
STREAM_JOURNAL_LINGER_MS = 1000


def _open_services(settings: Settings, store_process: bool) -> Any:
    """``Services.open``, with a DuckDB file store in a child process (:mod:`.stream_storeproc`)
    when ``store_process``: the registry and the engine call it as they call the store."""
    from .app import Services

    url = settings.store_url
    if not store_process or not url.startswith("duckdb://") or url.endswith(":memory:"):
        return Services.open(settings)
    from .stream_storeproc import StoreProcess

    if "journal_linger_ms=" not in url:
        url += ("&" if "?" in url else "?") + f"journal_linger_ms={STREAM_JOURNAL_LINGER_MS}"
    return Services.open(settings, store=StoreProcess(url, nice=STORE_PROCESS_NICE))


def _run(coro: Any) -> Any:
    """Run the worker on uvloop when it is installed (uvicorn[standard] brings it), after a GC
    tuning for a long-lived low-latency process: everything allocated at start (the model, the
    imports) is frozen out of the collector, so a full collection never walks it mid-stream."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard] on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _with_bus(url: str | None, work: Any) -> Any:
    if url is None:
        return await work(None)
    from .bus.nats import NatsBus

    bus = NatsBus(url)
    await bus.connect()
    try:
        if not bus.durable:
            from .errors import BusUnavailable

            raise BusUnavailable(f"NATS at {url} has no JetStream: the KV bucket needs it (nats-server -js)")
        return await work(bus)
    finally:
        await bus.close()


@config_app.command("get")
def config_get(
    key: Annotated[str | None, typer.Argument(help="SECTION or SECTION.FIELD; default: everything.")] = None,
    nats: NatsOpt = None,
    prefix: PrefixOpt = "",
    config_file: FileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the effective config: defaults < the YAML file < the KV bucket (with --nats)."""
    from .hotconfig import build, read_file, read_kv, split_key
    from .stream import Names

    path = _config_file(_settings(), config_file)
    bucket = Names(prefix=prefix).config_bucket

    async def work(bus: Any) -> dict[str, Any]:
        kv = await read_kv(bus, bucket) if bus is not None else {}
        return build(read_file(path), kv).to_dict()

    data: Any = asyncio.run(_with_bus(nats, work))
    if key is not None:
        section, field = split_key(key)
        if field is not None and field not in data[section]:
            raise ValidationError(f"unknown config key {key!r}", details={"key": key})
        data = data[section] if field is None else data[section][field]
    if as_json or not isinstance(data, dict):
        sys.stdout.write(json.dumps(data, indent=2 if isinstance(data, dict) else None) + "\n")
        return
    import yaml

    sys.stdout.write(yaml.safe_dump(data, sort_keys=True))


@config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help="SECTION.FIELD, e.g. inference_settings.confidence_threshold.")],
    value: Annotated[str, typer.Argument(help="A YAML value: 0.6, true, null, production, 3 ...")],
    nats: NatsOpt = None,
    prefix: PrefixOpt = "",
    config_file: FileOpt = None,
) -> None:
    """Change one setting: in the KV bucket with --nats (every worker applies it at once), else in
    the YAML file (workers that read it apply it within a second). The whole config is validated
    first; an invalid value is refused and nothing is written."""
    from .hotconfig import build, decode_section, parse_value, read_file, read_kv, set_key, split_key
    from .stream import Names

    path = _config_file(_settings(), config_file)
    bucket = Names(prefix=prefix).config_bucket
    parsed = parse_value(value)
    section, field = split_key(key)
    if field is None and not isinstance(parsed, dict):
        raise ValidationError(f"{key!r} is a section: set {key}.FIELD, or give a mapping")

    async def work(bus: Any) -> str:
        file_layer = read_file(path)
        if bus is None:
            updated = set_key(file_layer, key, parsed)
            build(updated)  # refuse before writing
            from .hotconfig import write_file

            write_file(path, updated)
            return f"in {path}"
        kv = await read_kv(bus, bucket)
        updated = set_key(kv, key, parsed)
        build(file_layer, updated)
        raw = json.dumps(updated[section], sort_keys=True).encode()
        decode_section(section, raw)
        revision = await bus.kv_put(bucket, section, raw)
        return f"in KV {bucket} (revision {revision})"

    where = asyncio.run(_with_bus(nats, work))
    console.print(f"{key} = {json.dumps(parsed)} {where}", highlight=False)


__all__ = ["config_app", "stream_cmd"]
