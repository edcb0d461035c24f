"""The one pipeline. Every driver (CLI predict, backfill, and later HTTP and stream) calls it.

signal definition -> model version -> verified runtime -> feature rows at ts -> predict ->
policy (action, confidence, position-aware closes, levels, size) -> upsert.

One bar is a vector of length one: the code path is the same as for a backfill chunk, so the
same (signal, model sha, symbol, interval, ts, features) gives the same row on every driver.

Usage::

    engine = Engine(store, registry)
    row = await engine.predict_bar("trend-1h", "BTCUSDT", "1h", parse_ts("2024-03-01T10:00Z"))
    result = await engine.run_window("trend-1h", "BTCUSDT", "1h", start, end)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .domain import (
    FLAT,
    FeatureBatch,
    ModelCard,
    SignalBatch,
    SignalDefinition,
    Source,
)
from .errors import (
    FeatureNotRegistered,
    FeatureValueMissing,
    SignalNotFound,
    SignalRetired,
    ValidationError,
)
from .registry.models import ModelRegistry
from .runtimes.base import Runtime
from .signals.policy import PolicyPlan, resolve_positions
from .stores.base import Store
from .timeutil import TS_DTYPE, format_ts, validate_interval


@dataclass(frozen=True)
class Prepared:
    """A signal definition resolved to a verified, loaded model and a ready policy."""

    definition: SignalDefinition
    card: ModelCard
    runtime: Runtime
    plan: PolicyPlan
    read_names: tuple[str, ...]  # the model's features, then the ATR feature when it is extra

    @property
    def n_model_features(self) -> int:
        return len(self.card.feature_names)


@dataclass(frozen=True)
class RunResult:
    batch: SignalBatch
    rows_written: int
    rows_skipped_missing_features: int
    end_side: int


class Engine:
    def __init__(self, store: Store, registry: ModelRegistry, prepared_ttl_s: float = 0.0) -> None:
        self.store = store
        self.registry = registry
        # A long-running driver keeps each resolved signal this long (0: resolve every call), so
        # the hot path skips the definition, alias and feature-registry reads. A retire, promote
        # or deprecate made elsewhere takes effect within the TTL; forget() applies it at once.
        self.prepared_ttl_s = prepared_ttl_s
        self._prepared: dict[str, tuple[float, Prepared]] = {}

    def forget(self, signal_id: str | None = None) -> None:
        """Drop cached resolutions (all, or one signal's)."""
        if signal_id is None:
            self._prepared.clear()
        else:
            self._prepared.pop(signal_id, None)

    # --- resolution -----------------------------------------------------------------------
    async def prepare(self, signal_id: str) -> Prepared:
        """Resolve and check everything that can refuse before a feature is read."""
        if self.prepared_ttl_s > 0:
            cached = self._prepared.get(signal_id)
            now = time.monotonic()
            if cached is not None and now - cached[0] < self.prepared_ttl_s:
                return cached[1]
            prepared = await self._resolve(signal_id)
            self._prepared[signal_id] = (now, prepared)
            return prepared
        return await self._resolve(signal_id)

    async def _resolve(self, signal_id: str) -> Prepared:
        definition = await self.store.get_signal(signal_id)
        if definition is None:
            raise SignalNotFound(f"no signal {signal_id!r}", details={"signal_id": signal_id})
        if not definition.active:
            raise SignalRetired(f"signal {signal_id!r} is retired", details={"signal_id": signal_id})
        card = await self.registry.resolve(definition.model_name, definition.model_ref)
        runtime = await self.registry.runtime(card)  # lifecycle, artifact and sha checks
        statuses = await self.store.feature_statuses(list(card.feature_names))
        unregistered = {n: statuses.get(n, "unknown") for n in card.feature_names
                        if statuses.get(n) != "registered"}
        if unregistered:
            raise FeatureNotRegistered(
                f"model {card.ref} needs features that are not registered: {sorted(unregistered)}",
                details={"features": unregistered, "model": card.ref})
        read_names = tuple(card.feature_names)
        atr = definition.policy.atr_feature
        if atr and atr not in read_names:
            read_names = (*read_names, atr)
        plan = PolicyPlan.build(definition.policy, card, read_names)
        return Prepared(definition, card, runtime, plan, read_names)

    @staticmethod
    def check_target(prepared: Prepared, symbol: str, interval: str) -> None:
        validate_interval(interval)
        definition = prepared.definition
        if interval != definition.interval:
            raise ValidationError(
                f"signal {definition.signal_id!r} runs on {definition.interval}, not {interval}",
                details={"signal_id": definition.signal_id, "interval": definition.interval})
        if definition.symbols and symbol not in definition.symbols:
            raise ValidationError(
                f"signal {definition.signal_id!r} does not cover symbol {symbol!r}",
                details={"signal_id": definition.signal_id, "symbols": list(definition.symbols)})

    # --- the pure part --------------------------------------------------------------------
    def compute(self, prepared: Prepared, features: FeatureBatch, start_side: int, source: str,
                latency_ms: np.ndarray | float | None = None) -> tuple[SignalBatch, int]:
        """Predict and apply the policy to a feature batch. No I/O.

        ``latency_ms`` None means measure this call and spread it over the rows.
        """
        started = time.perf_counter()
        n = len(features)
        matrix = features.values
        if matrix.shape[1] != prepared.n_model_features:
            matrix = matrix[:, : prepared.n_model_features]
        model_input = np.ascontiguousarray(matrix, dtype=np.float64)
        output = prepared.runtime.predict(model_input)
        plan = prepared.plan
        raw, confidence = plan.decide(output)
        if prepared.definition.policy.position_aware:
            actions, end_side = resolve_positions(raw, start_side)
        else:
            actions, end_side = raw, start_side
        atr = None if plan.atr_column is None else features.values[:, plan.atr_column]
        entry, stop, take, size, invalid = plan.levels(actions, features.close, atr)
        flags = np.full(n, "", dtype=object)
        if invalid.any():
            flags[invalid] = "levels_invalid"
        if latency_ms is None:
            latency = np.full(n, (time.perf_counter() - started) * 1000.0 / max(n, 1))
        elif isinstance(latency_ms, float):
            latency = np.full(n, latency_ms)
        else:
            latency = np.array(latency_ms, dtype=np.float64)
        definition, card = prepared.definition, prepared.card
        batch = SignalBatch(
            signal_id=definition.signal_id, symbol=features.symbol, interval=features.interval,
            model_name=card.name, model_version=card.version, model_sha256=card.sha256 or "",
            source=source, ts=features.ts, action=actions, confidence=confidence,
            raw_output=np.ascontiguousarray(output, dtype=np.float64), entry_price=entry,
            stop_loss=stop, take_profit=take, recommended_size=size,
            feature_keys=features.feature_keys, latency_ms=latency, flags=flags,
        )
        return batch, end_side

    # --- drivers' entry points ------------------------------------------------------------
    async def run_window(self, signal_id: str, symbol: str, interval: str,
                         start: np.datetime64 | None, end: np.datetime64 | None, *,
                         source: str = Source.HISTORICAL_REPLAY, prepared: Prepared | None = None,
                         start_side: int | None = None, write: bool = True) -> RunResult:
        """Signals for every feature row in [start, end]. ``start_side`` None: from the store."""
        prepared = prepared or await self.prepare(signal_id)
        self.check_target(prepared, symbol, interval)
        read = await self.store.read_features(
            symbol, interval, prepared.read_names, start=start, end=end,
            feature_key=prepared.definition.feature_key)
        return await self._finish(prepared, read.batch, read.incomplete + read.missing, start_side,
                                  source, write)

    async def run_bars(self, signal_id: str, symbol: str, interval: str, ts: np.ndarray, *,
                       source: str = Source.HISTORICAL_REPLAY, prepared: Prepared | None = None,
                       write: bool = True) -> RunResult:
        """Signals for a list of bars. Positions carry through the listed bars in ts order."""
        prepared = prepared or await self.prepare(signal_id)
        self.check_target(prepared, symbol, interval)
        wanted = np.unique(np.asarray(ts, dtype=TS_DTYPE))
        read = await self.store.read_features(
            symbol, interval, prepared.read_names, ts=wanted,
            feature_key=prepared.definition.feature_key)
        skipped = int(wanted.size - len(read.batch))
        return await self._finish(prepared, read.batch, skipped, None, source, write)

    async def _finish(self, prepared: Prepared, features: FeatureBatch, skipped: int,
                      start_side: int | None, source: str, write: bool) -> RunResult:
        """Position before the first bar (from the store unless carried) -> compute -> upsert."""
        if start_side is None:
            start_side = FLAT
            if len(features):
                start_side = int((await self.store.position_sides(
                    prepared.definition.signal_id, prepared.card.version, features.symbol,
                    features.interval, features.ts[:1]))[0])
        batch, end_side = self.compute(prepared, features, start_side, str(Source(source)))
        written = await self.store.write_signals(batch) if write else 0
        return RunResult(batch, written, skipped, end_side)

    async def predict_bar(self, signal_id: str, symbol: str, interval: str, ts: np.datetime64, *,
                          source: str = Source.HISTORICAL_REPLAY,
                          write: bool = True) -> dict[str, Any]:
        """One bar, end to end; refuses with ``feature_value_missing`` when it has no row."""
        prepared = await self.prepare(signal_id)  # one-time model load is not bar latency
        started = time.perf_counter()
        result = await self.run_bars(signal_id, symbol, interval, np.array([ts], dtype=TS_DTYPE),
                                     source=source, prepared=prepared, write=False)
        if len(result.batch) == 0:
            raise FeatureValueMissing(
                f"no complete feature row for {symbol} {interval} at {format_ts(ts)}:"
                " import or compute features for that bar first",
                details={"symbol": symbol, "interval": interval, "ts": format_ts(ts)})
        result.batch.latency_ms[:] = (time.perf_counter() - started) * 1000.0
        if write:
            await self.store.write_signals(result.batch)
        return result.batch.row(0)
