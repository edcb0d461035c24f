"""Champion / challenger / shadow rollouts of a signal definition.

A signal with a :class:`~sigserve.domain.TrafficPolicy` resolves (``Engine.prepare``) to its
champion's :class:`~sigserve.engine.Prepared` carrying a :class:`RolloutSet`: every version of the
policy loaded and sha-verified, and each routed version knowing the others it shadows for. A
signal without a policy pays one attribute test (``prepared.rollout is None``) per request.

Stages (``sigserve rollout`` and ``/admin/rollouts/...``)::

    start V      champion keeps 100%, V predicted as a shadow          stage shadow   share 0
    advance      V takes 10%, then 50%, then 100% of the buckets        stage canary / full
    promote      V becomes the champion (share 0, no challenger)        stage none
    rollback     the challenger is dropped; the champion takes 100%    stage none

While a challenger is routed, the version not chosen for a bar is predicted as a shadow on the
same feature row, so the comparison report sees both versions on every bar.

A change made through a server (:class:`RolloutService` with its engine) is loaded, verified and
warmed up first, then stored (one audited row), then installed in the engine by one reference
swap: the next request sees it. A change made by another process (the CLI) reaches a server when
its resolved signal expires (``SIGSERVE_SERVER_PREPARED_TTL_S``, 1 s by default).
"""

from __future__ import annotations

import getpass
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..domain import FLAT, FeatureBatch, SignalDefinition, TrafficPolicy
from ..errors import SignalNotFound, SigserveError, ValidationError
from .hashing import bucket, challenger_mask, day_number, trading_date

if TYPE_CHECKING:
    from ..domain import SignalBatch
    from ..engine import Engine, Prepared, RunResult

log = logging.getLogger("sigserve.rollout")
CANARY_STEPS = (0.1, 0.5, 1.0)
_CACHE_MAX = 65_536


@dataclass(frozen=True)
class RolloutSet:
    """The versions of one signal's traffic policy, loaded. ``champion`` and ``challenger`` are
    routed Prepareds (their ``shadows`` are the other versions)."""

    policy: TrafficPolicy
    champion: Prepared
    challenger: Prepared | None
    share: float
    _cache: dict[tuple[str, int], bool] = field(default_factory=dict, compare=False, repr=False)

    def pick(self, symbol: str, ts: np.datetime64) -> Prepared:
        """The routed version for one bar (cached per symbol and trading date)."""
        challenger = self.challenger
        if challenger is None or self.share <= 0.0:
            return self.champion
        if self.share >= 1.0:
            return challenger
        key = (symbol, day_number(ts))
        taken = self._cache.get(key)
        if taken is None:
            if len(self._cache) > _CACHE_MAX:
                self._cache.clear()
            taken = self._cache[key] = bucket(symbol, trading_date(ts)) < self.share
        return challenger if taken else self.champion

    def split(self, symbol: str, ts: np.ndarray) -> list[tuple[Prepared, np.ndarray]]:
        """The routed versions of one symbol's bars ``ts`` and the rows each takes (boolean
        masks), the champion first; a version that takes no row is left out. The vectorised
        :meth:`pick`, for a driver's batch of bars (backfill, a stream's micro-batch)."""
        taken = (challenger_mask(symbol, ts, self.share) if self.challenger is not None
                 else np.zeros(ts.shape[0], dtype=bool))
        return [(routed, rows) for routed, rows in ((self.champion, ~taken), (self.challenger, taken))
                if routed is not None and rows.any()]

    @property
    def versions(self) -> tuple[int, ...]:
        return self.policy.versions


async def prepare_rollout(engine: Engine, definition: SignalDefinition, policy: TrafficPolicy, *,
                          strict: bool = True) -> Prepared:
    """Load every version of ``policy`` for ``definition`` (lifecycle, artifact sha and feature
    checks for each) and return the champion carrying the :class:`RolloutSet`.

    ``strict`` False (a re-resolution of a stored policy): a challenger or shadow that can no
    longer be served (retired, rejected, its artifact gone) is left out and logged, and the
    champion takes its traffic; the champion itself still refuses. True (a change being
    applied): any refusal refuses the change."""
    loaded: dict[int, Prepared] = {}
    for version in policy.versions:
        try:
            loaded[version] = await engine.prepare_definition(replace(definition, model_ref=str(version)))
        except SigserveError as exc:
            if strict or version == policy.champion:
                raise
            log.error("signal %s: version %s left out of its rollout: %s", definition.signal_id, version, exc)
    every = tuple(loaded[v] for v in policy.versions if v in loaded)
    champion = loaded[policy.champion]
    routed_champion = replace(champion, shadows=tuple(p for p in every if p is not champion))
    routed_challenger = None
    if policy.challenger is not None and policy.challenger in loaded:
        chal = loaded[policy.challenger]
        routed_challenger = replace(chal, shadows=tuple(p for p in every if p is not chal))
    share = policy.share if routed_challenger is not None else 0.0
    rollout = RolloutSet(policy, routed_champion, routed_challenger, share)
    return replace(champion, rollout=rollout)


