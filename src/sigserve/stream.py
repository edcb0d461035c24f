"""The live driver: feature messages in, trading signals out, through the one engine.

``features.{symbol}.{interval}`` -> parse (a candle message: the model's feature spec computes the
newest bar's features from its last candles) -> route to the active signal definitions -> the
engine's ``compute`` (predict + policy, vectorised over the messages that arrived together) ->
validate -> publish ``signals.{symbol}.{interval}`` (also stored by the ``TRADING_SIGNALS``
stream, deduplicated with ``Nats-Msg-Id`` = the upsert key) -> upsert the rows -> ack.

Input (``StreamOptions.input``, ``sigserve stream --input``):

- ``durable`` (the default; JetStream on): the worker consumes the ``FEATURES`` stream through a
  durable consumer: at least once, every guarantee below. The price is JetStream's storage of
  each feature message before its delivery (file storage: a p99 of several ms at 1,000 msg/s on
  a 2-core machine, ``bench/stream.py``'s ``floor-1000``).
- ``core``: a plain core-NATS subscription on the feature subject (queue group honoured), even
  when JetStream is on: no JetStream hop in front of the worker, and **at most once**. A message
  is never redelivered: one that arrives while the worker is down, disconnected, paused on a
  store outage, or over the in-memory bound is lost to the live path; its bar comes back only
  through catch-up (on start, after a reconnect or an outage) and the grace-period fallback,
  which compute the bars the store holds features for since the newest stored signal. The
  ``FEATURES`` stream is still created (dead letters are stored in it, and a switch back to
  ``durable`` finds it), the audit stream still stores every published signal, rows are still
  group-committed, and the ack loop still awaits the writes and the audit stream's acks,
  counting and logging failures; acks and naks are no-ops. The worker holds at most
  ``max_ack_pending`` unfinished messages (received, not yet written and confirmed); past that,
  and while the store is down, new messages are dropped (``stats["dropped"]``, a warning at
  most every 10 s) instead of queued, so memory stays bounded. A batch whose write or audit
  publish failed is counted (``naked``, ``dropped``) and not retried: its signals may already
  be published; catch-up fills its rows only if they are newer than the newest stored signal
  (otherwise run a backfill over the window).

Guarantees with ``durable`` input (JetStream on; with ``core``, as qualified above):

- A feature message is acked only after its rows are written and its signals are stored by the
  audit stream. A failure that may pass (``store_unavailable``, ``bus_unavailable``) naks it and
  it comes again; while the store is down the worker stops taking messages (it naks them with a
  delay), pings the store, and drains the backlog once it answers.
- A poison message (bad JSON or fields, no signal for its symbol and interval, missing or
  non-numeric features, a deadline miss without ``fallback_to_hold``) goes to
  ``features.deadletter`` with its ``error_code`` and is acked; the worker keeps running.
- An invalid signal (levels that failed validation, confidence outside 0..1, an unknown type) is
  stored with its flag (the engine's row, as on every driver) but never published; a rejection
  record with ``error_code`` goes to ``sigserve.rejected``.
- Redelivery is harmless: rows are upserts and a signal's ``signal_id`` is a uuid5 of its
  upsert key, so a repeated publish carries the same id (and the audit stream drops it).
- Publish before write (the default; ``write_first`` off): a signal is published as soon as it
  is computed and validated, and its row is written by the group-commit writer afterwards; the
  message is acked only once both the row is written and the audit stream stored the signal. A
  crash between the publish and the write loses no row: the message was not acked, so it is
  redelivered, and a redelivered bar is published only after its row is stored (same
  ``signal_id``, deduplicated by the audit stream). A subscriber may therefore see a signal a few
  milliseconds (DuckDB: up to ``write_linger_ms`` + a write) before ``signal_history`` holds it;
  ``write_first`` gives the other order at the cost of the write's latency.
- Micro-batching: the messages that arrived while the previous batch was being handled form the
  next batch (up to ``max_batch``), so a quiet stream pays no wait. Group commit: write cycles
  start at most every ``write_linger_ms`` (100 ms on DuckDB, 50 ms on PostgreSQL by default) and
  merge the rows of a cycle into one store call per (signal, version, symbol), so the write cost
  is per cycle, not per message. ``sigserve stream`` runs a DuckDB store in a child process
  (:mod:`.stream_storeproc`), so its writes never hold the worker's GIL. A bar's row is the
  same as ``predict_bar``'s for the same features (the engine's invariant;
  ``tests/integration/test_stream.py`` checks it).
- A signal with a traffic policy (``sigserve rollout``) routes each bar as HTTP and backfill do:
  the challenger takes the (symbol, UTC trading date) buckets under its share, each version is
  computed on its bars (positions of its own), and the signals are published in ts order; every
  other version of the policy predicts the same bars as shadows, stored with ``shadow = true``,
  never published. The policy is re-read with the routes (``model.reload_interval_s``); a live
  config that pins another model overrides it. A signal without a policy pays nothing for this.
- On start, after a reconnect, and when no live message came for a bar within the grace period,
  bars stored since the last stored signal are computed from the store (``source=catchup_scan``).

Usage::

    worker = StreamWorker(services, bus, StreamOptions(signals=("trend-1h",)))
    await worker.start()
    ...
    await worker.stop()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import orjson

from .bus.base import Bus, BusMessage, Subscription
from .domain import (
    ACTIONS,
    FLAT,
    FeatureBatch,
    SignalBatch,
    SignalDefinition,
    SignalRows,
    Source,
    TrafficPolicy,
)
from .engine import DEADLINE_FLAG, Engine, Prepared, card_feature_spec, check_feature_keys, fill_feature_row
from .errors import (
    BusUnavailable,
    DeadlineExceeded,
    SigserveError,
    StoreUnavailable,
    ValidationError,
)
from .hotconfig import BUCKET as CONFIG_BUCKET
from .hotconfig import LiveConfig, StreamConfig
from .idle import give_way
from .stores.base import Store
from .timeutil import TS_DTYPE, format_ts, interval_us, parse_ts, validate_interval

log = logging.getLogger("sigserve.stream")
T = TypeVar("T")
SIGNAL_NAMESPACE = uuid.UUID("6f1d8c1e-2f0a-4c51-9a43-5b7b0f0d7a11")
ERROR_HEADER = "Sigserve-Error-Code"
_MISSING = object()
# Group-commit lingers (StreamOptions.write_linger_ms): a cycle is one store call whatever its
# size (Store.write_signal_batches): on DuckDB a journal append and fdatasync in the store
# process (applied behind, see stream_cli.STREAM_JOURNAL_LINGER_MS); on PostgreSQL one
# statement (up to 100 rows) or transaction, encoded on the worker's loop (longer lingers
# measured worse there on VM-K; on VM-R 25, 50 and 100 ms measured alike).
DUCKDB_WRITE_LINGER_MS = 100.0
SERVER_WRITE_LINGER_MS = 50.0
ACK_YIELD_EVERY = 8  # messages settled (a durable ack each) between two give_way()s: ~0.2 ms steps
_TS_MIN = np.datetime64("0001-01-01T00:00:00", "us")  # before any bar
_TS_MAX = np.datetime64("9999-12-31T00:00:00", "us")  # after any bar
INPUTS = ("durable", "core")
DROP_LOG_INTERVAL_S = 10.0


# --- names ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Names:
    """Subjects, streams and the durable name; ``prefix`` namespaces them all (tests, tenants)."""

    prefix: str = ""
    features_stream: str = "FEATURES"
    signals_stream: str = "TRADING_SIGNALS"

    def subject(self, rest: str) -> str:
        return f"{self.prefix}.{rest}" if self.prefix else rest

    def stream(self, base: str) -> str:
        return f"{self.prefix}_{base}" if self.prefix else base

    @property
    def features(self) -> str:
        return self.subject("features.>")

    @property
    def deadletter(self) -> str:
        return self.subject("features.deadletter")

    @property
    def rejected(self) -> str:
        return self.subject("sigserve.rejected")

    def signals(self, symbol: str, interval: str) -> str:
        return self.subject(f"signals.{symbol}.{interval}")

    @property
    def signals_all(self) -> str:
        return self.subject("signals.>")

    @property
    def config_bucket(self) -> str:
        return f"{self.prefix}_{CONFIG_BUCKET}" if self.prefix else CONFIG_BUCKET


@dataclass(frozen=True)
class StreamOptions:
    signals: tuple[str, ...] = ()  # empty: every active signal definition
    subject: str | None = None  # default: {prefix.}features.*.*
    queue_group: str | None = None
    durable: str = "sigserve"
    names: Names = field(default_factory=Names)
    config_file: Path | None = None
    max_batch: int = 2048
    ack_wait_s: float = 30.0
    max_ack_pending: int = 8192
    write_first: bool = False  # True: write the rows before publishing (slower, never unstored)
    # group commit: store write cycles start at most every this many ms (None: by store kind);
    # acks wait for the write, publishes do not (unless write_first or a redelivered bar)
    write_linger_ms: float | None = None
    catchup: bool = True
    catchup_max_bars: int = 10_000
    duplicate_window_s: float = 600.0
    features_max_age_s: float = 7 * 86_400.0
    kafka_bootstrap: str | None = None
    kafka_topic: str = "trading_signals_archive"
    # durable: a JetStream durable consumer (at least once; the default when JetStream is on);
    # core: a core-NATS subscription even with JetStream (at most once, no JetStream hop in front)
    input: Literal["durable", "core"] = "durable"

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValidationError(f"unknown stream input {self.input!r}: use durable (JetStream durable"
                                  " consumer, at least once) or core (core NATS, at most once)",
                                  details={"field": "input", "value": str(self.input)})

    @property
    def feature_subject(self) -> str:
        return self.subject or self.names.subject("features.*.*")


# --- messages ------------------------------------------------------------------------------------
@dataclass(slots=True)
class FeatureMessage:
    symbol: str
    interval: str
    ts: np.datetime64
    features: dict[str, Any]
    feature_key: str | None = None
    close: float | None = None
    # a candle message: the last candles (ts, open, high, low, close, volume arrays), the newest
    # being the bar at ts; ``features`` is then computed per model spec (cached by spec hash)
    candles: dict[str, np.ndarray] | None = None
    computed: dict[str, dict[str, Any]] | None = None


MAX_CANDLES = 10_000
_CANDLE_PRICES = ("open", "high", "low", "close", "volume")


def parse_candles(candles: Any, when: np.datetime64) -> dict[str, np.ndarray]:
    """A candle message's ``candles`` as arrays, checked (numbers, 0 < low <= open, close <= high,
    volume >= 0, ts strictly increasing), the newest being the bar at ``when``."""
    from .features.spec import candle_arrays

    if not isinstance(candles, list) or not candles:
        raise ValidationError("candles must be a non-empty list of {ts, open, high, low, close, volume}",
                              details={"field": "candles"})
    n = len(candles)
    if n > MAX_CANDLES:
        raise ValidationError(f"{n} candles in one message, over {MAX_CANDLES}",
                              details={"field": "candles", "count": n, "max": MAX_CANDLES})
    ts = np.empty(n, dtype=TS_DTYPE)
    columns = {k: np.empty(n, dtype=np.float64) for k in _CANDLE_PRICES}
    for i, candle in enumerate(candles):
        if not isinstance(candle, dict):
            raise ValidationError(f"candle #{i} must be an object {{ts, open, high, low, close, volume}}",
                                  details={"field": "candles", "index": i})
        stamp = candle.get("ts")
        if stamp is None or isinstance(stamp, bool | dict | list):
            raise ValidationError(f"candle #{i}: ts must be an ISO 8601 time or epoch seconds/milliseconds",
                                  details={"field": "candles", "index": i})
        ts[i] = parse_ts(stamp)
        for name, column in columns.items():
            value = candle.get(name, 0.0 if name == "volume" else None)
            kind = type(value)
            if kind is not float and kind is not int:
                raise ValidationError(f"candle #{i}: {name} must be a number",
                                      details={"field": "candles", "index": i, "column": name})
            column[i] = value
    if ts[-1] != when:
        raise ValidationError(
            f"the candles must end at the message's bar {format_ts(when)} (the newest is"
            f" {format_ts(ts[-1])}): send the last candles up to and including that bar",
            details={"field": "candles", "reason": "candles_not_ending_at_ts", "ts": format_ts(when),
                     "newest": format_ts(ts[-1])})
    return candle_arrays({"ts": ts, **columns}, validate=True)


def candle_features(prepared: Prepared, fm: FeatureMessage) -> dict[str, Any]:
    """The features of a candle message's newest bar by ``prepared``'s model spec (the spec on
    its card, as ``POST /predict`` with candles): ``FeatureSpec.compute_last`` over the candles,
    which must number at least the spec's ``window`` (then they equal a full history's)."""
    assert fm.candles is not None
    card = prepared.card
    spec = card_feature_spec(card)  # refuses a card without one (reason no_feature_spec)
    spec_hash = str(card.extra["feature_spec_hash"])
    cache = fm.computed
    if cache is None:
        cache = fm.computed = {}
    features = cache.get(spec_hash)
    if features is not None:
        return features
    n = int(fm.candles["close"].shape[0])
    if n < spec.window:
        raise ValidationError(
            f"{n} candles are too few for model {card.ref}: its feature spec needs the last"
            f" {spec.window} candles (its window) to compute the newest bar's features",
            details={"model": card.ref, "reason": "too_few_candles", "candles": n, "needed": spec.window})
    features = dict(zip(spec.names, spec.compute_last(fm.candles).tolist(), strict=True))
    cache[spec_hash] = features
    return features


def parse_feature_message(data: bytes, subject: str | None = None) -> FeatureMessage:
    """A feature message, or ``validation_error`` saying what is wrong with it."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"the message is not JSON: {exc}", details={"reason": "bad_json"}) from exc
    if not isinstance(body, dict):
        raise ValidationError("the message must be a JSON object", details={"reason": "not_object"})
    symbol, interval, ts, feats = (body.get(k) for k in ("symbol", "interval", "ts", "features"))
    if not isinstance(symbol, str) or not symbol or "." in symbol or " " in symbol:
        raise ValidationError("symbol must be a non-empty string without dots or spaces",
                              details={"field": "symbol", "value": str(symbol)})
    if not isinstance(interval, str):
        raise ValidationError("interval must be a string such as 1h", details={"field": "interval"})
    validate_interval(interval)
    if ts is None or isinstance(ts, bool | dict | list):
        raise ValidationError("ts must be an ISO 8601 time or epoch seconds/milliseconds",
                              details={"field": "ts"})
    when = parse_ts(ts)
    raw_candles = body.get("candles")
    candles = None
    if raw_candles is not None:
        if feats is not None:
            raise ValidationError("a message carries features or candles, not both",
                                  details={"field": "candles"})
        candles = parse_candles(raw_candles, when)
        feats = {}
    elif not isinstance(feats, dict):
        raise ValidationError("features must be an object of name -> number (or send candles)",
                              details={"field": "features"})
    key = body.get("feature_key")
    if key is not None and (not isinstance(key, str) or not key):
        raise ValidationError("feature_key must be a non-empty string", details={"field": "feature_key"})
    close = body.get("close", feats.get("close"))
    if close is not None:
        if isinstance(close, bool) or not isinstance(close, int | float):
            raise ValidationError("close must be a number", details={"field": "close"})
        close = float(close)
    if subject is not None:
        parts = subject.split(".")
        if len(parts) >= 3 and (parts[-2] != symbol or parts[-1] != interval):
            raise ValidationError(f"subject {subject!r} does not match the message's symbol and"
                                  f" interval ({symbol}, {interval})",
                                  details={"subject": subject, "symbol": symbol, "interval": interval})
    if close is None and candles is not None:
        close = float(candles["close"][-1])
    return FeatureMessage(symbol, interval, when, feats, key, close, candles)


