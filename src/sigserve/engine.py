"""The one pipeline. Every driver (CLI predict, backfill, and later HTTP and stream) calls it.

signal definition -> model version -> verified runtime -> feature rows at ts -> predict ->
policy (action, confidence, position-aware closes, levels, size) -> upsert.

One bar is a vector of length one: the code path is the same as for a backfill chunk, so the
same (signal, model sha, symbol, interval, ts, features) gives the same row on every driver.

Usage::

    engine = Engine(store, registry)
    row = await engine.predict_bar("trend-1h", "BTCUSDT", "1h", parse_ts("2024-03-01T10:00Z"))
    row = await engine.predict_inline("trend-1h", "BTCUSDT", {"ret_1": 0.01, ...}, ts)
    result = await engine.run_window("trend-1h", "BTCUSDT", "1h", start, end)

Servers set ``observer`` to a ``(stage, seconds)`` callable to time the stages (feature_read,
position_read, predict, policy, write; a one-bar call reads its row and the position before it
in one ``Store.read_bar``, timed as feature_read); it costs nothing when None. A one-bar call may carry a
``deadline`` (a ``time.perf_counter()`` value): past it, before anything is written, the engine
refuses with ``deadline_exceeded`` or, with ``fallback_to_hold``, gives (and stores) a hold row
flagged ``deadline_fallback_hold`` instead of the late signal.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import operator
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from .domain import (
    FLAT,
    HOLD,
    FeatureBatch,
    ModelCard,
    SignalBatch,
    SignalDefinition,
    Source,
    Task,
)
from .errors import (
    DeadlineExceeded,
    FeatureNotRegistered,
    FeatureSpecMismatch,
    FeatureValueMissing,
    SignalNotFound,
    SignalRetired,
    ValidationError,
)
from .registry.models import ModelRegistry
from .runtimes.base import Runtime
from .signals.policy import PolicyPlan, resolve_one, resolve_positions
from .singleflight import SingleFlight
from .stores.base import Store
from .timeutil import TS_DTYPE, format_ts, interval_us, unique_ts, validate_interval

if TYPE_CHECKING:
    from .features.spec import FeatureSpec

StageObserver = Callable[[str, float], None]  # (stage, seconds)
DEADLINE_FLAG = "deadline_fallback_hold"
_MISSING = object()


@dataclass(frozen=True)
class Prepared:
    """A signal definition resolved to a verified, loaded model and a ready policy."""

    definition: SignalDefinition
    card: ModelCard
    runtime: Runtime
    plan: PolicyPlan
    read_names: tuple[str, ...]  # the model's features, then the ATR feature when it is extra
    # the feature_key of the spec the model was trained on (its card's spec hash), else None:
    # a feature row with another key is refused with feature_spec_mismatch
    spec_key: str | None = None
    # A signal with a traffic policy: the routing.RolloutSet (set on the champion that prepare()
    # returns); a routed version carries the other versions it predicts as shadows.
    rollout: Any = None
    shadows: tuple[Prepared, ...] = ()

    @property
    def n_model_features(self) -> int:
        return len(self.card.feature_names)


def card_spec_key(card: ModelCard) -> str | None:
    """The feature_key of the feature spec a model card records (``sigserve train``), or None."""
    key = card.extra.get("feature_key") if card.extra.get("feature_spec_hash") else None
    return str(key) if key else None


_SPECS: OrderedDict[str, FeatureSpec] = OrderedDict()


def assemble(definition: SignalDefinition, card: ModelCard, runtime: Runtime) -> Prepared:
    """A definition, its model card and the card's loaded runtime as one Prepared: the columns
    it reads (the model's features, then the ATR feature when it is extra), its policy plan and
    the feature_key of its model's spec. No I/O and no checks (``Engine.prepare_definition``
    makes them; a shadow worker gets versions the server already checked)."""
    read_names = tuple(card.feature_names)
    atr = definition.policy.atr_feature
    if atr and atr not in read_names:
        read_names = (*read_names, atr)
    return Prepared(definition, card, runtime, PolicyPlan.build(definition.policy, card, read_names),
                    read_names, card_spec_key(card))


def card_feature_spec(card: ModelCard) -> FeatureSpec:
    """The feature spec a model card records (``sigserve train``), rebuilt once per spec hash:
    what computes a bar's features from candles (``POST /predict``, a stream's candle message).
    A card without one is a ``validation_error`` with ``details.reason`` ``no_feature_spec``."""
    data = card.extra.get("feature_spec")
    if not isinstance(data, dict) or not card.extra.get("feature_spec_hash"):
        raise ValidationError(
            f"model {card.ref} records no feature spec, so it cannot compute features from candles:"
            " train it with `sigserve train`, or send feature values instead",
            details={"model": card.ref, "reason": "no_feature_spec"})
    key = str(card.extra["feature_spec_hash"])
    spec = _SPECS.get(key)
    if spec is None:
        from .features.spec import FeatureSpec

        spec = _SPECS[key] = FeatureSpec.from_card(data)
        while len(_SPECS) > 32:
            _SPECS.popitem(last=False)
    missing = [n for n in card.feature_names if n not in spec.names]
    if missing:
        raise ValidationError(f"model {card.ref} reads features its spec does not compute: {missing[:5]}",
                              details={"model": card.ref, "missing": missing[:50]})
    return spec


def check_feature_keys(prepared: Prepared, keys: np.ndarray) -> None:
    """Refuse feature rows computed by another spec than the model's (``feature_spec_mismatch``)."""
    expected = prepared.spec_key
    if expected is None:
        return
    if keys.shape[0] and keys[0] == expected and keys[-1] == expected and bool(np.all(keys == expected)):
        return
    wrong = sorted({str(k) for k in keys.tolist() if k != expected})
    raise FeatureSpecMismatch(
        f"feature rows with feature_key {wrong[:3]} come from another feature spec than the one"
        f" model {prepared.card.ref} was trained on ({expected}): compute features with that spec"
        f" (sigserve features compute) or pin the signal to {expected!r}",
        details={"model": prepared.card.ref, "expected": expected, "found": wrong[:10]})