def align(features: FeatureBatch, target: Prepared) -> FeatureBatch | None:
    """``features`` with ``target``'s columns (versions of a model may read different features),
    or None when a column is absent."""
    if features.names == target.read_names:
        return features
    try:
        columns = [features.names.index(name) for name in target.read_names]
    except ValueError:
        return None
    return FeatureBatch(features.symbol, features.interval, features.ts, features.values[:, columns],
                        target.read_names, features.feature_keys, features.close)


async def _rows_for(engine: Engine, features: FeatureBatch, target: Prepared) -> FeatureBatch | None:
    """``target``'s columns for the bars of ``features``: taken from them, else read from the
    store (the same bars; None when the store lacks some)."""
    aligned = align(features, target)
    if aligned is not None:
        return aligned
    read = await engine.store.read_features(
        features.symbol, features.interval, target.read_names, ts=features.ts,
        feature_key=target.definition.feature_key or target.spec_key)
    return read.batch if len(read.batch) == len(features) else None


async def finish_rollout(engine: Engine, base: Prepared, features: FeatureBatch, skipped: int,
                         source: str, write: bool) -> RunResult:
    """Many bars of a signal with a rollout (backfill): each bar goes to the version its
    (symbol, trading date) routes to, and every other version predicts it as a shadow, in
    vectorised sub-batches. Positions come from each version's own stored history."""
    import asyncio

    from ..engine import RunResult

    rollout = base.rollout
    assert rollout is not None
    served: list[SignalBatch] = []
    written = 0
    end_side = FLAT
    for routed, rows in rollout.split(features.symbol, features.ts):
        part_rows = features.take(rows) if not rows.all() else features
        part = await _rows_for(engine, part_rows, routed)
        if part is None:  # this version's features are missing at some of these bars
            continue
        others = [(other, await _rows_for(engine, part_rows, other)) for other in routed.shadows]
        side = int((await engine.store.position_sides(
            routed.definition.signal_id, routed.card.version, part.symbol, part.interval,
            part.ts[:1]))[0])

        def run(routed: Prepared = routed, part: FeatureBatch = part, side: int = side,
                others: list[tuple[Prepared, FeatureBatch | None]] = others,
                ) -> tuple[SignalBatch, int, list[SignalBatch]]:
            batch, end = engine.compute(routed, part, side, source)
            shadows = []
            for other, rows_of_other in others:
                if rows_of_other is None:
                    continue
                shadow, _ = engine.compute(other, rows_of_other, FLAT, source)
                shadow.shadow = True
                shadows.append(shadow)
            return batch, end, shadows

        if len(part) >= engine.thread_rows:
            batch, end, shadows = await asyncio.to_thread(run)
        else:
            batch, end, shadows = run()
        if routed is rollout.champion:
            end_side = end
        if write:
            written += await engine._write(batch)
            for shadow in shadows:
                await engine._write(shadow)
        served.append(batch)
    if not served:
        empty, _ = engine.compute(rollout.champion, features, FLAT, source)
        served.append(empty)
    return RunResult(served[0], written, skipped, end_side, extra=tuple(served[1:]))


# --- policy transitions ------------------------------------------------------------------------
def start(current: TrafficPolicy | None, signal_id: str, champion: int, candidate: int,
          shadows: tuple[int, ...] = (), share: float = 0.0) -> TrafficPolicy:
    base = current.champion if current is not None else champion
    if current is not None and current.challenger is not None:
        raise ValidationError(
            f"signal {signal_id!r} already rolls out version {current.challenger}: promote or roll"
            " it back first", details={"signal_id": signal_id, "challenger": current.challenger})
    if candidate == base:
        raise ValidationError(f"version {candidate} is already the champion of {signal_id!r}",
                              details={"signal_id": signal_id, "version": candidate})
    extra = tuple(v for v in shadows if v not in (base, candidate))
    return TrafficPolicy(signal_id, base, candidate, share, extra,
                         "shadow" if share == 0.0 else ("full" if share >= 1.0 else "canary"))