def upsert_key(signal_id: str, model_version: int, symbol: str, interval: str, ts_us: int) -> str:
    """The natural key of a signal row; also the audit stream's ``Nats-Msg-Id``."""
    return f"{signal_id}|{model_version}|{symbol}|{interval}|{ts_us}"


_NAMESPACE_BYTES = SIGNAL_NAMESPACE.bytes


def signal_uuid(key: str) -> str:
    """``str(uuid.uuid5(SIGNAL_NAMESPACE, key))``, without building UUID objects (hot path)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + key.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def signal_messages(batch: SignalBatch, *, definition_id: str, model_type: str,
                    features_used: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every row of a signal batch in the published format (seed 001), with its upsert key.
    ``metadata.prediction_latency_ms`` is the row's ``latency_ms``."""
    prefix = f"{definition_id}|{batch.model_version}|{batch.symbol}|{batch.interval}|"
    symbol, interval, sha = batch.symbol, batch.interval, batch.model_sha256
    version = f"{batch.model_name}:{batch.model_version}"
    columns = zip(batch.ts.astype(np.int64).tolist(), batch.action.tolist(), batch.confidence.tolist(),
                  batch.entry_price.tolist(), batch.stop_loss.tolist(), batch.take_profit.tolist(),
                  batch.recommended_size.tolist(), batch.latency_ms.tolist(), batch.feature_keys.tolist(),
                  strict=True)
    out = []
    for ts_us, action, confidence, entry, stop, take, size, latency, feature_key in columns:
        key = prefix + str(ts_us)
        out.append((key, {
            "signal_id": signal_uuid(key),
            "symbol": symbol,
            "timeframe": interval,
            "timestamp_ms": ts_us // 1000,
            "signal_type": ACTIONS[action],
            "confidence_score": confidence,
            "entry_price": None if entry != entry else entry,
            "stop_loss": None if stop != stop else stop,
            "take_profit": None if take != take else take,
            "position_size_recommended": None if size != size else size,
            "model_version": version,
            "metadata": {
                "features_used": features_used,
                "prediction_latency_ms": round(latency, 4),
                "model_type": model_type,
                "model_sha256": sha,
                "feature_key": str(feature_key),
                "definition_id": definition_id,
            },
        }))
    return out


