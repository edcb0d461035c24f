"""The Store protocol: everything sigserve persists, behind one async interface.

Every implementation (DuckDB now, PostgreSQL next) passes the same contract suite in
``tests/integration/test_store_contract.py``. The rules that suite holds every store to:

- Writes are idempotent upserts on natural keys: features on (symbol, interval, ts, feature_key),
  candles on (symbol, interval, ts), signals on (signal_id, model_version, symbol, interval, ts).
- A batch is written whole or not at all (one transaction).
- A feature read at a ts returns that ts's row only: the pinned ``feature_key``, or else the row
  with the newest ``created_at``.
- Timestamps are ``datetime64[us]`` meaning UTC.
- Driver exceptions are translated to :mod:`sigserve.errors` (``store_unavailable`` when the
  database cannot be reached).

Usage::

    store = open_store(settings.store_url)      # sigserve.stores.open_store
    await store.open()                          # connect + apply migrations
    batch = await store.read_features("BTC", "1h", names, start=a, end=b)
    await store.write_signals(signals)
    await store.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..domain import (
    FeatureBatch,
    ModelCard,
    SignalBatch,
    SignalDefinition,
    Stage,
    TrafficPolicy,
    TrainingRun,
)


@dataclass(frozen=True)
class FeatureRead:
    """A feature read: the rows that carry every requested name, plus two counts of bars left
    out: ``incomplete`` (a row exists but its feature_key lacks a requested name) and
    ``missing`` (a candle bar in the window or list has no feature row at all)."""

    batch: FeatureBatch
    incomplete: int
    missing: int = 0


@dataclass(frozen=True)
class Candles:
    ts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray


class Store(Protocol):
    url: str

    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` when the store cannot answer."""

    async def schema_version(self) -> int:
        """The newest migration applied (``open()`` applies the pending ones)."""

    async def catalog_version(self) -> int:
        """A number that changes with every committed change that resolving a signal reads:
        signal definitions, traffic policies, model versions (stage, runtime) and feature
        statuses, made by any process. One cheap read: a server keeps a resolved signal while it
        stays the same (``Engine.prepare``). Only equality means anything."""

    # --- model registry -------------------------------------------------------------------
    async def insert_model(self, card: ModelCard) -> ModelCard:
        """Insert a new version; the store assigns ``version`` = last version + 1 atomically."""

    async def get_model(self, name: str, version: int) -> ModelCard | None: ...

    async def list_models(self, name: str | None = None) -> list[ModelCard]: ...

    async def set_model_stage(self, name: str, version: int, stage: Stage, actor: str) -> None:
        """Move a version to ``stage`` and record the event. Promoting to staging or production
        demotes the version that held that stage to ``registered``, in the same transaction."""

    async def update_model_extra(self, name: str, version: int, runtime: str | None,
                                 extra: dict[str, Any]) -> None: ...

    async def model_events(self, name: str) -> list[dict[str, Any]]: ...

    # --- feature registry and values ------------------------------------------------------
    async def register_features(self, names: list[str]) -> list[str]:
        """Register unknown names; return the newly registered ones. Known names keep their status."""

    async def feature_statuses(self, names: list[str]) -> dict[str, str]:
        """Status per known name (``registered`` or ``deprecated``); unknown names are absent."""

    async def set_feature_status(self, name: str, status: str) -> None: ...

    async def list_features(self) -> list[dict[str, Any]]: ...

    async def write_features(self, interval: str, feature_key: str, names: tuple[str, ...],
                             symbols: np.ndarray, ts: np.ndarray, values: np.ndarray) -> int:
        """Upsert feature rows (one transaction). A feature_key's names never change."""

    async def read_features(self, symbol: str, interval: str, names: tuple[str, ...], *,
                            start: np.datetime64 | None = None, end: np.datetime64 | None = None,
                            ts: np.ndarray | None = None,
                            feature_key: str | None = None) -> FeatureRead:
        """Rows in [start, end] (or exactly at ``ts``), columns in ``names`` order, ts ascending."""

    async def read_bar(self, symbol: str, interval: str, names: tuple[str, ...], ts: np.datetime64, *,
                       feature_key: str | None = None,
                       position: tuple[str, int] | None = None) -> tuple[FeatureRead, int]:
        """One bar's feature row (as ``read_features(..., ts=[ts])``) and, with ``position`` =
        ``(signal_id, model_version)``, the side before it (as ``position_sides``; FLAT without
        ``position`` or without a row): the live path's two reads, one round trip where the
        store can (PostgreSQL: one statement).

        Usage::

            read, side = await store.read_bar("BTC", "1h", names, ts, position=("trend", 3))
        """

    async def feature_window_stats(self, symbol: str, interval: str, start: np.datetime64 | None,
                                   end: np.datetime64 | None) -> tuple[int, np.datetime64 | None,
                                                                        np.datetime64 | None]:
        """(distinct bars with features, first ts, last ts) in the window."""

    async def newest_feature_ts(self, symbol: str, interval: str) -> np.datetime64 | None:
        """The newest bar of (symbol, interval) with a feature row of any feature_key; None if
        there is none. Cheap whatever the series' length (an index seek, or kept in memory):
        ``/api/v1/predict`` without a timestamp asks it on every request."""

    # --- candles --------------------------------------------------------------------------
    async def write_candles(self, symbol: str, interval: str, candles: Candles) -> int: ...

    async def read_candles(self, symbol: str, interval: str, start: np.datetime64 | None = None,
                           end: np.datetime64 | None = None) -> Candles: ...

    async def bars_missing_features(self, interval: str, symbol: str | None = None,
                                    start: np.datetime64 | None = None,
                                    end: np.datetime64 | None = None,
                                    limit: int = 20) -> tuple[int, list[tuple[str, np.datetime64]]]:
        """Count of candle bars without any feature row, and the first ``limit`` of them."""

    # --- signal definitions ---------------------------------------------------------------
    async def create_signal(self, definition: SignalDefinition) -> None:
        """Insert; ``ValidationError`` when the id exists."""

    async def get_signal(self, signal_id: str) -> SignalDefinition | None: ...

    async def list_signals(self) -> list[SignalDefinition]: ...

    async def set_signal_status(self, signal_id: str, status: str) -> None: ...

    # --- signal history -------------------------------------------------------------------
    async def write_signals(self, batch: SignalBatch) -> int:
        """Upsert on (signal_id, model_version, symbol, interval, ts), one transaction."""

    async def write_signal_batches(self, batches: Sequence[SignalBatch]) -> list[int]:
        """Several batches (any histories) in one call, each one's row count: the stream's
        write cycle. Every batch is checked before anything is written (one invalid batch
        writes none), and each is written whole or not at all. PostgreSQL writes them all in one
        transaction; DuckDB journals them with one sync (one INSERT applies them behind)."""

    async def position_sides(self, signal_id: str, model_version: int, symbol: str, interval: str,
                             before: np.ndarray) -> np.ndarray:
        """For each ts in ``before``: the side (LONG/SHORT/FLAT) after the newest non-hold,
        non-shadow signal of that signal, model version and symbol strictly before it.

        Scoped by model version so that every version's history is consistent on its own: a new
        champion starts from its own rows (backfill it to build them), never from a mix.
        """

    async def last_signal_ts(self, signal_id: str, symbol: str,
                             interval: str) -> np.datetime64 | None: ...

    async def read_signals(self, signal_id: str, symbol: str | None = None,
                           interval: str | None = None, start: np.datetime64 | None = None,
                           end: np.datetime64 | None = None,
                           limit: int | None = None) -> list[dict[str, Any]]: ...

    async def signal_action_counts(self, signal_id: str) -> dict[str, int]: ...

    # --- training runs --------------------------------------------------------------------
    async def save_training_run(self, run: TrainingRun) -> TrainingRun:
        """Upsert on ``run_id``. The first save sets ``created_at``; a later one keeps it. When the
        status is no longer ``running`` and ``completed_at`` is unset, it is set to now."""

    async def get_training_run(self, run_id: str) -> TrainingRun | None: ...

    async def list_training_runs(self, experiment: str | None = None) -> list[TrainingRun]:
        """Oldest first (created_at, then run_id)."""

    # --- traffic policies (rollouts) ------------------------------------------------------
    async def get_traffic_policy(self, signal_id: str) -> TrafficPolicy | None:
        """The signal's traffic policy (champion, challenger, share, shadows), or None."""

    async def list_traffic_policies(self) -> list[TrafficPolicy]:
        """Every stored policy, by signal_id."""

    async def set_traffic_policy(self, policy: TrafficPolicy, *, actor: str,
                                 action: str) -> TrafficPolicy:
        """Replace the signal's policy and append one audit row (``rollout_events``: when, actor,
        action, from = the previous policy or None, to = this one) in one transaction. Returns the
        stored policy (``updated_at``, ``updated_by`` set)."""

    async def rollout_events(self, signal_id: str) -> list[dict[str, Any]]:
        """The audit rows of a signal's policy changes, oldest first: ``at``, ``actor``,
        ``action``, ``from`` and ``to`` (policy dicts; ``from`` None for the first)."""