def advance(current: TrafficPolicy, share: float | None = None) -> TrafficPolicy:
    if current.challenger is None:
        raise ValidationError(f"signal {current.signal_id!r} has no rollout in progress: start one",
                              details={"signal_id": current.signal_id})
    if share is None:
        later = [s for s in CANARY_STEPS if s > current.share]
        if not later:
            raise ValidationError(
                f"version {current.challenger} already takes all traffic of {current.signal_id!r}:"
                " promote it (or roll it back)", details={"signal_id": current.signal_id})
        share = later[0]
    stage = "shadow" if share == 0.0 else ("full" if share >= 1.0 else "canary")
    return replace(current, share=float(share), stage=stage)


def promote(current: TrafficPolicy) -> TrafficPolicy:
    if current.challenger is None:
        raise ValidationError(f"signal {current.signal_id!r} has no challenger to promote",
                              details={"signal_id": current.signal_id})
    shadows = tuple(v for v in current.shadows if v != current.challenger)
    return replace(current, champion=current.challenger, challenger=None, share=0.0,
                   shadows=shadows, stage="none")


def rollback(current: TrafficPolicy) -> TrafficPolicy:
    return replace(current, challenger=None, share=0.0, stage="none")


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name (a container without passwd)
        return "cli:unknown"


# --- the service: validate, load, store, install ------------------------------------------------
class RolloutService:
    """Rollout commands over a store and an engine (the CLI's, or a server's). A server passes
    ``install=True``: the new resolution is swapped into its engine at once."""

    def __init__(self, engine: Engine, *, install: bool = False) -> None:
        self.engine = engine
        self.store = engine.store
        self.install = install
        self.last_swap_s = 0.0

    async def _definition(self, signal_id: str) -> SignalDefinition:
        definition = await self.store.get_signal(signal_id)
        if definition is None:
            raise SignalNotFound(f"no signal {signal_id!r}", details={"signal_id": signal_id})
        return definition

    async def _champion_version(self, definition: SignalDefinition) -> int:
        card = await self.engine.registry.resolve(definition.model_name, definition.model_ref)
        return card.version

    async def status(self, signal_id: str) -> dict[str, Any]:
        definition = await self._definition(signal_id)
        policy = await self.store.get_traffic_policy(signal_id)
        return {"signal_id": signal_id, "model_name": definition.model_name,
                "policy": policy.to_dict() if policy else None,
                "serving": policy.champion if policy else await self._champion_version(definition),
                "events": await self.store.rollout_events(signal_id)}

    async def apply(self, signal_id: str, action: str, actor: str, **options: Any) -> dict[str, Any]:
        """One change (start, advance, promote, rollback): validated, every version loaded and
        warmed up, stored with its audit row, then installed."""
        definition = await self._definition(signal_id)
        current = await self.store.get_traffic_policy(signal_id)
        if action == "start":
            new = start(current, signal_id, await self._champion_version(definition),
                        int(options["version"]), tuple(options.get("shadows") or ()),
                        float(options.get("share") or 0.0))
        elif current is None:
            raise ValidationError(f"signal {signal_id!r} has no rollout: start one first",
                                  details={"signal_id": signal_id})
        elif action == "advance":
            new = advance(current, options.get("share"))
        elif action == "promote":
            new = promote(current)
        elif action == "rollback":
            new = rollback(current)
        else:
            raise ValidationError(f"unknown rollout action {action!r}", details={"action": action})
        began = time.perf_counter()
        prepared = await prepare_rollout(self.engine, definition, new)  # load + verify (may refuse)
        warm_up(self.engine, prepared)
        stored = await self.store.set_traffic_policy(new, actor=actor, action=action)
        if self.install and definition.active:
            rollout = prepared.rollout
            assert rollout is not None
            installed = replace(prepared, rollout=replace(rollout, policy=stored))
            self.engine.install(signal_id, installed)
        self.last_swap_s = time.perf_counter() - began
        return {"signal_id": signal_id, "action": action, "actor": actor,
                "from": current.to_dict() if current else None, "to": stored.to_dict(),
                "applied_in_ms": round(self.last_swap_s * 1000.0, 3)}


def warm_up(engine: Engine, prepared: Prepared) -> None:
    """One prediction through every version (a zero row), so the first request pays no lazy
    initialisation."""
    rollout = prepared.rollout
    versions = [prepared] if rollout is None else [rollout.champion, *rollout.champion.shadows]
    for p in versions:
        try:
            p.runtime.predict(np.zeros((1, p.n_model_features)))
        except Exception:  # a model that fails on zeros still serves real rows
            continue