def signal_message(batch: SignalBatch, i: int, *, definition_id: str, model_type: str,
                   features_used: list[str], latency_ms: float) -> dict[str, Any]:
    """Row ``i`` of a signal batch in the published format, with ``latency_ms``."""
    one = batch.take(np.array([i]))
    one.latency_ms[:] = latency_ms
    return signal_messages(one, definition_id=definition_id, model_type=model_type,
                           features_used=features_used)[0][1]


def validate_signal(message: dict[str, Any], flags: str = "") -> str | None:
    """Why a signal must not be published, or None. Entries carry all four levels (entry, stop,
    target, size) or none of them (a definition without an ATR feature); a long's stop is below
    its entry and its target above (the reverse for a short); a hold or close carries none."""
    kind = message.get("signal_type")
    if kind not in ACTIONS:
        return f"unknown signal_type {kind!r}"
    confidence = message.get("confidence_score")
    if not isinstance(confidence, float | int) or not 0.0 <= confidence <= 1.0:
        return f"confidence_score {confidence!r} is outside 0..1"
    if "levels_invalid" in flags:
        return "levels failed validation (levels_invalid)"
    levels = [message.get(k) for k in ("entry_price", "stop_loss", "take_profit", "position_size_recommended")]
    present = [v is not None for v in levels]
    if kind in ("buy", "sell"):
        if not any(present):
            return None
        if not all(present):
            return "an entry carries some levels but not all"
        entry, stop, take, size = (float(v) for v in levels)  # type: ignore[arg-type]
        if not all(math.isfinite(v) and v > 0 for v in (entry, stop, take, size)):
            return "levels must be finite and > 0"
        if kind == "buy" and not stop < entry < take:
            return "a buy needs stop_loss < entry_price < take_profit"
        if kind == "sell" and not take < entry < stop:
            return "a sell needs take_profit < entry_price < stop_loss"
    elif any(present):
        return f"a {kind} carries no levels"
    return None