_PLAIN_NUMBERS = frozenset((float, int))
_GETTERS: dict[tuple[str, ...], Callable[[Mapping[str, Any]], tuple[Any, ...]]] = {}


def _one_item(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    if not names:
        return lambda features: ()
    name = names[0]
    return lambda features: (features[name],)


def fill_feature_row(names: tuple[str, ...], features: Mapping[str, Any], out: np.ndarray,
                     model_ref: str) -> None:
    """Fill ``out`` with a caller's feature values in ``names`` order (an HTTP body's, a stream
    message's). None is a missing value (NaN); a name absent is ``feature_value_missing``, a value
    that is not a number ``validation_error``."""
    getter = _GETTERS.get(names)
    if getter is None:
        getter = _GETTERS[names] = operator.itemgetter(*names) if len(names) > 1 else _one_item(names)
    try:
        values = getter(features)
    except (KeyError, TypeError):
        values = None
    # The common case (every value a plain float or int) in one C-level pass; anything else
    # (None, numpy scalars, bools, text, absent names) takes the loop below, which decides.
    if values is not None and set(map(type, values)) <= _PLAIN_NUMBERS:
        out[:] = values
        return
    missing: list[str] = []
    bad: dict[str, str] = {}
    for i, name in enumerate(names):
        value = features.get(name, _MISSING)
        kind = type(value)
        if kind is float or kind is int:
            out[i] = value
        elif value is None:
            out[i] = math.nan
        elif value is _MISSING:
            missing.append(name)
        elif isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
            out[i] = float(value)
        else:
            bad[name] = kind.__name__
    if bad:
        raise ValidationError(f"feature values must be numbers: {sorted(bad)}",
                              details={"not_numeric": bad})
    if missing:
        raise FeatureValueMissing(f"the features lack names the model {model_ref} reads: {missing}",
                                  details={"missing": missing, "model": model_ref})


@dataclass(frozen=True)
class RunResult:
    batch: SignalBatch
    rows_written: int
    rows_skipped_missing_features: int
    end_side: int
    extra: tuple[SignalBatch, ...] = ()  # a rollout's other routed version's rows (backfill)
    features: FeatureBatch | None = None


@dataclass(frozen=True)
class BarRuns:
    """Feature rows of some bars of one series, split into runs of consecutive bars, and the
    stored position before each run (see :meth:`Engine.read_runs`)."""

    features: FeatureBatch
    bounds: tuple[tuple[int, int], ...]  # each run's rows: features[a:b]
    sides: tuple[int, ...]  # the stored position before each run

    def row_of(self, ts: np.datetime64) -> int | None:
        """The row of bar ``ts``, None when it has no feature row."""
        i = int(np.searchsorted(self.features.ts, np.asarray(ts, dtype=TS_DTYPE)))
        return i if i < len(self.features) and self.features.ts[i] == ts else None


class Engine:
    # A compute call on at least this many rows runs in a worker thread, so that a server's event
    # loop keeps answering while a backfill chunk is predicted.
    thread_rows = 2048

    def __init__(self, store: Store, registry: ModelRegistry, prepared_ttl_s: float = 0.0,
                 observer: StageObserver | None = None) -> None:
        self.store = store
        self.registry = registry
        self.observer = observer
        # A long-running driver keeps each resolved signal (0: resolve every call), so the hot
        # path skips the definition, alias and feature-registry reads, and checks the store's
        # catalog version every TTL: a retire, promote or deprecate made elsewhere takes effect
        # within the TTL plus one resolution; forget() applies it at once.
        self.prepared_ttl_s = prepared_ttl_s
        # signal_id -> (checked at, resolution, the catalog version it was made at; None: unknown)
        self._prepared: dict[str, tuple[float, Prepared, int | None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        # the in-line resolution in progress per signal: concurrent first calls share it
        self._resolving: SingleFlight[str, Prepared] = SingleFlight()
        self._generation = 0  # bumped by forget()
        # routing.shadow.ShadowRunner of a server: shadows off the request path (None: inline)
        self.shadow_runner: Any = None
        # bar_batch.BarBatcher of a server: concurrent predict_bar calls share reads and writes
        # (None: each call reads and writes alone)
        self.bar_batcher: Any = None

    def forget(self, signal_id: str | None = None) -> None:
        """Drop cached resolutions (all, or one signal's); a background re-resolution that
        started before this call does not put its older answer back."""
        self._generation += 1
        if signal_id is None:
            self._prepared.clear()
            self._resolving.drop()
        else:
            self._prepared.pop(signal_id, None)
            self._resolving.drop(lambda key: key == signal_id)

    def install(self, signal_id: str, prepared: Prepared) -> None:
        """Swap a resolution in (one reference assignment): the next call uses it, and a
        background re-resolution that started before this call does not put its older one back."""
        self._generation += 1
        self._prepared[signal_id] = (time.monotonic(), prepared, None)

    # --- resolution -----------------------------------------------------------------------
    async def prepare(self, signal_id: str) -> Prepared:
        """Resolve and check everything that can refuse before a feature is read.

        With a TTL, a resolution past it is still served while one background task reads the
        store's catalog version and, only when it moved, resolves the signal again. A
        re-resolution is 4-5 ms of store reads (a rollout's or an ensemble's several times
        that), and once a second it was the p99 of a server's answers: measured over HTTP, an
        ensemble's p99 4.3 ms with it against 2.3 ms without, a shadowed signal's 4.5 against
        2.1 ms. A refusal found by that task (a retired signal, a rejected model, the store
        gone) drops the entry, so the next call resolves in line and refuses: a change made
        elsewhere takes effect within the TTL plus one resolution.
        """
        if self.prepared_ttl_s > 0:
            cached = self._prepared.get(signal_id)
            now = time.monotonic()
            if cached is not None:
                if now - cached[0] >= self.prepared_ttl_s and signal_id not in self._refreshing:
                    task = asyncio.get_running_loop().create_task(self._refresh(signal_id))
                    self._refreshing[signal_id] = task
                return cached[1]
            # Concurrent first calls (a cold signal asked for by many clients at once) share
            # one resolution: measured, 16 of them each read the store in turn and 6 ran past
            # a 100 ms deadline.
            return await self._resolving.run(signal_id, lambda: self._resolve_and_keep(signal_id, now))
        return await self._resolve(signal_id)

    async def _resolve_and_keep(self, signal_id: str, now: float) -> Prepared:
        generation = self._generation
        version = await self.store.catalog_version()
        prepared = await self._resolve(signal_id)
        if generation == self._generation:
            self._prepared[signal_id] = (now, prepared, version)
        return prepared

    async def _refresh(self, signal_id: str) -> None:
        generation = self._generation
        try:
            # read before the resolution: a change committed during it shows at the next check
            version = await self.store.catalog_version()
            cached = self._prepared.get(signal_id)
            if cached is not None and cached[2] == version:
                if generation == self._generation:
                    self._prepared[signal_id] = (time.monotonic(), cached[1], version)
                return
            prepared = await self._resolve(signal_id)
            if generation == self._generation:
                self._prepared[signal_id] = (time.monotonic(), prepared, version)
        except Exception:  # the next call resolves in line and raises it to its caller
            self._prepared.pop(signal_id, None)
        finally:
            self._refreshing.pop(signal_id, None)

    async def _resolve(self, signal_id: str) -> Prepared:
        definition = await self.store.get_signal(signal_id)
        if definition is None:
            raise SignalNotFound(f"no signal {signal_id!r}", details={"signal_id": signal_id})
        if not definition.active:
            raise SignalRetired(f"signal {signal_id!r} is retired", details={"signal_id": signal_id})
        traffic = await self.store.get_traffic_policy(signal_id)
        if traffic is not None:  # a rollout (sigserve rollout): its champion, not the definition's ref
            if traffic.challenger is not None or traffic.shadows:
                from .routing.rollout import prepare_rollout

                return await prepare_rollout(self, definition, traffic, strict=False)
            return await self.prepare_definition(replace(definition, model_ref=str(traffic.champion)))
        return await self.prepare_definition(definition)

    async def prepare_definition(self, definition: SignalDefinition) -> Prepared:
        """Resolve a given definition (a stream worker's, with its live overrides of model and
        policy applied): model, lifecycle, artifact sha and feature registry checks. Not cached."""
        card = await self.registry.resolve(definition.model_name, definition.model_ref)
        runtime = await self.registry.runtime(card)  # lifecycle, artifact and sha checks
        statuses = await self.store.feature_statuses(list(card.feature_names))
        unregistered = {n: statuses.get(n, "unknown") for n in card.feature_names
                        if statuses.get(n) != "registered"}
        if unregistered:
            raise FeatureNotRegistered(
                f"model {card.ref} needs features that are not registered: {sorted(unregistered)}",
                details={"features": unregistered, "model": card.ref})
        prepared = assemble(definition, card, runtime)
        spec_key = prepared.spec_key
        if spec_key is not None and definition.feature_key and definition.feature_key != spec_key:
            raise FeatureSpecMismatch(
                f"signal {definition.signal_id!r} pins feature_key {definition.feature_key!r}, but model"
                f" {card.ref} was trained on the feature spec {spec_key!r}",
                details={"signal_id": definition.signal_id, "model": card.ref, "pinned": definition.feature_key,
                         "expected": spec_key})
        return prepared

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
                latency_ms: np.ndarray | float | None = None,
                min_confidence: float = 0.0) -> tuple[SignalBatch, int]:
        """Predict and apply the policy to a feature batch. No I/O.

        ``latency_ms`` None means measure this call and spread it over the rows.
        ``min_confidence`` (a stream worker's live confidence threshold) turns a raw buy or sell
        under it into hold, before positions are resolved; 0 changes nothing.
        """
        started = time.perf_counter()
        n = len(features)
        matrix = features.values
        if matrix.shape[1] != prepared.n_model_features:
            matrix = matrix[:, : prepared.n_model_features]
        model_input = np.ascontiguousarray(matrix, dtype=np.float64)
        output = prepared.runtime.predict(model_input)
        observer = self.observer
        if observer is not None:
            predicted = time.perf_counter()
            observer("predict", predicted - started)
        plan = prepared.plan
        if n == 1:
            return self._policy_one(prepared, features, output, start_side, source, latency_ms,
                                    min_confidence, started, predicted if observer is not None else 0.0)
        raw, confidence = plan.decide(output)
        if min_confidence > 0.0:
            raw = np.where(confidence < min_confidence, np.int8(HOLD), raw).astype(np.int8)
        if prepared.definition.policy.position_aware:
            actions, end_side = resolve_positions(raw, start_side)
        else:
            actions, end_side = raw, start_side
        atr = None if plan.atr_column is None else features.values[:, plan.atr_column]
        entry, stop, take, size, invalid = plan.levels(actions, features.close, atr)
        flags = np.full(n, "", dtype=object)
        if invalid.any():
            flags[invalid] = "levels_invalid"
        if observer is not None:
            observer("policy", time.perf_counter() - predicted)
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

    def _policy_one(self, prepared: Prepared, features: FeatureBatch, output: np.ndarray,
                    start_side: int, source: str, latency_ms: np.ndarray | float | None,
                    min_confidence: float, started: float, predicted: float) -> tuple[SignalBatch, int]:
        """:meth:`compute`'s policy for one bar, on Python floats (bit for bit the vectorised
        result; see :mod:`.signals.policy`)."""
        plan = prepared.plan
        raw, confidence = plan.decide_one(output[0])
        if min_confidence > 0.0 and confidence < min_confidence:
            raw = HOLD
        if prepared.definition.policy.position_aware:
            action, end_side = resolve_one(raw, start_side)
        else:
            action, end_side = raw, start_side
        atr = None if plan.atr_column is None else float(features.values[0, plan.atr_column])
        entry, stop, take, size, invalid = plan.levels_one(action, float(features.close[0]), atr)
        observer = self.observer
        if observer is not None:
            observer("policy", time.perf_counter() - predicted)
        if latency_ms is None:
            latency = (time.perf_counter() - started) * 1000.0
        elif isinstance(latency_ms, float):
            latency = latency_ms
        else:
            latency = float(np.asarray(latency_ms, dtype=np.float64).reshape(-1)[0])
        definition, card = prepared.definition, prepared.card
        batch = SignalBatch(
            signal_id=definition.signal_id, symbol=features.symbol, interval=features.interval,
            model_name=card.name, model_version=card.version, model_sha256=card.sha256 or "",
            source=source, ts=features.ts, action=np.array([action], dtype=np.int8),
            confidence=np.array([confidence]),
            raw_output=np.ascontiguousarray(output, dtype=np.float64),
            entry_price=np.array([entry]), stop_loss=np.array([stop]), take_profit=np.array([take]),
            recommended_size=np.array([size]), feature_keys=features.feature_keys,
            latency_ms=np.array([latency]),
            flags=np.array(["levels_invalid" if invalid else ""], dtype=object),
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
        observer = self.observer
        began = time.perf_counter() if observer is not None else 0.0
        read = await self.store.read_features(
            symbol, interval, prepared.read_names, start=start, end=end,
            feature_key=prepared.definition.feature_key or prepared.spec_key)
        if observer is not None:
            observer("feature_read", time.perf_counter() - began)
        return await self._finish(prepared, read.batch, read.incomplete + read.missing, start_side,
                                  source, write)

    async def run_bars(self, signal_id: str, symbol: str, interval: str, ts: np.ndarray, *,
                       source: str = Source.HISTORICAL_REPLAY, prepared: Prepared | None = None,
                       write: bool = True) -> RunResult:
        """Signals for a list of bars. Positions carry through the listed bars in ts order."""
        prepared = prepared or await self.prepare(signal_id)
        self.check_target(prepared, symbol, interval)
        wanted = unique_ts(ts)
        observer = self.observer
        began = time.perf_counter() if observer is not None else 0.0
        feature_key = prepared.definition.feature_key or prepared.spec_key
        start_side: int | None = None
        if wanted.size == 1 and prepared.rollout is None and prepared.definition.policy.position_aware:
            # One bar (the live path): its feature row and the position before it in one call
            # (one statement, one round trip on PostgreSQL). Unused when the bar has no row.
            read, start_side = await self.store.read_bar(
                symbol, interval, prepared.read_names, wanted[0], feature_key=feature_key,
                position=(prepared.definition.signal_id, prepared.card.version))
        else:
            read = await self.store.read_features(symbol, interval, prepared.read_names, ts=wanted,
                                                  feature_key=feature_key)
        if observer is not None:
            observer("feature_read", time.perf_counter() - began)
        skipped = int(wanted.size - len(read.batch))
        return await self._finish(prepared, read.batch, skipped, start_side, source, write)

    async def read_runs(self, prepared: Prepared, symbol: str, interval: str, ts: np.ndarray) -> BarRuns:
        """The feature rows at ``ts`` (one read), split into runs of consecutive bars, and the
        stored position before each run (one read): what :meth:`compute_runs` predicts.

        Unlike :meth:`run_bars`, which carries the position through every listed bar, each run
        starts from the store, so bars far apart do not skip the signals stored between them.
        """
        observer = self.observer
        began = time.perf_counter()
        read = await self.store.read_features(
            symbol, interval, prepared.read_names, ts=ts,
            feature_key=prepared.definition.feature_key or prepared.spec_key)
        features = read.batch  # unique bars in ts order (the Store contract)
        if observer is not None:
            observer("feature_read", time.perf_counter() - began)
        if prepared.spec_key is not None and len(features):
            check_feature_keys(prepared, features.feature_keys)
        if not len(features):
            return BarRuns(features, (), ())
        breaks = np.flatnonzero(np.diff(features.ts.astype(np.int64)) != interval_us(interval)) + 1
        starts = [0, *breaks.tolist()]
        began = time.perf_counter()
        sides = await self.store.position_sides(prepared.definition.signal_id, prepared.card.version,
                                                symbol, interval, features.ts[starts])
        if observer is not None:
            observer("position_read", time.perf_counter() - began)
        bounds = tuple(itertools.pairwise([*starts, len(features)]))
        return BarRuns(features, bounds, tuple(int(side) for side in sides))

    def compute_runs(self, prepared: Prepared, runs: BarRuns, source: str, skip: Collection[int] = (),
                     ) -> tuple[list[SignalBatch], dict[int, tuple[SignalBatch, int]]]:
        """Each run's rows but ``skip`` (rows of ``runs.features``), the position carried through
        the run from its stored start: one batch per run, and where each row's signal is."""
        parts: list[SignalBatch] = []
        where: dict[int, tuple[SignalBatch, int]] = {}
        for (a, b), side in zip(runs.bounds, runs.sides, strict=True):
            rows = [i for i in range(a, b) if i not in skip]
            if rows:
                out, _ = self.compute(prepared, runs.features.take(np.array(rows)), side, source)
                parts.append(out)
                where.update({i: (out, j) for j, i in enumerate(rows)})
        return parts, where

    async def _position_before(self, prepared: Prepared, symbol: str, interval: str,
                               ts: np.ndarray) -> int:
        """The position (side) before ``ts[0]``, from the stored signals."""
        observer = self.observer
        began = time.perf_counter() if observer is not None else 0.0
        side = int((await self.store.position_sides(
            prepared.definition.signal_id, prepared.card.version, symbol, interval, ts[:1]))[0])
        if observer is not None:
            observer("position_read", time.perf_counter() - began)
        return side

    async def _finish(self, prepared: Prepared, features: FeatureBatch, skipped: int,
                      start_side: int | None, source: str, write: bool) -> RunResult:
        """Position before the first bar (from the store unless carried) -> compute -> upsert."""
        if prepared.spec_key is not None and len(features):
            check_feature_keys(prepared, features.feature_keys)
        if prepared.rollout is not None and len(features):
            from .routing.rollout import finish_rollout

            return await finish_rollout(self, prepared, features, skipped, str(Source(source)), write)
        if start_side is None:
            start_side = FLAT
            if len(features):
                start_side = await self._position_before(prepared, features.symbol, features.interval,
                                                         features.ts)
        src = str(Source(source))
        if len(features) >= self.thread_rows:
            batch, end_side = await asyncio.to_thread(self.compute, prepared, features, start_side, src)
        else:
            batch, end_side = self.compute(prepared, features, start_side, src)
        written = await self._write(batch) if write else 0
        return RunResult(batch, written, skipped, end_side, features=features)

    async def _write(self, batch: SignalBatch) -> int:
        observer = self.observer
        if observer is None:
            return await self.store.write_signals(batch)
        began = time.perf_counter()
        written = await self.store.write_signals(batch)
        observer("write", time.perf_counter() - began)
        return written

    async def predict_bar(self, signal_id: str, symbol: str, interval: str, ts: np.datetime64, *,
                          source: str = Source.HISTORICAL_REPLAY, write: bool = True,
                          deadline: float | None = None,
                          fallback_to_hold: bool = False) -> dict[str, Any]:
        """One bar, end to end; refuses with ``feature_value_missing`` when it has no row.

        ``deadline`` (a ``time.perf_counter()`` value) is checked before the feature read and
        before the write: past it, ``deadline_exceeded``, or with ``fallback_to_hold`` a hold row
        flagged ``deadline_fallback_hold`` is stored and returned instead.
        """
        prepared = await self.prepare(signal_id)  # one-time model load is not bar latency
        if prepared.rollout is not None:
            prepared = prepared.rollout.pick(symbol, ts)
        started = time.perf_counter()
        batcher = self.bar_batcher
        if batcher is not None and write and (deadline is None or started <= deadline):
            return await batcher.submit(prepared, symbol, interval, ts, source=str(Source(source)),
                                        deadline=deadline, fallback_to_hold=fallback_to_hold,
                                        started=started)
        return await self.predict_one(prepared, symbol, interval, ts, started, source=source, write=write,
                                      deadline=deadline, fallback_to_hold=fallback_to_hold)

    async def predict_one(self, prepared: Prepared, symbol: str, interval: str, ts: np.datetime64,
                          started: float, *, source: str = Source.HISTORICAL_REPLAY, write: bool = True,
                          deadline: float | None = None,
                          fallback_to_hold: bool = False) -> dict[str, Any]:
        """:meth:`predict_bar` of a resolved (and routed) version, alone: its own read and write."""
        signal_id = prepared.definition.signal_id
        when = np.array([ts], dtype=TS_DTYPE)
        result: RunResult | None = None
        if deadline is not None and started > deadline:
            self.check_target(prepared, symbol, interval)
            batch = self._late(prepared, symbol, interval, when, source, deadline, fallback_to_hold,
                               "the feature read")
        else:
            result = await self.run_bars(signal_id, symbol, interval, when, source=source,
                                         prepared=prepared, write=False)
            if len(result.batch) == 0:
                await self.refuse_missing(prepared, symbol, interval, ts)
            batch = result.batch
            if deadline is not None and time.perf_counter() > deadline:
                batch = self._late(prepared, symbol, interval, when, source, deadline,
                                   fallback_to_hold, "the write", batch.feature_keys)
        batch.latency_ms[:] = (time.perf_counter() - started) * 1000.0
        if write:
            await self._write(batch)
        if prepared.shadows and result is not None and batch is result.batch and result.features is not None:
            await self._shadow(prepared, result.features, batch, source, write)
        return batch.row(0)

    async def _shadow(self, routed: Prepared, features: FeatureBatch, served: SignalBatch,
                      source: str, write: bool) -> None:
        """The routed version's shadows on the same feature row: queued for a server's
        background runner (dropped and counted when its queue is full), else computed here."""
        runner = self.shadow_runner
        if runner is not None:
            runner.submit(routed, features, served, source, write)
            return
        from .routing.rollout import align

        for other in routed.shadows:
            rows = align(features, other)
            if rows is None:  # a version reading features this row does not carry
                continue
            shadow, _ = self.compute(other, rows, FLAT, str(Source(source)))
            shadow.shadow = True
            if write:
                await self._write(shadow)

    async def refuse_missing(self, prepared: Prepared, symbol: str, interval: str,
                             ts: np.datetime64) -> NoReturn:
        """The bar has no complete feature row: ``feature_value_missing``, or
        ``feature_spec_mismatch`` when the row there was computed for another spec."""
        if prepared.spec_key is not None and not prepared.definition.feature_key:
            await self._refuse_other_spec(prepared, symbol, interval, np.array([ts], dtype=TS_DTYPE))
        raise FeatureValueMissing(
            f"no complete feature row for {symbol} {interval} at {format_ts(ts)}:"
            " import or compute features for that bar first",
            details={"symbol": symbol, "interval": interval, "ts": format_ts(ts)})

    async def _refuse_other_spec(self, prepared: Prepared, symbol: str, interval: str,
                                 when: np.ndarray) -> None:
        """The model's spec has no row at the bar: when another spec's row is there, say so
        (``feature_spec_mismatch``) rather than ``feature_value_missing``."""
        other = await self.store.read_features(symbol, interval, (), ts=when)
        if len(other.batch):
            check_feature_keys(prepared, other.batch.feature_keys)

    async def newest_bar(self, symbol: str, interval: str) -> np.datetime64:
        """The newest bar of ``symbol`` that has a feature row; ``feature_value_missing`` if none."""
        observer = self.observer
        began = time.perf_counter() if observer is not None else 0.0
        newest = await self.store.newest_feature_ts(symbol, interval)
        if observer is not None:
            observer("feature_read", time.perf_counter() - began)
        if newest is None:
            raise FeatureValueMissing(
                f"no feature rows for {symbol} {interval}: import or compute features first",
                details={"symbol": symbol, "interval": interval})
        return newest

    async def predict_inline(self, signal_id: str, symbol: str, features: Mapping[str, Any],
                             ts: np.datetime64, *, close: float | None = None,
                             deadline: float | None = None,
                             fallback_to_hold: bool = False) -> dict[str, Any]:
        """One bar from a caller's feature values: no store read, no write.

        ``features`` maps names to numbers (None means a missing value, NaN); it must hold every
        feature the model reads (plus the policy's ATR feature), and may hold more. ``close`` is
        the bar's close price for levels and size; without it a buy or sell carries no levels and
        is flagged ``levels_need_close``. The position before the bar is flat.
        """
        prepared = await self.prepare(signal_id)
        if prepared.rollout is not None:
            prepared = prepared.rollout.pick(symbol, ts)
        started = time.perf_counter()
        interval = prepared.definition.interval
        self.check_target(prepared, symbol, interval)
        names = prepared.read_names
        row = np.empty((1, len(names)), dtype=np.float64)
        fill_feature_row(names, features, row[0], prepared.card.ref)
        price = math.nan if close is None else float(close)
        key = prepared.definition.feature_key or "inline"
        batch = FeatureBatch(symbol, interval, np.array([ts], dtype=TS_DTYPE), row, names,
                             np.array([key], dtype=object), np.array([price]))
        signals, _ = self.compute(prepared, batch, FLAT, Source.STREAM)
        if close is None and signals.flags[0] == "levels_invalid":
            signals.flags[0] = "levels_need_close"
        if deadline is not None and time.perf_counter() > deadline:
            signals = self._late(prepared, symbol, interval, batch.ts, Source.STREAM, deadline,
                                 fallback_to_hold, "the answer", batch.feature_keys)
        signals.latency_ms[:] = (time.perf_counter() - started) * 1000.0
        if prepared.shadows and signals.flags[0] != DEADLINE_FLAG:
            await self._shadow(prepared, batch, signals, Source.STREAM, False)
        return signals.row(0)

    # --- holds -----------------------------------------------------------------------------
    def hold_batch(self, prepared: Prepared, symbol: str, interval: str, ts: np.ndarray,
                   source: str, flag: str, feature_keys: np.ndarray | None = None) -> SignalBatch:
        """Hold rows that record why no prediction stands (``flag``): confidence 0, no levels,
        the model's output NaN (its width as the model's)."""
        ts = np.asarray(ts, dtype=TS_DTYPE)
        n = int(ts.shape[0])
        card, definition = prepared.card, prepared.definition
        width = 1 if card.task is Task.REGRESSION else max(len(card.classes), 2)
        if feature_keys is None:
            feature_keys = np.full(n, definition.feature_key or "", dtype=object)
        return SignalBatch(
            signal_id=definition.signal_id, symbol=symbol, interval=interval,
            model_name=card.name, model_version=card.version, model_sha256=card.sha256 or "",
            source=str(Source(source)), ts=ts, action=np.full(n, HOLD, dtype=np.int8),
            confidence=np.zeros(n), raw_output=np.full((n, width), np.nan),
            entry_price=np.full(n, np.nan), stop_loss=np.full(n, np.nan),
            take_profit=np.full(n, np.nan), recommended_size=np.full(n, np.nan),
            feature_keys=np.asarray(feature_keys, dtype=object), latency_ms=np.zeros(n),
            flags=np.full(n, flag, dtype=object),
        )

    def _late(self, prepared: Prepared, symbol: str, interval: str, ts: np.ndarray, source: str,
              deadline: float, fallback_to_hold: bool, before: str,
              feature_keys: np.ndarray | None = None) -> SignalBatch:
        if not fallback_to_hold:
            raise self.deadline_error(prepared, deadline, before)
        return self.hold_batch(prepared, symbol, interval, ts, source, DEADLINE_FLAG, feature_keys)

    @staticmethod
    def deadline_error(prepared: Prepared, deadline: float, before: str) -> DeadlineExceeded:
        """``deadline_exceeded``: the budget ended at ``deadline``, before ``before``."""
        late_ms = round((time.perf_counter() - deadline) * 1000.0, 3)
        return DeadlineExceeded(
            f"the request's latency budget ran out before {before} (late by {late_ms} ms)",
            details={"late_by_ms": late_ms, "before": before,
                     "signal_id": prepared.definition.signal_id})