# --- the store's thread -------------------------------------------------------------------------
class StoreRunner:
    """Runs store calls off the event loop for an embedded (blocking) store.

    DuckDB calls block their thread for 1-4 ms a statement; on a thread of their own (with its own
    event loop, in submission order) they leave the bus loop free to receive and publish, but
    they still take the GIL between statements (``sigserve stream`` therefore runs a DuckDB file
    store in a process of its own, :class:`~sigserve.stream_storeproc.StoreProcess`, which is
    awaited on the loop like any async store). A store with async I/O (PostgreSQL) is awaited on
    the caller's loop.
    """

    def __init__(self, store: Store) -> None:
        from .stores.duckdb_store import DuckDBStore

        self.store = store
        self.offload = isinstance(store, DuckDBStore)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.offload or self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="sigserve-store", daemon=True)
        self._thread.start()
        ready.wait()

    def submit(self, factory: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Start the call now (in order with the others); a future of its result."""
        if self._loop is None:
            return asyncio.ensure_future(factory())
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(factory(), self._loop))  # type: ignore[arg-type]

    async def call(self, factory: Callable[[], Awaitable[T]]) -> T:
        return await self.submit(factory)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = None
            self._thread = None


class SignalWriter:
    """Group commit of the stream's signal rows. Each ``submit`` gets a future of its own batch's
    row count, set once the store holds the rows.

    A cycle takes every batch that queued up, merged per (signal, model version, symbol) into one
    store call (a later row for the same bar wins, as an upsert would), and runs the cycle's
    calls in one hop to the store's thread. Rows are copied into their key's ``SignalRows`` as
    they are submitted, so a cycle starts without a merge: merging 50-100 batches at once held the
    worker's loop for 0.7-0.9 ms, and the feature message that arrived then waited behind it.
    Cycles start at most every ``linger_s``: a store call costs about the same for 1 row as for
    100 (DuckDB: 4-6 ms of CPU; PostgreSQL: a commit), so the write cost is paid per cycle, not
    per message, and the store no longer takes a core (and, in process, the GIL) away from
    receiving and publishing. An ``urgent`` batch (a publish waits on it: ``write_first``, a
    redelivered bar) starts its cycle at once.
    """

    def __init__(self, runner: StoreRunner, store: Store, *, linger_s: float = 0.0) -> None:
        self.runner, self.store = runner, store
        self.linger_s = linger_s
        self._pending: dict[tuple[Any, ...], tuple[SignalRows, list[tuple[asyncio.Future[int], int]]]] = {}
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._urgent = False
        self._last = -math.inf
        self._task: asyncio.Task[None] | None = None
        self.calls = 0
        self.cycles = 0

    def submit(self, batch: SignalBatch, *, urgent: bool = False) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="stream-writer")
        future: asyncio.Future[int] = loop.create_future()
        key = (batch.signal_id, batch.model_version, batch.symbol, batch.interval, batch.model_name,
               batch.model_sha256, batch.source, batch.shadow, batch.raw_output.shape[1:])
        group = self._pending.get(key)
        if group is None:
            self._pending[key] = (SignalRows(batch), [(future, len(batch))])
        else:
            group[0].append(batch)
            group[1].append((future, len(batch)))
        self._wake.set()
        if urgent:
            self._urgent = True
            self._kick.set()
        return future

    async def _linger(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until ``linger_s`` after the last cycle began, or an urgent batch."""
        until = self._last + self.linger_s
        while not self._urgent:
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), remaining)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.linger_s > 0.0:
                await self._linger(loop)
            self._urgent = False
            self._last = loop.time()
            items = list(self._pending.values())
            self._pending = {}
            try:
                merged = []
                for rows, _ in items:  # one key's rows per step, messages served between
                    merged.append(rows.take())
                    await give_way()
                results = await self.runner.call(functools.partial(_write_all, self.store, merged))
            except BaseException as exc:  # the hop itself failed (cancelled at stop)
                for _, futures in items:
                    _fail(futures, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self.cycles += 1
            for (_, futures), result in zip(items, results, strict=True):
                if isinstance(result, BaseException):
                    _fail(futures, result)
                    continue
                self.calls += 1
                for future, count in futures:
                    if not future.done():
                        future.set_result(count)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _fail(futures: list[tuple[asyncio.Future[int], int]], exc: BaseException) -> None:
    for future, _ in futures:
        if not future.done():
            future.set_exception(exc)


async def _write_all(store: Store, batches: list[SignalBatch]) -> list[int | Exception]:
    """The cycle's batches in one store call (on the store's thread: one hop for a whole cycle;
    PostgreSQL: one transaction; DuckDB: one journal sync). When that call fails, each batch is
    tried alone, so that one bad batch fails only its own messages."""
    try:
        return list(await store.write_signal_batches(batches))
    except Exception:
        if len(batches) == 1:
            raise
    out: list[int | Exception] = []
    for batch in batches:
        try:
            out.append(await store.write_signals(batch))
        except Exception as exc:
            out.append(exc)
    return out


# --- routes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """One active signal definition, resolved (with the live config's overrides) and loaded."""

    signal_id: str
    prepared: Prepared
    symbols: frozenset[str]  # empty: every symbol
    feature_key: str | None
    features_used: list[str]
    model_type: str
    source_definition: SignalDefinition  # as stored, before overrides
    # the signal's traffic policy when it rolls out versions (prepared.rollout is then set)
    traffic: TrafficPolicy | None = None

    @property
    def interval(self) -> str:
        return self.prepared.definition.interval

    def describe(self, version: int) -> tuple[list[str], str]:
        """(features_used, model_type) of the version that computed a batch."""
        rollout = self.prepared.rollout
        if rollout is not None and version != self.prepared.card.version:
            for routed in (rollout.champion, rollout.challenger):
                if routed is not None and routed.card.version == version:
                    return list(routed.card.feature_names), routed.card.flavor
        return self.features_used, self.model_type

    def covers(self, symbol: str) -> bool:
        return not self.symbols or symbol in self.symbols


def apply_config(definition: SignalDefinition, config: StreamConfig) -> SignalDefinition:
    """The definition with the live config's model and signal-generation overrides."""
    model = config.model
    name = model.name or definition.model_name
    ref = model.ref or (definition.model_ref if name == definition.model_name else "@production")
    overrides: dict[str, Any] = config.signal_generation.overrides()
    policy = replace(definition.policy, **overrides) if overrides else definition.policy
    if name == definition.model_name and ref == definition.model_ref and policy is definition.policy:
        return definition
    return replace(definition, model_name=name, model_ref=ref, policy=policy)


@dataclass
class _Flight:
    """One batch between its publish and its acks."""

    messages: list[BusMessage] = field(default_factory=list)
    writes: list[asyncio.Future[int]] = field(default_factory=list)
    publishes: list[Awaitable[Any]] = field(default_factory=list)
    after_write: list[Callable[[], Awaitable[list[Awaitable[Any]]]]] = field(default_factory=list)
    keys: list[tuple[str, int, str]] = field(default_factory=list)


class StreamWorker:
    """One live worker. ``services`` is :class:`sigserve.app.Services` (store, registry, engine)."""

    def __init__(self, services: Any, bus: Bus, options: StreamOptions | None = None,
                 live_config: LiveConfig | None = None) -> None:
        self.services = services
        self.store: Store = services.store
        self.engine: Engine = services.engine
        self.bus = bus
        self.options = options or StreamOptions()
        self.names = self.options.names
        self.config = live_config or LiveConfig(self.options.config_file, bus,
                                                bucket=self.names.config_bucket)
        self.runner = StoreRunner(self.store)
        self.routes: dict[str, Route] = {}
        self._by_interval: dict[str, list[Route]] = {}
        self._inbox: collections.deque[BusMessage] = collections.deque()
        self._wake = asyncio.Event()
        # Unbounded: the consumer's max_ack_pending bounds what is unacked, so a slow store holds
        # back acks (and then deliveries), never the publish of the signals already computed.
        self._inflight: asyncio.Queue[_Flight | None] = asyncio.Queue()
        linger = self.options.write_linger_ms
        if linger is None:
            from .stream_storeproc import StoreProcess

            embedded = self.runner.offload or isinstance(self.store, StoreProcess)
            linger = DUCKDB_WRITE_LINGER_MS if embedded else SERVER_WRITE_LINGER_MS
        self.writer = SignalWriter(self.runner, self.store, linger_s=linger / 1000.0)
        self._shadow_writes: set[asyncio.Future[int]] = set()
        self._sides: dict[tuple[str, int, str], tuple[np.datetime64, int]] = {}
        self._last_ts: dict[tuple[str, str], np.datetime64] = {}
        self._live_at: dict[tuple[str, str], float] = {}
        self._lock = asyncio.Lock()  # batches and catch-ups take turns on positions and writes
        self._paused = False
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._subs: list[Subscription] = []
        self._rebuild_task: asyncio.Task[None] | None = None
        # the store's catalog version the routes were last loaded at (None: reload at the next
        # tick): a periodic reload with no catalog change resolves nothing
        self._catalog_version: int | None = None
        self._catchup_pending = False
        # a core subscription (``input="core"``, or a bus without JetStream): at most once, no
        # settle; ``_held`` counts the messages received and not yet finished (bounded by
        # max_ack_pending there, as the durable consumer bounds its unacked ones)
        self.core = not (bus.durable and self.options.input == "durable")
        self._held = 0
        self._drop_logged = -math.inf
        self.kafka: Any = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.started = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Config, routes, then streams, catch-up and consume. Refuses (raises) before creating
        anything on the bus when there is nothing to serve."""
        self.runner.start()
        options, names, bus = self.options, self.names, self.bus
        await self.config.load()
        await self._load_routes(initial=True)
        if bus.durable:
            await bus.ensure_stream(names.stream(names.features_stream), [names.features],
                                    max_age_s=options.features_max_age_s,
                                    duplicate_window_s=options.duplicate_window_s)
            await bus.ensure_stream(names.stream(names.signals_stream), [names.signals_all],
                                    duplicate_window_s=options.duplicate_window_s)
        else:
            log.warning("the bus has no JetStream: at-most-once input, no audit stream")
        if bus.durable and self.core:
            log.warning("core input: features come from a core-NATS subscription, at most once: a message"
                        " lost while the worker is down, disconnected or paused is not redelivered (catch-up"
                        " and the fallback compute its bar from the store's features); signals still go to"
                        " the audit stream %s", names.stream(names.signals_stream))
        await self.config.start()
        self.config.subscribe(self._on_config)
        if options.kafka_bootstrap:
            from .stream_kafka import KafkaSink

            self.kafka = KafkaSink(options.kafka_bootstrap, options.kafka_topic)
            await self.kafka.start()
        if options.catchup:
            await self.catch_up()
        await self.warm_up()
        # What start allocated (routes, config, caches, the warm-up's objects) lives as long as
        # the worker: out of the collector's passes, as the HTTP server does after its start
        # (the CLI froze only what was imported before the worker started).
        gc.collect()
        gc.freeze()
        bus.on_reconnect(self._on_reconnect)
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._process_loop(), name="stream-process"),
                        loop.create_task(self._ack_loop(), name="stream-acks"),
                        loop.create_task(self._housekeeping(), name="stream-housekeeping")]
        subject = options.feature_subject
        if not self.core:
            durable = options.queue_group or options.durable
            self._subs.append(await bus.consume(
                names.stream(names.features_stream), durable, subject, self._on_message,
                queue=options.queue_group, ack_wait_s=options.ack_wait_s,
                max_ack_pending=options.max_ack_pending))
        else:
            self._subs.append(await bus.subscribe(subject, self._on_message, queue=options.queue_group))
        await bus.flush()
        self.started.set()
        log.info("streaming %s -> %s for %s", subject, names.signals_all, sorted(self.routes))

    async def warm_up(self) -> None:
        """Pay the first-call costs before the first message, not on it: the store's write path
        (DuckDB: its first Arrow scan imports and builds for about 0.3 s) and each served version's
        predict and policy, one bar and a micro-batch (a first LightGBM call allocates its
        predictor). Nothing is written or published; without it the first live messages waited
        0.3-0.8 s, which set the p99 of a whole benchmark run."""
        began = time.perf_counter()
        if self.runner.offload:  # an in-process DuckDB store: its bulk write path
            await self.runner.call(self.store.warm_up)  # type: ignore[attr-defined]
        else:
            from .stores.postgres_store import PostgresStore

            if isinstance(self.store, PostgresStore):  # a write cycle and a read side by side
                await self.store.warm_up(connections=2)
        await self._read_positions()
        for route in self.routes.values():
            for prepared in _versions(route.prepared):
                names = prepared.read_names
                for n in (1, 2):
                    ts = np.datetime64("2000-01-01T00:00:00", "us") + np.arange(n) * np.timedelta64(1, "s")
                    rows = FeatureBatch("WARMUP", route.interval, ts.astype(TS_DTYPE),
                                        np.zeros((n, len(names))), names, np.full(n, "warm-up", dtype=object),
                                        np.full(n, 100.0))
                    try:
                        signals, _ = self.engine.compute(prepared, rows, FLAT, Source.STREAM, latency_ms=0.0)
                        signal_messages(signals, definition_id=route.signal_id, model_type=route.model_type,
                                        features_used=route.features_used)
                    except Exception as exc:  # a warm-up never refuses the start: the live path will say
                        log.debug("warm-up of %s: %s", prepared.card.ref, exc)
        log.info("warmed up in %.0f ms", (time.perf_counter() - began) * 1000.0)

    async def _read_positions(self) -> None:
        """Each served history's position now, not on its first bar: the first read of a
        history plans its statement (PostgreSQL) or learns its summary (DuckDB), 3-10 ms while
        the messages behind it wait. Outside a queue group it is kept as the position after
        the newest stored bar, for bars after that one (as after a batch); inside one, every
        batch reads the store anyway. A history that catch-up computed is left as it set it."""
        group = self.options.queue_group is not None
        for route in self.routes.values():
            for prepared in _routed(route.prepared):
                for symbol in sorted(route.symbols or ()):
                    key = (route.signal_id, prepared.card.version, symbol)
                    if key in self._sides:
                        continue
                    try:
                        sides = await self.runner.call(functools.partial(
                            self.store.position_sides, route.signal_id, prepared.card.version, symbol,
                            route.interval, np.array([_TS_MAX], dtype=TS_DTYPE)))
                        newest = await self.runner.call(functools.partial(
                            self.store.last_signal_ts, route.signal_id, symbol, route.interval))
                    except SigserveError as exc:  # the live path will read it, and say
                        log.debug("position of %s %s not read ahead: %s", route.signal_id, symbol, exc)
                        continue
                    if not group:
                        self._sides[key] = (_TS_MIN if newest is None else newest, int(sides[0]))

    async def stop(self) -> None:
        """Stop taking messages, finish the batches in flight (acks), and release everything."""
        self._stopping = True
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.stop()
        self._wake.set()
        # let the processing loop hand over what it holds, then close the acks
        for task in self._tasks[:1]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 30)
        await self._inflight.put(None)
        for task in self._tasks[1:2]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 30)
        for task in [*self._tasks, *([self._rebuild_task] if self._rebuild_task else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._inbox:
            self._finished(len(self._inbox))
            self._dropped(len(self._inbox), "the worker stopped")
        for msg in self._inbox:
            with contextlib.suppress(Exception):
                await msg.nak()
        self._inbox.clear()
        await self.config.stop()
        if self.kafka is not None:
            await self.kafka.stop()
        if self._shadow_writes:  # shadow rows queued behind the acked ones: 2 s at most
            await asyncio.wait(list(self._shadow_writes), timeout=2.0)
        await self.writer.stop()
        self.runner.stop()

    async def run_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # --- routes -----------------------------------------------------------------------------------
    async def _definitions(self) -> list[SignalDefinition]:
        store = self.store
        if self.options.signals:
            found = []
            for signal_id in self.options.signals:
                definition = await self.runner.call(functools.partial(store.get_signal, signal_id))
                if definition is None:
                    from .errors import SignalNotFound

                    raise SignalNotFound(f"no signal {signal_id!r}", details={"signal_id": signal_id})
                found.append(definition)
            return found
        return [d for d in await self.runner.call(store.list_signals) if d.active]

    async def _traffic(self, definition: SignalDefinition, effective: SignalDefinition) -> TrafficPolicy | None:
        """The signal's traffic policy, or None. A live config that pins another model (name or
        ref) overrides the rollout: the pinned model serves every bar."""
        policy = await self.runner.call(functools.partial(self.store.get_traffic_policy, definition.signal_id))
        if policy is not None and (effective.model_name, effective.model_ref) != (
                definition.model_name, definition.model_ref):
            log.warning("signal %s: the live config pins model %s %s over its rollout", definition.signal_id,
                        effective.model_name, effective.model_ref)
            return None
        return policy

    async def _route(self, definition: SignalDefinition, config: StreamConfig,
                     traffic: Any = _MISSING) -> Route:
        effective = apply_config(definition, config)
        policy = await self._traffic(definition, effective) if traffic is _MISSING else traffic
        assert policy is None or isinstance(policy, TrafficPolicy)
        engine = self.engine
        if policy is None:
            prepared = await self.runner.call(lambda: engine.prepare_definition(effective))
        elif policy.challenger is None and not policy.shadows:  # as Engine.prepare: the champion only
            pinned = replace(effective, model_ref=str(policy.champion))
            prepared = await self.runner.call(lambda: engine.prepare_definition(pinned))
        else:
            from .routing.rollout import prepare_rollout

            prepared = await self.runner.call(lambda: prepare_rollout(engine, effective, policy, strict=False))
        card = prepared.card
        return Route(definition.signal_id, prepared, frozenset(definition.symbols), definition.feature_key,
                     list(card.feature_names), card.flavor, definition, policy)

    async def _load_routes(self, *, initial: bool = False) -> None:
        """Resolve every definition in scope (in the background after the start): a new model is
        loaded and sha-verified off the hot path, then the routes are swapped in one assignment."""
        config = self.config.current
        routes: dict[str, Route] = {}
        version: int | None = await self.runner.call(self.store.catalog_version)
        for definition in await self._definitions():
            if not definition.active:
                if initial and self.options.signals:
                    from .errors import SignalRetired

                    raise SignalRetired(f"signal {definition.signal_id!r} is retired",
                                        details={"signal_id": definition.signal_id})
                continue
            current = self.routes.get(definition.signal_id)
            effective = apply_config(definition, config)
            traffic = await self._traffic(definition, effective)
            if current is not None and not initial and (traffic is not None or current.traffic is not None):
                # a rollout's versions are pinned numbers: the same policy keeps the loaded route
                if (traffic == current.traffic and traffic is not None
                        and replace(effective, model_ref=str(traffic.champion)) == current.prepared.definition):
                    routes[definition.signal_id] = current
                    continue
            elif current is not None and not initial:
                card = await self.runner.call(functools.partial(
                    self.services.registry.resolve, effective.model_name, effective.model_ref))
                if (card.sha256 == current.prepared.card.sha256 and card.version == current.prepared.card.version
                        and card.stage == current.prepared.card.stage
                        and effective == current.prepared.definition):
                    routes[definition.signal_id] = current
                    continue
            try:
                routes[definition.signal_id] = await self._route(definition, config, traffic)
            except SigserveError as exc:
                if initial:
                    raise
                self.stats["reload_failed"] += 1
                version = None  # try again at the next tick
                log.error("signal %s keeps its current model: %s", definition.signal_id, exc)
                if current is not None:
                    routes[definition.signal_id] = current
        if initial and not routes:
            raise ValidationError("no active signal definition to stream: create one (sigserve signals"
                                  " create) or pass --signals", details={"signals": list(self.options.signals)})
        self._swap(routes)
        self._catalog_version = version

    def _swap(self, routes: dict[str, Route]) -> None:
        before = {k: (r.prepared.card.ref, r.prepared.card.sha256) for k, r in self.routes.items()}
        by_interval: dict[str, list[Route]] = {}
        for route in routes.values():
            by_interval.setdefault(route.interval, []).append(route)
        self.routes, self._by_interval = routes, by_interval  # the hot path reads these once a batch
        after = {k: (r.prepared.card.ref, r.prepared.card.sha256) for k, r in routes.items()}
        if before and before != after:
            self.stats["model_swaps"] += sum(1 for k in after if before.get(k) != after[k])
            log.info("routes swapped: %s", {k: v[0] for k, v in after.items()})

    def _on_config(self, old: StreamConfig, new: StreamConfig) -> None:
        if (old.model, old.signal_generation) != (new.model, new.signal_generation):
            self._schedule_rebuild()

    def _schedule_rebuild(self) -> None:
        if self._rebuild_task is not None and not self._rebuild_task.done():
            self._rebuild_task.add_done_callback(lambda _: self._schedule_rebuild())
            return
        self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild(), name="stream-rebuild")

    async def _rebuild(self) -> None:
        try:
            await self._load_routes()
        except SigserveError as exc:
            self.stats["reload_failed"] += 1
            log.error("route reload failed, current routes stay: %s", exc)

    def _on_reconnect(self) -> None:
        self.stats["reconnects"] += 1
        if self.options.catchup:
            self._catchup_pending = True
        task = asyncio.get_running_loop().create_task(self.config.rewatch(), name="config-rewatch")
        self._tasks.append(task)

    # --- receiving --------------------------------------------------------------------------------
    async def _on_message(self, msg: BusMessage) -> None:
        if self._paused or self._stopping:
            if self.core:
                self._dropped(1, "the store is unavailable" if self._paused else "the worker is stopping")
            await msg.nak(delay=2.0)
            return
        if self.core and self._held >= self.options.max_ack_pending:
            self._dropped(1, f"{self._held} messages are unfinished (max_ack_pending)")
            return
        self._held += 1
        self._inbox.append(msg)
        self._wake.set()

    def _dropped(self, n: int, why: str) -> None:
        """Core input: ``n`` messages that will not come again (a warning at most every 10 s)."""
        if not self.core:
            return
        self.stats["dropped"] += n
        now = time.monotonic()
        if now - self._drop_logged >= DROP_LOG_INTERVAL_S:
            self._drop_logged = now
            log.warning("core input: %d message(s) dropped, not redelivered (%s); %d dropped so far;"
                        " catch-up computes stored bars", n, why, self.stats["dropped"])

    def _finished(self, n: int) -> None:
        self._held = max(0, self._held - n)

    async def _process_loop(self) -> None:
        inbox = self._inbox
        while True:
            if self._paused and not self._stopping:
                await self._wait_for_store()
                continue
            if not inbox:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            n = min(len(inbox), self.options.max_batch)
            batch = [inbox.popleft() for _ in range(n)]
            try:
                async with self._lock:
                    await self._process(batch)
            except Exception as exc:  # never die on one batch: hand it back to the bus
                self.stats["batch_errors"] += 1
                log.exception("batch of %d failed; %s", len(batch),
                              "dropped (core input)" if self.core else "naked for redelivery")
                if isinstance(exc, StoreUnavailable):
                    self._pause()
                self._finished(len(batch))
                self._dropped(len(batch), "its batch failed")
                for msg in batch:
                    await msg.nak(delay=1.0)
            # let the bus client write this batch's publishes to the socket before the next batch
            # is computed (its flusher runs when this task yields)
            await asyncio.sleep(0)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._sides.clear()
            self.stats["store_outages"] += 1
            self._wake.set()  # the processing loop pings the store until it answers
            log.error("the store is unavailable: %s until it answers", "core input: messages are dropped"
                      if self.core else "not acking; messages are naked")

    async def _wait_for_store(self) -> None:
        if self._inbox:
            self._finished(len(self._inbox))
            self._dropped(len(self._inbox), "the store is unavailable")
        while self._inbox:
            await self._inbox.popleft().nak(delay=2.0)
        delay = 0.1
        while self._paused and not self._stopping:
            try:
                await self.runner.call(self.store.ping)
            except SigserveError:
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            self._paused = False
            log.warning("the store answers again: draining the backlog")
            if self.options.catchup:
                self._catchup_pending = True

    # --- one batch ----------------------------------------------------------------------------------
    async def _process(self, batch: list[BusMessage]) -> None:
        config = self.config.current
        by_interval = self._by_interval
        flight = _Flight()
        dead: list[tuple[BusMessage, SigserveError, str | None]] = []
        groups: dict[tuple[str, str], list[tuple[BusMessage, FeatureMessage]]] = {}
        deadletter = self.names.deadletter
        self.stats["received"] += len(batch)
        now = time.monotonic()
        for msg in batch:
            if msg.subject == deadletter:
                flight.messages.append(msg)
                continue
            try:
                fm = parse_feature_message(msg.data, msg.subject)
            except SigserveError as exc:
                dead.append((msg, exc, None))
                continue
            matched = False
            for route in by_interval.get(fm.interval, ()):
                if not route.covers(fm.symbol):
                    continue
                if route.feature_key and fm.feature_key and fm.feature_key != route.feature_key:
                    continue
                groups.setdefault((route.signal_id, fm.symbol), []).append((msg, fm))
                self._live_at[(route.signal_id, fm.symbol)] = now
                matched = True
            if matched:
                flight.messages.append(msg)
            else:
                dead.append((msg, ValidationError(
                    f"no active signal covers {fm.symbol} {fm.interval}",
                    details={"symbol": fm.symbol, "interval": fm.interval, "reason": "unknown_symbol"}), None))
        for (signal_id, symbol), items in groups.items():
            served = self.routes.get(signal_id)
            if served is None:  # swapped out between routing and now
                dead.extend((m, ValidationError(f"signal {signal_id} is no longer served"), signal_id)
                            for m, _ in items)
                continue
            await self._group(served, symbol, items, config, flight, dead)
        for msg, err, sid in dead:
            if msg not in flight.messages:
                flight.messages.append(msg)
            flight.publishes.append(await self._dead_letter(msg, err, sid))
        self.stats["batches"] += 1
        if flight.messages:
            await self._inflight.put(flight)

    async def _group(self, route: Route, symbol: str, items: list[tuple[BusMessage, FeatureMessage]],
                     config: StreamConfig, flight: _Flight,
                     dead: list[tuple[BusMessage, SigserveError, str | None]]) -> None:
        items.sort(key=lambda item: item[1].ts)
        # one row per bar: a later message for the same bar replaces an earlier one
        unique: list[tuple[BusMessage, FeatureMessage]] = []
        for item in items:
            if unique and unique[-1][1].ts == item[1].ts:
                unique[-1] = item
            else:
                unique.append(item)
        rollout = route.prepared.rollout
        if rollout is None:  # no traffic policy: one version, nothing extra
            part = await self._compute(route, route.prepared, symbol, unique, config, dead)
            if part is None:
                return
            parts = [part]
        else:
            # each bar goes to the version its (symbol, trading date) routes to, as on HTTP and backfill
            parts = []
            for routed, rows in rollout.split(symbol, np.array([fm.ts for _, fm in unique], dtype=TS_DTYPE)):
                mine = unique if rows.all() else [u for u, m in zip(unique, rows.tolist(), strict=True) if m]
                computed = await self._compute(route, routed, symbol, mine, config, dead)
                if computed is not None:
                    parts.append(computed)
            if not parts:
                return
        batches = [signals for _, signals, _, _ in parts]
        redelivered = any(msg.num_delivered > 1 for _, _, _, kept in parts for msg, _ in kept)
        self.stats["signals"] += sum(len(b) for b in batches)
        flight.keys.extend((route.signal_id, b.model_version, symbol) for b in batches)
        if self.options.write_first or redelivered:
            # a redelivered bar may have been published already: publish only once it is stored
            flight.writes.extend(self.writer.submit(b, urgent=True) for b in batches)

            async def publish_later() -> list[Awaitable[Any]]:
                return await self._publish(route, batches, config)

            flight.after_write.append(publish_later)
        else:
            flight.publishes.extend(await self._publish(route, batches, config))
            flight.writes.extend(self.writer.submit(b) for b in batches)
        for routed, signals, features, kept in parts:
            if routed.shadows:
                self._shadows(routed, features, signals, [fm for _, fm in kept], config)

    async def _compute(self, route: Route, prepared: Prepared, symbol: str,
                       unique: list[tuple[BusMessage, FeatureMessage]], config: StreamConfig,
                       dead: list[tuple[BusMessage, SigserveError, str | None]],
                       ) -> tuple[Prepared, SignalBatch, FeatureBatch, list[tuple[BusMessage, FeatureMessage]]] | None:
        """One version's signals for its bars of a micro-batch (deadline applied): the version,
        the signals, the feature rows and the messages they came from; None when none is left."""
        names = prepared.read_names
        interval = route.interval
        values = np.empty((len(unique), len(names)), dtype=np.float64)
        keep: list[int] = []
        spec_key = prepared.spec_key
        for i, (msg, fm) in enumerate(unique):
            try:
                if spec_key is not None and fm.feature_key is not None and fm.feature_key != spec_key:
                    check_feature_keys(prepared, np.array([fm.feature_key], dtype=object))
                fill_feature_row(names, fm.features if fm.candles is None else candle_features(prepared, fm),
                                 values[i], prepared.card.ref)
            except SigserveError as exc:
                dead.append((msg, exc, route.signal_id))
                continue
            keep.append(i)
        if not keep:
            return None
        if len(keep) != len(unique):
            unique = [unique[i] for i in keep]
            values = values[keep]
        ts = np.array([fm.ts for _, fm in unique], dtype=TS_DTYPE)
        closes = [math.nan if fm.close is None else fm.close for _, fm in unique]
        close = np.array(closes)
        default_key = route.feature_key or spec_key or "stream"
        keys = np.array([fm.feature_key or default_key for _, fm in unique], dtype=object)
        if any(c != c for c in closes):  # a NaN: a message without its close (no numpy call per batch)
            await self._fill_close(symbol, interval, ts, close)
        card = prepared.card
        side_key = (route.signal_id, card.version, symbol)
        cached = self._sides.get(side_key)
        if cached is not None and ts[0] > cached[0] and self.options.queue_group is None:
            start_side = cached[1]
        else:
            self.stats["position_reads"] += 1
            sides = await self.runner.call(lambda: self.store.position_sides(
                route.signal_id, card.version, symbol, interval, ts[:1]))
            start_side = int(sides[0])
        features = FeatureBatch(symbol, interval, ts, values, names, keys, close)
        settings = config.inference_settings
        signals, end_side = self.engine.compute(prepared, features, start_side, Source.STREAM,
                                                latency_ms=0.0,
                                                min_confidence=settings.confidence_threshold)
        self._sides[side_key] = (ts[-1], end_side)
        last_key = (route.signal_id, symbol)
        previous = self._last_ts.get(last_key)
        if previous is None or ts[-1] > previous:
            self._last_ts[last_key] = ts[-1]
        # latency: receipt -> now (the publish follows at once); the deadline applies here
        received = np.array([msg.received for msg, _ in unique])
        latency = (time.perf_counter() - received) * 1000.0
        if settings.max_latency_ms is not None:
            late = latency > settings.max_latency_ms
            if late.any():
                self.stats["late"] += int(late.sum())
                self._sides.pop(side_key, None)
                if settings.fallback_to_hold:
                    holds = self.engine.hold_batch(prepared, symbol, interval, ts[late], Source.STREAM,
                                                   DEADLINE_FLAG, keys[late])
                    for name in ("action", "confidence", "raw_output", "entry_price", "stop_loss",
                                 "take_profit", "recommended_size", "flags"):
                        getattr(signals, name)[late] = getattr(holds, name)
                else:
                    for j in np.flatnonzero(late).tolist():
                        dead.append((unique[j][0], DeadlineExceeded(
                            f"the signal was ready {latency[j]:.2f} ms after receipt, over max_latency_ms"
                            f" {settings.max_latency_ms}", details={"latency_ms": float(latency[j])}),
                            route.signal_id))
                    on_time = np.flatnonzero(~late)
                    if on_time.size == 0:
                        return None
                    signals = signals.take(on_time)
                    features = features.take(on_time)
                    unique = [unique[i] for i in on_time]
                    latency = latency[on_time]
        signals.latency_ms[:] = latency
        return prepared, signals, features, unique

    def _shadows(self, routed: Prepared, features: FeatureBatch, served: SignalBatch,
                 messages: list[FeatureMessage], config: StreamConfig) -> None:
        """The routed version's shadows on the same bars (as backfill: each from flat, stored
        with ``shadow = true``, never published, never a position). After the served signals are
        published; their writes go through the writer but never hold back an ack."""
        from .routing.rollout import align

        threshold = config.inference_settings.confidence_threshold
        for other in routed.shadows:
            rows = align(features, other)
            if rows is None:  # a version reading other features: take them from the messages
                values = np.empty((len(messages), len(other.read_names)), dtype=np.float64)
                ok = []
                for i, fm in enumerate(messages):
                    try:
                        fill_feature_row(other.read_names,
                                         fm.features if fm.candles is None else candle_features(other, fm),
                                         values[i], other.card.ref)
                    except SigserveError:
                        continue
                    ok.append(i)
                if not ok:
                    self.stats["shadow_skipped"] += len(messages)
                    continue
                self.stats["shadow_skipped"] += len(messages) - len(ok)
                rows = FeatureBatch(features.symbol, features.interval, features.ts[ok], values[ok],
                                    other.read_names, features.feature_keys[ok], features.close[ok])
            try:
                shadow, _ = self.engine.compute(other, rows, FLAT, Source.STREAM, min_confidence=threshold)
            except Exception:  # a shadow never fails the served signals
                self.stats["shadow_failed"] += len(rows)
                log.exception("shadow version %s failed", other.card.version)
                continue
            shadow.shadow = True
            self.stats["shadow_signals"] += len(shadow)
            future = self.writer.submit(shadow)
            self._shadow_writes.add(future)
            future.add_done_callback(self._shadow_written)

    def _shadow_written(self, future: asyncio.Future[int]) -> None:
        self._shadow_writes.discard(future)
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self.stats["shadow_write_failed"] += 1
            log.warning("shadow rows not stored: %s", error)


    async def _fill_close(self, symbol: str, interval: str, ts: np.ndarray, close: np.ndarray) -> None:
        """Bars whose message carried no close take it from the stored candle, as predict_bar does."""
        candles = await self.runner.call(lambda: self.store.read_candles(symbol, interval, ts.min(), ts.max()))
        if len(candles.ts) == 0:
            return
        idx = np.searchsorted(candles.ts, ts)
        idx_clipped = np.minimum(idx, len(candles.ts) - 1)
        found = (candles.ts[idx_clipped] == ts) & np.isnan(close)
        close[found] = candles.close[idx_clipped[found]]

    async def _publish(self, route: Route, batches: SignalBatch | list[SignalBatch],
                       config: StreamConfig) -> list[Awaitable[Any]]:
        """Publish every valid signal of the batches (one symbol; a rollout's versions merged
        in ts order); futures of the audit stream's acks."""
        if isinstance(batches, SignalBatch):
            batches = [batches]
        bus, durable = self.bus, self.bus.durable
        publish_holds = config.inference_settings.publish_holds
        log_signals = config.monitoring.log_signals
        subject = self.names.signals(batches[0].symbol, batches[0].interval)
        futures: list[Awaitable[Any]] = []
        kafka = self.kafka
        messages: list[tuple[str, dict[str, Any]]] = []
        flags: list[str] = []
        for signals in batches:
            features_used, model_type = route.describe(signals.model_version)
            messages += signal_messages(signals, definition_id=route.signal_id, model_type=model_type,
                                        features_used=features_used)
            flags += signals.flags.tolist()
        if len(batches) > 1:
            order = sorted(range(len(messages)), key=lambda i: messages[i][1]["timestamp_ms"])
            messages, flags = [messages[i] for i in order], [flags[i] for i in order]
        for i, (key, message) in enumerate(messages):
            problem = validate_signal(message, flags[i])
            if problem is not None:
                self.stats["rejected"] += 1
                log.warning("signal rejected, not published: %s: %s", problem, message["signal_id"])
                rejection = ValidationError(f"invalid signal: {problem}",
                                            details={"signal": message, "flags": str(flags[i])})
                await self._safe_publish(self.names.rejected, orjson.dumps(rejection.to_envelope()),
                                         {ERROR_HEADER: rejection.code})
                continue
            if not publish_holds and message["signal_type"] == "hold":
                self.stats["holds_suppressed"] += 1
                continue
            data = orjson.dumps(message)
            if durable:
                futures.append(await bus.publish_durable(subject, data, msg_id=key))
            else:
                await bus.publish(subject, data)
            self.stats["published"] += 1
            if kafka is not None:
                kafka.offer(message["signal_id"].encode(), data)
            if log_signals:
                log.info("signal %s", data.decode())
        return futures

    async def _safe_publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        try:
            await self.bus.publish(subject, data, headers)
        except SigserveError as exc:
            log.error("could not publish to %s: %s", subject, exc)

    async def _dead_letter(self, msg: BusMessage, exc: SigserveError, signal_id: str | None) -> Awaitable[Any]:
        self.stats["deadlettered"] += 1
        details = dict(exc.details)
        if signal_id is not None:
            details["signal_id"] = signal_id
        body = {"error_code": exc.code, "message": exc.message, "details": details,
                "subject": msg.subject, "data": msg.data.decode("utf-8", "replace"),
                "num_delivered": msg.num_delivered}
        data = orjson.dumps(body, default=str)
        headers = {ERROR_HEADER: exc.code}
        log.warning("dead letter (%s): %s", exc.code, exc.message)
        if self.bus.durable:
            return await self.bus.publish_durable(self.names.deadletter, data, headers=headers)
        await self.bus.publish(self.names.deadletter, data, headers)
        return _done()

    # --- acks ---------------------------------------------------------------------------------------
    async def _ack_loop(self) -> None:
        settled = 0
        while True:
            if settled >= ACK_YIELD_EVERY:
                # A write cycle's end readies every flight it held at once (50-100 at 1,000
                # msg/s), and a queue that has items never suspends: without this the whole
                # burst of acks (each a publish on a durable consumer) ran as one stall while
                # new features waited to be read.
                settled = 0
                await give_way()
            flight = await self._inflight.get()
            if flight is None:
                return
            settled += len(flight.messages)
            ok = True
            error: BaseException | None = None
            for write in flight.writes:
                try:
                    self.stats["rows_written"] += await write
                except BaseException as exc:
                    ok, error = False, exc
            if ok:
                for publish_later in flight.after_write:
                    try:
                        flight.publishes.extend(await publish_later())
                    except BaseException as exc:
                        ok, error = False, exc
            if flight.publishes:
                futures = [asyncio.ensure_future(p) for p in flight.publishes]
                if not all(f.done() for f in futures):
                    # usually done already: the audit stream's ack comes in ~1 ms, the write
                    # cycle every 50-100 ms, and a gather per flight cost its own loop turns
                    await asyncio.wait(futures)
                for future in futures:
                    failed = asyncio.CancelledError() if future.cancelled() else future.exception()
                    if failed is not None:
                        ok, error = False, failed
                        self.stats["publish_unconfirmed"] += 1
            self._finished(len(flight.messages))
            if ok:
                for msg in flight.messages:
                    await msg.ack()
                self.stats["acked"] += len(flight.messages)
                continue
            self.stats["naked"] += len(flight.messages)
            for key in flight.keys:
                self._sides.pop(key, None)
            after = "dropped (core input: not redelivered)" if self.core else "naked for redelivery"
            if isinstance(error, StoreUnavailable):
                self._pause()
            elif isinstance(error, BusUnavailable):
                log.warning("bus failure, batch %s: %s", after, error)
            else:
                log.error("batch failed, %s: %r", after, error)
            self._dropped(len(flight.messages), "its write or audit publish failed")
            for msg in flight.messages:
                await msg.nak(delay=1.0)

    # --- catch-up and fallback ----------------------------------------------------------------------
    def _symbols(self, route: Route) -> Iterable[str]:
        if route.symbols:
            return sorted(route.symbols)
        return sorted({sym for (sid, sym) in self._last_ts if sid == route.signal_id})

    async def catch_up(self, only: set[tuple[str, str]] | None = None, *, fallback: bool = False) -> int:
        """Compute bars stored since the last stored signal (``source=catchup_scan``), publish
        them, and return how many rows were written."""
        total = 0
        for route in list(self.routes.values()):
            for symbol in self._symbols(route):
                if only is not None and (route.signal_id, symbol) not in only:
                    continue
                try:
                    async with self._lock:
                        total += await self._catch_up_one(route, symbol)
                except SigserveError as exc:
                    self.stats["catchup_failed"] += 1
                    log.warning("catch-up of %s %s failed: %s", route.signal_id, symbol, exc)
                    if isinstance(exc, StoreUnavailable):
                        self._pause()
                        return total
        if total:
            self.stats["fallback_rows" if fallback else "catchup_rows"] += total
            log.info("%s: %d bars computed from the store", "fallback" if fallback else "catch-up", total)
        return total

    async def _catch_up_one(self, route: Route, symbol: str) -> int:
        store, engine, interval = self.store, self.engine, route.interval
        step = np.timedelta64(interval_us(interval), "us")
        last = await self.runner.call(lambda: store.last_signal_ts(route.signal_id, symbol, interval))
        if last is None:
            return 0  # no history to continue: a backfill's job
        start = last + step
        count, _, newest = await self.runner.call(
            lambda: store.feature_window_stats(symbol, interval, start, None))
        if not count or newest is None:
            return 0
        if count > self.options.catchup_max_bars:
            log.warning("catch-up of %s %s: %d bars missed, computing the newest %d", route.signal_id,
                        symbol, count, self.options.catchup_max_bars)
            start = max(start, newest - (self.options.catchup_max_bars - 1) * step)
        result = await self.runner.call(lambda: engine.run_window(
            route.signal_id, symbol, interval, start, None, source=Source.CATCHUP_SCAN,
            prepared=route.prepared))
        batch = result.batch
        if len(batch) == 0:
            return 0
        if route.prepared.rollout is None:
            self._sides[(route.signal_id, route.prepared.card.version, symbol)] = (batch.ts[-1], result.end_side)
        else:  # each routed version's position: read again from the store by the next live bar
            for key in [k for k in self._sides if k[0] == route.signal_id and k[2] == symbol]:
                self._sides.pop(key, None)
        served = [b for b in (batch, *result.extra) if len(b)]
        self._last_ts[(route.signal_id, symbol)] = max(b.ts[-1] for b in served)
        futures = await self._publish(route, served, self.config.current)
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("catch-up: %d signals not confirmed by the audit stream: %s", len(failed), failed[0])
        return result.rows_written

    async def fallback(self) -> int:
        """Keys whose next bar is overdue by the grace period and that got no live message
        within it: take the store's newest feature rows (seed 001's rule)."""
        grace = self.config.current.inference_settings.grace_period_s
        if grace is None:
            return 0
        now_mono = time.monotonic()
        now_us = np.datetime64(int(time.time() * 1_000_000), "us")
        due: set[tuple[str, str]] = set()
        for route in self.routes.values():
            step = np.timedelta64(interval_us(route.interval), "us")
            for symbol in self._symbols(route):
                key = (route.signal_id, symbol)
                if now_mono - self._live_at.get(key, 0.0) < grace:
                    continue
                last = self._last_ts.get(key)
                # the bar after ``last`` closes at last + 2 steps; overdue past the grace period
                if last is None or last + 2 * step + np.timedelta64(int(grace * 1e6), "us") < now_us:
                    due.add(key)
        if not due:
            return 0
        return await self.catch_up(due, fallback=True)

    async def _housekeeping(self) -> None:
        """Catch-up after reconnects and outages, the fallback timer, model reloads, stats."""
        last_reload = last_stats = last_fallback = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            if self._stopping:
                return
            config = self.config.current
            now = time.monotonic()
            try:
                if self._catchup_pending and not self._paused:
                    self._catchup_pending = False
                    await self.catch_up()
                grace = config.inference_settings.grace_period_s
                if grace is not None and now - last_fallback >= max(0.25, grace / 4) and not self._paused:
                    last_fallback = now
                    await self.fallback()
                if config.model.auto_reload and now - last_reload >= config.model.reload_interval_s:
                    last_reload = now
                    if ((self._rebuild_task is None or self._rebuild_task.done())
                            and await self.runner.call(self.store.catalog_version) != self._catalog_version):
                        self._schedule_rebuild()
                if now - last_stats >= config.monitoring.stats_interval_s:
                    last_stats = now
                    log.info("stream stats: %s", dict(self.stats))
            except Exception:
                log.exception("housekeeping step failed")


def _routed(prepared: Prepared) -> list[Prepared]:
    """The versions a route serves bars with: its one, or a rollout's champion and challenger."""
    rollout = prepared.rollout
    return [prepared] if rollout is None else [p for p in (rollout.champion, rollout.challenger) if p is not None]


def _versions(prepared: Prepared) -> list[Prepared]:
    """A route's loaded versions: the served one, a rollout's routed ones and their shadows."""
    out: list[Prepared] = []
    for one in _routed(prepared):
        for version in (one, *one.shadows):
            if all(version is not seen for seen in out):
                out.append(version)
    return out


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


__all__ = [
    "FeatureMessage",
    "Names",
    "Route",
    "StoreRunner",
    "StreamOptions",
    "StreamWorker",
    "apply_config",
    "candle_features",
    "parse_candles",
    "parse_feature_message",
    "signal_message",
    "upsert_key",
    "validate_signal",
]
