"""The shared Store: PostgreSQL through asyncpg.

    store = PostgresStore("postgresql://user@db:5432/sigserve?schema=prod&pool_max=10")
    await store.open()        # pool + migrations (under an advisory lock)

URL parameters of our own, stripped before the DSN reaches asyncpg:

- ``schema=NAME``: every table lives in that schema. It is created when missing and is the
  ``search_path`` of every pooled connection. Without it, the server's default search_path holds.
- ``pool_max=N`` (default 10) and ``pool_min=N`` (default 1): the connection pool's bounds.
- ``connect_timeout=SECONDS`` (default 5): how long a (re)connection may take before the call
  answers ``store_unavailable``.

Any other query parameter is a server setting for every connection (asyncpg's rule), such as
``synchronous_commit=off``: a single-signal write then takes ~0.5 ms instead of a WAL flush
(~4 ms here), at the price of the last few writes if the server crashes.

Design notes:

- Several processes may share the database, so nothing that another process can change is
  cached here: only the column names of a ``feature_key`` (immutable once committed).
- Bulk writes (features, candles, multi-row signal batches) build PostgreSQL's binary COPY
  stream with numpy (fixed-width rows, no per-row Python), COPY it into a per-connection
  temporary table (``ON COMMIT DELETE ROWS``), delete the staged keys and INSERT, in one
  transaction; a unique violation from a concurrent writer reruns it as ``ON CONFLICT DO
  UPDATE`` (see :meth:`PostgresStore._merge`). A single signal is one prepared upsert.
- Window reads (and long ts lists) COPY out, in binary, ``(ts, created_at, vals)`` per
  feature_key plus the candles' close, in one REPEATABLE READ snapshot, and numpy decodes them
  and picks the newest created_at per ts: no Python object per row or value. A few bars (the
  live path) are one prepared statement.
- SQL strings are fixed (a finite set per method), so asyncpg's per-connection statement cache
  prepares each once. COPY takes no parameters: its values are quoted literals.
- Timestamps are ``timestamp`` (without time zone) meaning UTC, like ``datetime64[us]``.
- Driver errors are translated at one boundary (:meth:`PostgresStore._connection`). A lost server
  gives ``store_unavailable``; the pool reconnects on the next call once the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from ..domain import (
    ACTIONS,
    FLAT,
    FeatureBatch,
    ModelCard,
    Policy,
    SignalBatch,
    SignalDefinition,
    Stage,
    Task,
    TrafficPolicy,
    TrainingRun,
)
from ..errors import (
    InternalError,
    SignalNotFound,
    SigserveError,
    StoreUnavailable,
    ValidationError,
    missing_extra,
)
from ..timeutil import TS_DTYPE, unique_ts
from ._common import check_signal_batches, check_signals
from .base import Candles, FeatureRead

_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Advisory lock classes (first key of the two-int form).
_LOCK_MIGRATE = 0x5167_0001
_LOCK_MODEL = 0x5167_0002

_NOW = "(now() AT TIME ZONE 'UTC')"
_LANE_SIZE = 4  # connections kept out of the pool for the hot path (see PostgresStore._lane)
_ANALYZE_ROWS = 10_000  # a bulk write at least this large refreshes the table's statistics

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE model_registry (
            name text NOT NULL, version integer NOT NULL, flavor text NOT NULL,
            sha256 text, artifact_path text, task text NOT NULL,
            feature_names text[] NOT NULL, classes text[] NOT NULL,
            stage text NOT NULL DEFAULT 'registered', runtime text,
            metrics jsonb, extra jsonb, created_at timestamp NOT NULL, updated_at timestamp NOT NULL,
            PRIMARY KEY (name, version),
            CHECK (stage IN ('registered','staging','production','retired','rejected_by_operator'))
        );
        CREATE TABLE model_events (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name text NOT NULL, version integer NOT NULL, from_stage text,
            to_stage text NOT NULL, actor text NOT NULL, occurred_at timestamp NOT NULL
        );
        CREATE INDEX model_events_by_name ON model_events (name, occurred_at);
        CREATE TABLE feature_registry (
            name text PRIMARY KEY, status text NOT NULL,
            created_at timestamp NOT NULL, updated_at timestamp NOT NULL,
            CHECK (status IN ('registered','deprecated'))
        );
        CREATE TABLE feature_sets (
            feature_key text PRIMARY KEY, names text[] NOT NULL, created_at timestamp NOT NULL
        );
        CREATE TABLE feature_values (
            symbol text NOT NULL, interval text NOT NULL, ts timestamp NOT NULL,
            feature_key text NOT NULL, vals double precision[] NOT NULL,
            created_at timestamp NOT NULL,
            PRIMARY KEY (symbol, interval, ts, feature_key)
        );
        CREATE TABLE feature_coverage (
            symbol text NOT NULL, interval text NOT NULL, feature_key text NOT NULL,
            first_ts timestamp NOT NULL, last_ts timestamp NOT NULL,
            PRIMARY KEY (symbol, interval, feature_key)
        );
        CREATE TABLE candles (
            symbol text NOT NULL, interval text NOT NULL, ts timestamp NOT NULL,
            open double precision, high double precision, low double precision,
            close double precision, volume double precision, created_at timestamp NOT NULL,
            PRIMARY KEY (symbol, interval, ts)
        );
        CREATE TABLE signal_definitions (
            signal_id text PRIMARY KEY, model_name text NOT NULL, model_ref text NOT NULL,
            interval text NOT NULL, symbols text[] NOT NULL, policy jsonb NOT NULL,
            status text NOT NULL, feature_key text,
            created_at timestamp NOT NULL, updated_at timestamp NOT NULL,
            CHECK (status IN ('active','retired'))
        );
        CREATE TABLE signal_history (
            signal_id text NOT NULL, model_version integer NOT NULL, symbol text NOT NULL,
            interval text NOT NULL, ts timestamp NOT NULL, action text NOT NULL,
            confidence double precision NOT NULL, raw_output double precision[] NOT NULL,
            entry_price double precision, stop_loss double precision,
            take_profit double precision, recommended_size double precision,
            model_name text NOT NULL, model_sha256 text NOT NULL, feature_key text,
            source text NOT NULL, latency_ms double precision, flags text NOT NULL DEFAULT '',
            shadow boolean NOT NULL DEFAULT false, created_at timestamp NOT NULL,
            PRIMARY KEY (signal_id, model_version, symbol, interval, ts),
            CHECK (source IN ('stream','catchup_scan','historical_replay')),
            CHECK (action IN ('hold','buy','sell','close_long','close_short')),
            CHECK (confidence >= 0 AND confidence <= 1)
        );
        -- position lookups: the newest non-hold, non-shadow signal before a ts
        CREATE INDEX signal_history_events ON signal_history
            (signal_id, model_version, symbol, interval, ts) WHERE action <> 'hold' AND NOT shadow;
        -- reads by signal, symbol and window across versions (read_signals, last_signal_ts)
        CREATE INDEX signal_history_by_symbol ON signal_history (signal_id, symbol, interval, ts);
        CREATE VIEW predictions AS
            SELECT ts, 'models:/' || model_name || '/' || model_version AS model_path,
                   raw_output[array_upper(raw_output, 1)] AS y_pred, feature_key,
                   symbol || '/' || interval AS dataset, created_at,
                   signal_id, symbol, interval, model_sha256
            FROM signal_history WHERE NOT shadow;
        """,
    ),
]

MIGRATIONS.append((
    2,
    """
    CREATE TABLE training_runs (
        run_id text PRIMARY KEY, model_type text NOT NULL, experiment text NOT NULL,
        config_hash text NOT NULL, dataset_version text NOT NULL, metrics jsonb, details jsonb,
        status text NOT NULL, created_at timestamp NOT NULL, completed_at timestamp,
        CHECK (status IN ('running','completed','failed'))
    );
    CREATE INDEX training_runs_by_experiment ON training_runs (experiment, created_at);
    """,
))

MIGRATIONS.append((
    3,
    """
    CREATE TABLE traffic_policies (
        signal_id text PRIMARY KEY, policy jsonb NOT NULL, updated_at timestamp NOT NULL,
        updated_by text NOT NULL
    );
    CREATE TABLE rollout_events (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, signal_id text NOT NULL,
        occurred_at timestamp NOT NULL, actor text NOT NULL, action text NOT NULL,
        from_policy jsonb, to_policy jsonb NOT NULL
    );
    CREATE INDEX rollout_events_by_signal ON rollout_events (signal_id, id);
    """,
))

MIGRATIONS.append((
    4,
    """
    -- One number that moves with every change a signal's resolution reads (definitions, traffic
    -- policies, model versions, feature statuses), whoever makes it: servers poll it to keep a
    -- resolved signal until it moves. Row triggers, so a statement that changes nothing (ON
    -- CONFLICT DO NOTHING) does not move it.
    CREATE TABLE catalog_version (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), version bigint NOT NULL
    );
    INSERT INTO catalog_version VALUES (true, 0);
    CREATE FUNCTION bump_catalog_version() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    BEGIN
        UPDATE catalog_version SET version = version + 1;
        RETURN NULL;
    END $$;
    CREATE TRIGGER model_registry_catalog AFTER INSERT OR UPDATE OR DELETE ON model_registry
        FOR EACH ROW EXECUTE FUNCTION bump_catalog_version();
    CREATE TRIGGER feature_registry_catalog AFTER INSERT OR UPDATE OR DELETE ON feature_registry
        FOR EACH ROW EXECUTE FUNCTION bump_catalog_version();
    CREATE TRIGGER signal_definitions_catalog AFTER INSERT OR UPDATE OR DELETE ON signal_definitions
        FOR EACH ROW EXECUTE FUNCTION bump_catalog_version();
    CREATE TRIGGER traffic_policies_catalog AFTER INSERT OR UPDATE OR DELETE ON traffic_policies
        FOR EACH ROW EXECUTE FUNCTION bump_catalog_version();
    CREATE TRIGGER model_registry_catalog_truncate AFTER TRUNCATE ON model_registry
        FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_version();
    CREATE TRIGGER feature_registry_catalog_truncate AFTER TRUNCATE ON feature_registry
        FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_version();
    CREATE TRIGGER signal_definitions_catalog_truncate AFTER TRUNCATE ON signal_definitions
        FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_version();
    CREATE TRIGGER traffic_policies_catalog_truncate AFTER TRUNCATE ON traffic_policies
        FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_version();
    """,
))

# Staging tables for COPY, one set per connection (created when the pool opens it).
_TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS _in_features (sym int4, ts timestamp, vals float8[])
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _in_candles (ts timestamp, open float8, high float8, low float8,
    close float8, volume float8) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _in_signals (ts timestamp, action int2, confidence float8,
    raw_output float8[], entry_price float8, stop_loss float8, take_profit float8,
    recommended_size float8, latency_ms float8, key_idx int4, flags_idx int4)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _in_histories (hist int4, ts timestamp, action int2,
    confidence float8, raw_output float8[], entry_price float8, stop_loss float8,
    take_profit float8, recommended_size float8, latency_ms float8, key_idx int4, flags_idx int4)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS _in_ts (ts timestamp) ON COMMIT DELETE ROWS;
"""

_SIGNAL_COLUMNS = (
    "signal_id, model_version, symbol, interval, ts, action, confidence, raw_output, entry_price,"
    " stop_loss, take_profit, recommended_size, model_name, model_sha256, feature_key, source,"
    " latency_ms, flags, shadow, created_at"
)
_SIGNAL_UPSERT = (
    " ON CONFLICT (signal_id, model_version, symbol, interval, ts) DO UPDATE SET"
    " action = excluded.action, confidence = excluded.confidence, raw_output = excluded.raw_output,"
    " entry_price = excluded.entry_price, stop_loss = excluded.stop_loss,"
    " take_profit = excluded.take_profit, recommended_size = excluded.recommended_size,"
    " model_name = excluded.model_name, model_sha256 = excluded.model_sha256,"
    " feature_key = excluded.feature_key, source = excluded.source, latency_ms = excluded.latency_ms,"
    " flags = excluded.flags, shadow = excluded.shadow, created_at = excluded.created_at"
)
_INSERT_SIGNAL_ROW = (
    f"INSERT INTO signal_history ({_SIGNAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
    " NULLIF($9::float8, 'NaN'), NULLIF($10::float8, 'NaN'), NULLIF($11::float8, 'NaN'),"
    f" NULLIF($12::float8, 'NaN'), $13, $14, $15, $16, $17, $18, $19, {_NOW})" + _SIGNAL_UPSERT
)
_INSERT_SIGNALS_STAGED = (
    f"INSERT INTO signal_history ({_SIGNAL_COLUMNS}) SELECT $1, $2, $3, $4, ts,"
    " ($5::text[])[action + 1], confidence, raw_output, NULLIF(entry_price, 'NaN'),"
    " NULLIF(stop_loss, 'NaN'), NULLIF(take_profit, 'NaN'), NULLIF(recommended_size, 'NaN'),"
    " $6, $7, ($8::text[])[key_idx], $9, latency_ms, ($10::text[])[flags_idx], $11,"
    f" {_NOW} FROM _in_signals"
)
_DELETE_STAGED_SIGNALS = (
    "DELETE FROM signal_history h USING _in_signals i WHERE h.signal_id = $1"
    " AND h.model_version = $2 AND h.symbol = $3 AND h.interval = $4"
    " AND h.ts BETWEEN $5 AND $6 AND h.ts = i.ts"
)
# Several histories' rows upserted by one statement: ``hist`` is a row's 1-based index into the
# per-history arrays $1-$4, $6, $7, $9 and $11 (:func:`_history_params`); the rows come from
# ``{rows}`` and each row's raw output is ``{raw}``.
_INSERT_HISTORIES = (
    f"INSERT INTO signal_history ({_SIGNAL_COLUMNS}) SELECT ($1::text[])[hist],"
    " ($2::int4[])[hist], ($3::text[])[hist], ($4::text[])[hist], ts, ($5::text[])[action + 1],"
    " confidence, {raw}, NULLIF(entry_price, 'NaN'), NULLIF(stop_loss, 'NaN'),"
    " NULLIF(take_profit, 'NaN'), NULLIF(recommended_size, 'NaN'), ($6::text[])[hist],"
    " ($7::text[])[hist], ($8::text[])[key_idx], ($9::text[])[hist], latency_ms,"
    f" ($10::text[])[flags_idx], ($11::bool[])[hist], {_NOW} FROM {{rows}}"
)
# ... staged in ``_in_histories`` by a COPY (ON CONFLICT is added when it runs)
_INSERT_HISTORIES_STAGED = _INSERT_HISTORIES.format(raw="raw_output", rows="_in_histories")
# ... or the rows as parameters (a write cycle's few dozen): one statement, one round trip, no
# staging table and no transaction block. ``$12`` holds every row's raw output end to end, ``$13``
# wide each; ``n`` is a row's 1-based place.
_INSERT_HISTORIES_ARRAYS = _INSERT_HISTORIES.format(
    raw="($12::float8[])[(n - 1) * $13::int4 + 1 : n * $13::int4]",
    rows="unnest($14::int4[], $15::timestamp[], $16::int2[], $17::float8[], $18::float8[],"
         " $19::float8[], $20::float8[], $21::float8[], $22::float8[], $23::int4[], $24::int4[])"
         " WITH ORDINALITY AS r(hist, ts, action, confidence, entry_price, stop_loss, take_profit,"
         " recommended_size, latency_ms, key_idx, flags_idx, n)") + _SIGNAL_UPSERT
_ARRAY_ROWS_MAX = 100  # a write of more rows goes through COPY (cheaper for the caller from ~100 rows on)
_SIDE_SQL = "(CASE action WHEN 'buy' THEN 1 WHEN 'sell' THEN -1 ELSE 0 END)::int2"
_POSITION_EVENTS = (
    f"SELECT * FROM ((SELECT ts, {_SIDE_SQL} FROM signal_history WHERE signal_id=$1"
    " AND model_version=$2 AND symbol=$3 AND interval=$4 AND action <> 'hold' AND NOT shadow"
    f" AND ts < $5 ORDER BY ts DESC LIMIT 1) UNION ALL (SELECT ts, {_SIDE_SQL} FROM signal_history"
    " WHERE signal_id=$1 AND model_version=$2 AND symbol=$3 AND interval=$4 AND action <> 'hold'"
    " AND NOT shadow AND ts >= $5 AND ts < $6)) AS e ORDER BY 1"
)

_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds: PostgreSQL's epoch
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)
_FLOAT8_OID = 701
_SCALARS = {"i2": ">i2", "i4": ">i4", "f8": ">f8", "ts": ">i8"}
_ROWS_READ_MAX_TS = 64  # ts lists up to this size read in one statement; larger ones via COPY

_Part = TypeVar("_Part")


@dataclass(frozen=True)
class _MergeStep:
    """One upsert of :meth:`PostgresStore._merge_steps`: COPY ``payload`` into ``staging``,
    then ``delete`` + ``insert`` (or ``insert`` + ``on_conflict``; always so without a
    ``delete``), then ``after``; with no payload, ``insert`` alone (a one-row upsert statement)."""

    staging: str
    payload: memoryview | None
    delete: tuple[str, Sequence[Any]] | None
    insert: tuple[str, Sequence[Any]]
    on_conflict: str
    after: tuple[str, Sequence[Any]] | None = None


class _StepsAsNeeded(Sequence[_MergeStep], Generic[_Part]):
    """A write's steps (one per batch, or per group of histories), each made when first read: a
    write encodes them one at a time between the transaction's round trips (the caller's loop
    free while each runs), not all at once before them (0.4-0.7 ms of one loop turn for four
    symbols' rows when each symbol was a step)."""

    def __init__(self, make: Callable[[_Part], _MergeStep], batches: Sequence[_Part]) -> None:
        self._make, self._batches = make, batches
        self._made: dict[int, _MergeStep] = {}

    def __len__(self) -> int:
        return len(self._batches)

    @overload
    def __getitem__(self, index: int) -> _MergeStep: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[_MergeStep]: ...

    def __getitem__(self, index: int | slice) -> _MergeStep | Sequence[_MergeStep]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        step = self._made.get(index)
        if step is None:
            if not 0 <= index < len(self._batches):
                raise IndexError(index)
            step = self._made[index] = self._make(self._batches[index])
        return step


_asyncpg: Any = None


def _driver() -> Any:
    """The asyncpg module, imported on first use (it is the ``postgres`` extra)."""
    global _asyncpg
    if _asyncpg is None:
        try:
            import asyncpg
        except ImportError as exc:
            raise missing_extra("asyncpg", "postgres") from exc
        _asyncpg = asyncpg
    return _asyncpg


async def _keep_session(con: Any) -> None:
    """Pool release without asyncpg's reset query (a round trip per call): this store changes
    no session state after a connection's init (no SET, LISTEN, cursors or held advisory locks
    per call), and its temporary staging tables and plan_cache_mode must survive."""


async def _give_back(pool: Any, con: Any) -> None:
    """Release a borrowed connection to its pool; one the pool took back already (a connection
    the server dropped is released at once) is left alone."""
    with contextlib.suppress(Exception):
        await pool.release(con)


def _is_broken(con: Any) -> bool:
    """Whether a pooled connection died under us. A connection that the server dropped is
    handed back to the pool at once, and its proxy then refuses every call (is_closed too)."""
    try:
        return bool(con.is_closed())
    except Exception:
        return True


def _py_ts(ts: np.datetime64 | None) -> datetime | None:
    if ts is None:
        return None
    value: datetime = np.asarray(ts, dtype=TS_DTYPE).astype(object).item()
    return value


def _py_ts_list(ts: np.ndarray) -> list[datetime]:
    return list(np.asarray(ts, dtype=TS_DTYPE).astype(object).tolist())


def _np_ts(value: Any) -> np.datetime64 | None:
    return None if value is None else np.datetime64(value, "us")


def _iso(value: datetime | None) -> str:
    return value.replace(tzinfo=UTC).isoformat() if value else ""


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _codes(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Distinct strings in first-seen order, and each row's 1-based index into them."""
    items = np.asarray(values, dtype=object).tolist()
    distinct = list(dict.fromkeys(items))
    if len(distinct) <= 1:
        return distinct, np.ones(len(items), dtype=np.int32)
    lookup = {value: i + 1 for i, value in enumerate(distinct)}
    return distinct, np.fromiter(map(lookup.__getitem__, items), dtype=np.int32, count=len(items))


def _history_groups(batches: Sequence[SignalBatch]) -> list[list[SignalBatch]]:
    """A write's batches in order, in runs that one staged upsert can take: each history (signal,
    version, symbol, interval) once in a run, one raw-output width. A history met again starts
    the next run, so its later rows still replace the earlier ones, as in one step a batch."""
    groups: list[list[SignalBatch]] = []
    seen: set[tuple[str, int, str, str]] = set()
    width: tuple[int, ...] | None = None
    for batch in batches:
        key = (batch.signal_id, int(batch.model_version), batch.symbol, batch.interval)
        shape = tuple(np.shape(batch.raw_output)[1:])
        if not groups or key in seen or shape != width:
            groups.append([])
            seen, width = set(), shape
        groups[-1].append(batch)
        seen.add(key)
    return groups


class _SignalColumns(NamedTuple):
    """A write's rows end to end, checked: what its COPY payload or its parameters are made of."""

    sizes: list[int]
    ts: np.ndarray
    actions: np.ndarray  # int16
    confidence: np.ndarray
    raw: np.ndarray  # (rows, width)
    levels: list[np.ndarray]  # entry_price, stop_loss, take_profit, recommended_size, latency_ms
    keys: list[str]  # distinct feature keys; key_idx points into them, 1-based
    key_idx: np.ndarray
    flags: list[str]
    flags_idx: np.ndarray

    def hist(self) -> np.ndarray:
        """Each row's 1-based batch (history) index."""
        return np.repeat(np.arange(1, len(self.sizes) + 1, dtype=np.int32), self.sizes)


def _signal_columns(batches: Sequence[SignalBatch]) -> _SignalColumns:
    def column(name: str, dtype: Any = np.float64) -> np.ndarray:
        parts = [np.asarray(getattr(batch, name), dtype=dtype) for batch in batches]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)  # a bulk load: no copy

    sizes = [len(batch) for batch in batches]
    confidence, actions = column("confidence"), column("action", np.int16)
    check_signal_batches(batches, confidence, actions)
    raw_parts = [np.asarray(batch.raw_output, dtype=np.float64).reshape(size, -1)
                 for batch, size in zip(batches, sizes, strict=True)]
    keys, key_idx = _codes(column("feature_keys", object))
    flags, flags_idx = _codes(column("flags", object))
    return _SignalColumns(
        sizes, column("ts", TS_DTYPE), actions, confidence,
        raw_parts[0] if len(raw_parts) == 1 else np.concatenate(raw_parts),
        [column(name) for name in ("entry_price", "stop_loss", "take_profit", "recommended_size", "latency_ms")],
        keys, key_idx, flags, flags_idx)


def _staged_signals(batches: Sequence[SignalBatch], *,
                    with_history: bool) -> tuple[memoryview, _SignalColumns]:
    """The batches' rows, checked, as the COPY payload of ``_in_signals`` (or, ``with_history``,
    of ``_in_histories``: each row's 1-based batch index first); with the columns it was made
    of (their ts, and the distinct feature keys and flags its index columns point into)."""
    c = _signal_columns(batches)
    history = [("i4", c.hist())] if with_history else []
    payload = _copy_payload([
        *history, ("ts", c.ts), ("i2", c.actions), ("f8", c.confidence), ("f8[]", c.raw),
        *(("f8", level) for level in c.levels), ("i4", c.key_idx), ("i4", c.flags_idx)])
    return payload, c


def _history_params(batches: Sequence[SignalBatch], c: _SignalColumns) -> tuple[Any, ...]:
    """$1-$11 of :data:`_INSERT_HISTORIES`: each history's constants, and the distinct feature
    keys and flags that the rows' index columns point into."""
    return (
        [b.signal_id for b in batches], [int(b.model_version) for b in batches],
        [b.symbol for b in batches], [b.interval for b in batches], list(ACTIONS),
        [b.model_name for b in batches], [b.model_sha256 for b in batches],
        [_opt_str(k) for k in c.keys], [b.source for b in batches], [_opt_str(f) for f in c.flags],
        [bool(b.shadow) for b in batches])


def _history_arrays(batches: Sequence[SignalBatch]) -> tuple[Any, ...]:
    """The parameters of :data:`_INSERT_HISTORIES_ARRAYS` for the batches (distinct histories,
    one raw-output width), checked."""
    c = _signal_columns(batches)
    return (
        *_history_params(batches, c), c.raw.reshape(-1).tolist(), int(c.raw.shape[1]),
        c.hist().tolist(), _py_ts_list(c.ts), c.actions.tolist(), c.confidence.tolist(),
        *(level.tolist() for level in c.levels), c.key_idx.tolist(), c.flags_idx.tolist())


def _copy_payload(columns: list[tuple[str, np.ndarray]]) -> memoryview:
    """PostgreSQL's binary COPY stream for fixed-width rows, built by numpy.

    Each column is ``(kind, values)``: kind ``i2``/``i4``/``f8`` (n,), ``ts`` datetime64 (n,), or
    ``f8[]`` a float matrix (n, k) sent as one ``float8[]`` per row. No value may be NULL (a NaN
    is a value). Returns a memoryview (asyncpg reads ``bytes`` as a file path).
    """
    n = int(columns[0][1].shape[0])
    fields: list[tuple[Any, ...]] = [("count", ">i2")]
    for j, (kind, values) in enumerate(columns):
        fields.append((f"len{j}", ">i4"))
        if kind == "f8[]":
            k = int(values.shape[1])
            fields.append((f"hdr{j}", ">i4", (5 if k else 3,)))
            if k:
                fields.append((f"el{j}", [("len", ">i4"), ("v", ">f8")], (k,)))
        else:
            fields.append((f"v{j}", _SCALARS[kind]))
    rows = np.empty(n, dtype=np.dtype(fields))
    rows["count"] = len(columns)
    for j, (kind, values) in enumerate(columns):
        if kind == "f8[]":
            k = int(values.shape[1])
            rows[f"len{j}"] = 20 + 12 * k if k else 12
            # ndim, has-nulls flag, element type, then (for ndim 1) length and lower bound
            rows[f"hdr{j}"] = [1, 0, _FLOAT8_OID, k, 1] if k else [0, 0, _FLOAT8_OID]
            if k:
                rows[f"el{j}"]["len"] = 8
                rows[f"el{j}"]["v"] = values
        elif kind == "ts":
            rows[f"len{j}"] = 8
            rows[f"v{j}"] = np.asarray(values, dtype=TS_DTYPE).view(np.int64) - _PG_EPOCH_US
        else:
            rows[f"len{j}"] = np.dtype(_SCALARS[kind]).itemsize
            rows[f"v{j}"] = values
    return memoryview(b"".join((_COPY_HEADER, rows.tobytes(), _COPY_TRAILER)))


def _literal(value: str) -> str:
    """A SQL string literal (COPY takes no parameters); standard_conforming_strings is on."""
    if "\x00" in value:
        raise ValidationError("text values may not contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


def _ts_literal(ts: Any) -> str:
    return f"'{np.datetime_as_string(np.asarray(ts, dtype=TS_DTYPE))}'::timestamp"


def _pg_ts(values: np.ndarray) -> np.ndarray:
    """PostgreSQL binary timestamps (microseconds since 2000-01-01) as datetime64[us]."""
    return (values.astype(np.int64) + _PG_EPOCH_US).view(TS_DTYPE)


def _column_index(stored: tuple[str, ...] | None, names: tuple[str, ...]) -> list[int] | None:
    """Where each requested name sits in a key's vector; None when the key lacks one."""
    if stored is None:
        return None
    position = {name: i for i, name in enumerate(stored)}
    if any(name not in position for name in names):
        return None
    return [position[name] for name in names]


def _feature_layout(width: int | None) -> np.dtype:
    """One binary COPY tuple of (ts, created_at[, vals]); ``width`` None: no vals column."""
    fields: list[tuple[Any, ...]] = [("count", ">i2"), ("l0", ">i4"), ("ts", ">i8"),
                                     ("l1", ">i4"), ("created", ">i8")]
    if width is not None:
        fields += [("l2", ">i4"), ("hdr", ">i4", (5 if width else 3,))]
        if width:
            fields.append(("el", [("len", ">i4"), ("v", ">f8")], (width,)))
    return np.dtype(fields)


_CLOSE_LAYOUT = np.dtype([("count", ">i2"), ("l0", ">i4"), ("ts", ">i8"), ("l1", ">i4"),
                          ("close", ">f8")])
_CANDLE_LAYOUT = np.dtype([("count", ">i2"), ("l0", ">i4"), ("ts", ">i8")]
                          + [(f, s) for c in ("open", "high", "low", "close", "volume")
                             for f, s in ((f"l_{c}", ">i4"), (c, ">f8"))])
_EVENT_LAYOUT = np.dtype([("count", ">i2"), ("l0", ">i4"), ("ts", ">i8"), ("l1", ">i4"),
                          ("side", ">i2")])


async def _copy_out(con: Any, query: str) -> bytes:
    chunks: list[bytes] = []

    async def sink(data: Any) -> None:
        chunks.append(bytes(data))

    await con.copy_from_query(query, output=sink, format="binary")
    return b"".join(chunks)


def _parse_copy(blob: bytes, layout: np.dtype) -> np.ndarray:
    """A binary COPY stream of fixed-width tuples as a structured array (no copy)."""
    if len(blob) < 21 or not blob.startswith(_COPY_HEADER[:11]):
        raise InternalError("unexpected COPY output from the store")
    start = 19 + int.from_bytes(blob[15:19], "big")
    body = memoryview(blob)[start:len(blob) - 2]
    if len(body) % layout.itemsize:
        raise InternalError(f"COPY output of {len(body)} bytes is not a whole number of"
                            f" {layout.itemsize}-byte rows")
    return np.frombuffer(body, dtype=layout)


def _parse_float_arrays(blob: bytes, rows: int, width: int) -> np.ndarray:
    """``array_send`` output of ``rows`` one-dimensional float8 arrays of ``width`` (no NULLs)."""
    if width == 0:
        return np.empty((rows, 0), dtype=np.float64)
    layout = np.dtype([("hdr", ">i4", (5,)), ("el", [("len", ">i4"), ("v", ">f8")], (width,))])
    if len(blob) != rows * layout.itemsize:
        raise InternalError(f"feature vectors of an unexpected size ({len(blob)} bytes for {rows}"
                            f" rows of {width} values)")
    return np.frombuffer(blob, dtype=layout)["el"]["v"].astype(np.float64)


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The DSN for asyncpg, and our own query parameters taken out of it."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("schema", "pool_max", "pool_min", "connect_timeout"):
            ours[key] = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), ours


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore:
    """Store on PostgreSQL (asyncpg pool, versioned migrations, COPY for bulk writes).

    Usage::

        store = PostgresStore("postgresql://postgres@127.0.0.1:5432/test?schema=sigserve")
        await store.open()
    """

    def __init__(self, url: str, *, max_size: int | None = None, min_size: int | None = None,
                 connect_timeout: float | None = None) -> None:
        _driver()
        self.url = _redact(url)
        self._dsn, ours = _split_url(url)
        self.schema = ours.get("schema") or None
        if self.schema is not None and not _SCHEMA_RE.match(self.schema):
            raise ValidationError(f"invalid schema name {self.schema!r} in the store URL: use letters,"
                                  " digits and underscores", details={"schema": self.schema})
        try:
            self._max_size = int(max_size if max_size is not None else ours.get("pool_max", 10))
            self._min_size = int(min_size if min_size is not None else ours.get("pool_min", 1))
            self._connect_timeout = float(connect_timeout if connect_timeout is not None
                                          else ours.get("connect_timeout", 5))
        except ValueError as exc:
            raise ValidationError(f"invalid pool option in the store URL: {exc}",
                                  details={"store": self.url}) from exc
        if not 1 <= self._min_size <= self._max_size:
            raise ValidationError("the store URL needs 1 <= pool_min <= pool_max",
                                  details={"pool_min": self._min_size, "pool_max": self._max_size})
        self._pool: Any = None
        # Connections borrowed from the pool and kept out of it between calls: taking one is a
        # list pop, where the pool's acquire and release cost ~150 us and a loop turn per call
        # (release runs in a shielded task). At most _LANE_SIZE, and never the pool's last one.
        self._lane: list[Any] = []
        self._lane_size = min(_LANE_SIZE, self._max_size - 1)
        self._feature_sets: dict[str, tuple[str, ...]] = {}

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        apg = _driver()
        settings = {"timezone": "UTC", "application_name": "sigserve",
                    "standard_conforming_strings": "on"}
        if self.schema is not None:
            settings["search_path"] = f'"{self.schema}"'
        try:
            self._pool = await apg.create_pool(
                dsn=self._dsn, min_size=self._min_size, max_size=self._max_size,
                init=self._init_connection, reset=_keep_session, server_settings=settings,
                timeout=self._connect_timeout)
        except ValueError as exc:  # asyncpg's ClientConfigurationError among them
            raise ValidationError(f"invalid PostgreSQL store URL: {exc}",
                                  details={"store": self.url}) from exc
        except Exception as exc:
            if str(getattr(exc, "sqlstate", "")).startswith("42"):  # e.g. an unknown server setting
                raise ValidationError(f"the PostgreSQL server refused the store URL's settings: {exc}",
                                      details={"store": self.url}) from exc
            raise self._translate(exc, False) from exc
        try:
            async with self._connection() as con:
                await self._migrate(con)
        except BaseException:
            await self.close()
            raise

    async def warm_up(self, connections: int = 2) -> None:
        """Open ``connections`` pooled connections now (at most the lane's size) and plan the
        live path's statements on each, so that the first bars after a start neither connect
        nor plan: a stream worker's first write cycle and first position read ran side by side,
        and the second one waited ~10 ms for a new connection. Writes nothing.

        Usage::

            await store.open()
            await store.warm_up()   # before a latency-sensitive driver takes traffic
        """
        at = datetime(2000, 1, 1)
        key = ("", 0, "", "", at, at)
        staged = ("", 0, "", "", list(ACTIONS), "", "", [None], "stream", [""], False)
        histories_staged = ([""], [0], [""], [""], list(ACTIONS), [""], [""], [None], ["stream"], [""], [False])
        async with contextlib.AsyncExitStack() as stack:
            held = [await stack.enter_async_context(self._connection())
                    for _ in range(max(1, min(connections, self._lane_size)))]
            for con in held:
                # Run for real where that changes nothing, so that the driver's statement cache
                # holds them too (its codecs built): a read of no history, and the staged write's
                # statements over the empty staging table (ON COMMIT DELETE ROWS: empty between
                # transactions). The others are planned only.
                await con.fetch(_POSITION_EVENTS, *key)
                await con.execute(_DELETE_STAGED_SIGNALS, *key)
                await con.execute(_INSERT_SIGNALS_STAGED, *staged)
                await con.execute("DELETE FROM _in_signals")
                await con.execute(_INSERT_HISTORIES_STAGED + _SIGNAL_UPSERT, *histories_staged)
                await con.execute(_INSERT_HISTORIES_ARRAYS, *histories_staged, [], 0, *([[]] * 11))
                for query in (_INSERT_SIGNAL_ROW, _INSERT_SIGNALS_STAGED + _SIGNAL_UPSERT):
                    await con.prepare(query)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        lane, self._lane = self._lane, []
        for con in lane:
            await _give_back(pool, con)
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except Exception:
            pool.terminate()

    async def ping(self) -> None:
        async with self._connection() as con:
            await con.fetchval("SELECT 1", timeout=self._connect_timeout)

    async def schema_version(self) -> int:
        async with self._connection() as con:
            return int(await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))

    async def catalog_version(self) -> int:
        async with self._connection() as con:
            return int(await con.fetchval("SELECT version FROM catalog_version"))

    @staticmethod
    async def _init_connection(con: Any) -> None:
        await con.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        await con.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        if con.get_server_version() >= (12, 0):
            # Every parameterised statement here is prepared once per connection (asyncpg's
            # cache) and is a key or narrow-range seek, so one generic plan fits every call. By
            # default PostgreSQL plans a custom plan per call while that looks cheaper: measured
            # on the one-bar read, ~0.7-1.0 ms of planning per call against 0.28 ms generic.
            # ANALYZE (which bulk loads run) invalidates the cached plans, so a plan made on an
            # empty table does not outlive the load. Bulk paths use COPY or literals: unaffected.
            await con.execute("SET plan_cache_mode = force_generic_plan")
        await con.execute(_TEMP_TABLES)

    async def _migrate(self, con: Any) -> None:
        lock_name = f"sigserve.migrate:{self.schema or ''}"
        await con.execute("SELECT pg_advisory_lock($1::int4, hashtext($2))", _LOCK_MIGRATE, lock_name)
        try:
            if self.schema is not None:
                await con.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await con.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                              " applied_at timestamp NOT NULL)")
            applied = {r[0] for r in await con.fetch("SELECT version FROM schema_migrations")}
            for version, sql in MIGRATIONS:
                if version in applied:
                    continue
                async with con.transaction():
                    await con.execute(sql)
                    await con.execute(f"INSERT INTO schema_migrations VALUES ($1, {_NOW})", version)
        finally:
            if not con.is_closed():
                await con.execute("SELECT pg_advisory_unlock($1::int4, hashtext($2))", _LOCK_MIGRATE,
                                  lock_name)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; driver exceptions become sigserve errors here, and only here."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("the store is not open", details={"store": self.url})
        broken = False
        con: Any = None
        lane = self._lane
        while lane and con is None:
            con = lane.pop()
            if _is_broken(con):  # died while it waited (a server restart): the pool's again
                await _give_back(pool, con)
                con = None
        clean = False
        try:
            if con is None:
                con = await pool.acquire()
            try:
                yield con
            except Exception:
                broken = _is_broken(con)
                raise
            clean = True
        except SigserveError:
            raise
        except Exception as exc:
            raise self._translate(exc, broken) from exc
        finally:
            if con is not None:
                # Only a connection whose call ended cleanly stays in the lane: after an error
                # or a cancellation the pool's release puts it back in order (or drops it).
                if clean and self._pool is pool and len(lane) < self._lane_size:
                    lane.append(con)
                else:
                    await _give_back(pool, con)

    def _translate(self, exc: Exception, broken: bool) -> SigserveError:
        apg = _driver()
        errors = apg.exceptions
        text = (str(exc).splitlines() or [""])[0][:300]
        state = str(getattr(exc, "sqlstate", "") or "")
        unavailable = (
            broken
            or isinstance(exc, OSError | errors.PostgresConnectionError)  # refused, reset, timeouts
            or state.startswith(("08", "57P", "28", "53300", "3D000"))  # shutdown, auth, no database
            or (isinstance(exc, errors.InterfaceError)
                and any(word in text for word in ("is closed", "is closing")))
        )
        if unavailable:
            return StoreUnavailable(f"the PostgreSQL store cannot be reached: {type(exc).__name__}:"
                                    f" {text or 'connection failed'}", details={"store": self.url})
        if state.startswith("40"):  # serialization failure, deadlock: transient, retry
            return StoreUnavailable(f"the store refused a conflicting transaction, retry it: {text}",
                                    details={"store": self.url, "sqlstate": state})
        if state.startswith(("22", "23")) or state == "21000":
            return ValidationError(f"store constraint violated: {text}", details={"sqlstate": state})
        return InternalError(f"store error: {type(exc).__name__}: {text}")

    @staticmethod
    async def _merge(con: Any, staging: str, payload: memoryview, *, delete: tuple[str, Sequence[Any]],
                     insert: tuple[str, Sequence[Any]], on_conflict: str,
                     before: Callable[[Any], Awaitable[None]] | None = None,
                     after: tuple[str, Sequence[Any]] | None = None) -> None:
        """COPY ``payload`` into ``staging`` and upsert it from there, in one transaction.

        The fast path deletes the staged keys and then INSERTs plainly: about twice as fast as
        ``INSERT ... ON CONFLICT DO UPDATE`` (measured on PostgreSQL 15). When a concurrent writer
        inserts one of those keys in between, the plain INSERT meets a unique violation: the
        transaction rolls back whole and runs again with ``on_conflict``, so the last writer wins.
        A deadlock with another writer of the same keys runs it again, a few times.
        """
        step = _MergeStep(staging, payload, delete, insert, on_conflict, after)
        await PostgresStore._merge_steps(con, [step], before=before)

    @staticmethod
    async def _merge_steps(con: Any, steps: Sequence[_MergeStep], *,
                           before: Callable[[Any], Awaitable[None]] | None = None) -> None:
        """Several :meth:`_merge` upserts (or one-row statements) in one transaction, with its
        retries: a unique violation runs every step again the ``ON CONFLICT`` way."""
        errors = _driver().exceptions
        retryable = (errors.UniqueViolationError, errors.DeadlockDetectedError,
                     errors.SerializationError)
        for safe in (False, True, True, True):
            try:
                async with con.transaction():
                    if before is not None:
                        await before(con)
                    staged: set[str] = set()
                    for step in steps:
                        if step.payload is None:  # one row: its upsert statement
                            await con.execute(step.insert[0], *step.insert[1])
                            continue
                        if step.staging in staged:
                            # ON COMMIT DELETE ROWS empties it at the commit, not between steps
                            await con.execute(f"DELETE FROM {step.staging}")
                        staged.add(step.staging)
                        await con.copy_to_table(step.staging, source=step.payload, format="binary")
                        if safe or step.delete is None:
                            await con.execute(step.insert[0] + step.on_conflict, *step.insert[1])
                        else:
                            await con.execute(step.delete[0], *step.delete[1])
                            await con.execute(step.insert[0], *step.insert[1])
                        if step.after is not None:
                            await con.execute(step.after[0], *step.after[1])
                return
            except retryable as exc:
                # a key inserted meanwhile (go the ON CONFLICT way), or a deadlock with another
                # writer of the same keys (run again); PostgreSQL rolled this attempt back whole
                if safe and not isinstance(exc, errors.DeadlockDetectedError):
                    raise
        raise StoreUnavailable("the write kept deadlocking with concurrent writers; retry it")

    # --- model registry -------------------------------------------------------------------
    _MODEL_COLUMNS = (
        "name, version, flavor, sha256, artifact_path, task, feature_names, classes, stage,"
        " runtime, metrics, extra, created_at"
    )

    @staticmethod
    def _card(row: Any) -> ModelCard:
        return ModelCard(
            name=row[0], version=int(row[1]), flavor=row[2], sha256=row[3], artifact_path=row[4],
            task=Task(row[5]), feature_names=tuple(row[6]), classes=tuple(row[7]),
            stage=Stage(row[8]), runtime=row[9], metrics=dict(row[10] or {}),
            extra=dict(row[11] or {}), created_at=_iso(row[12]))

    async def insert_model(self, card: ModelCard) -> ModelCard:
        async with self._connection() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1::int4, hashtext($2))", _LOCK_MODEL,
                              card.name)
            row = await con.fetchrow(
                "INSERT INTO model_registry (name, version, flavor, sha256, artifact_path, task,"
                " feature_names, classes, stage, runtime, metrics, extra, created_at, updated_at)"
                " SELECT $1, coalesce(max(version), 0) + 1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
                f" {_NOW}, {_NOW} FROM model_registry WHERE name = $1 RETURNING {self._MODEL_COLUMNS}",
                card.name, card.flavor, card.sha256, card.artifact_path, str(card.task),
                list(card.feature_names), list(card.classes), str(card.stage), card.runtime,
                card.metrics, card.extra)
            await con.execute(
                "INSERT INTO model_events (name, version, from_stage, to_stage, actor, occurred_at)"
                f" VALUES ($1, $2, NULL, $3, 'register', {_NOW})", card.name, row[1], str(card.stage))
        return self._card(row)

    async def get_model(self, name: str, version: int) -> ModelCard | None:
        async with self._connection() as con:
            row = await con.fetchrow(
                f"SELECT {self._MODEL_COLUMNS} FROM model_registry WHERE name=$1 AND version=$2",
                name, version)
        return self._card(row) if row else None

    async def list_models(self, name: str | None = None) -> list[ModelCard]:
        async with self._connection() as con:
            if name is None:
                rows = await con.fetch(
                    f"SELECT {self._MODEL_COLUMNS} FROM model_registry ORDER BY name, version")
            else:
                rows = await con.fetch(f"SELECT {self._MODEL_COLUMNS} FROM model_registry"
                                       " WHERE name = $1 ORDER BY version", name)
        return [self._card(r) for r in rows]

    async def set_model_stage(self, name: str, version: int, stage: Stage, actor: str) -> None:
        stage = Stage(stage)
        async with self._connection() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1::int4, hashtext($2))", _LOCK_MODEL, name)
            current = await con.fetchval(
                "SELECT stage FROM model_registry WHERE name=$1 AND version=$2 FOR UPDATE", name, version)
            if current is None:
                raise ValidationError(f"no model {name}:{version}",
                                      details={"name": name, "version": version})
            events = "INSERT INTO model_events (name, version, from_stage, to_stage, actor, occurred_at)"
            if stage in (Stage.STAGING, Stage.PRODUCTION):
                await con.execute(
                    f"WITH demoted AS (UPDATE model_registry SET stage='registered', updated_at={_NOW}"
                    " WHERE name=$1 AND stage=$2 AND version<>$3 RETURNING version)"
                    f" {events} SELECT $1, version, $2, 'registered', $4, {_NOW} FROM demoted",
                    name, str(stage), version, actor)
            await con.execute(f"UPDATE model_registry SET stage=$3, updated_at={_NOW}"
                              " WHERE name=$1 AND version=$2", name, version, str(stage))
            await con.execute(f"{events} VALUES ($1, $2, $3, $4, $5, {_NOW})",
                              name, version, current, str(stage), actor)

    async def update_model_extra(self, name: str, version: int, runtime: str | None,
                                 extra: dict[str, Any]) -> None:
        async with self._connection() as con:
            await con.execute(f"UPDATE model_registry SET runtime=$3, extra=$4, updated_at={_NOW}"
                              " WHERE name=$1 AND version=$2", name, version, runtime, extra)

    async def model_events(self, name: str) -> list[dict[str, Any]]:
        async with self._connection() as con:
            rows = await con.fetch(
                "SELECT version, from_stage, to_stage, actor, occurred_at FROM model_events"
                " WHERE name=$1 ORDER BY occurred_at, version, id", name)
        return [{"version": r[0], "from": r[1], "to": r[2], "actor": r[3], "at": _iso(r[4])}
                for r in rows]

    # --- feature registry -----------------------------------------------------------------
    async def register_features(self, names: list[str]) -> list[str]:
        unique = list(dict.fromkeys(names))
        if not unique:
            return []
        async with self._connection() as con:
            rows = await con.fetch(
                "INSERT INTO feature_registry (name, status, created_at, updated_at)"
                f" SELECT n, 'registered', {_NOW}, {_NOW} FROM unnest($1::text[]) AS n"
                " ON CONFLICT (name) DO NOTHING RETURNING name", unique)
        new = {r[0] for r in rows}
        return [n for n in unique if n in new]

    async def feature_statuses(self, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        async with self._connection() as con:
            rows = await con.fetch("SELECT name, status FROM feature_registry WHERE name = ANY($1::text[])",
                                   list(names))
        return {r[0]: r[1] for r in rows}

    async def set_feature_status(self, name: str, status: str) -> None:
        async with self._connection() as con:
            row = await con.fetchval(f"UPDATE feature_registry SET status=$2, updated_at={_NOW}"
                                     " WHERE name=$1 RETURNING name", name, status)
        if row is None:
            raise ValidationError(f"no registered feature named {name!r}", details={"name": name})

    async def list_features(self) -> list[dict[str, Any]]:
        async with self._connection() as con:
            rows = await con.fetch("SELECT name, status, created_at FROM feature_registry ORDER BY name")
        return [{"name": r[0], "status": r[1], "created_at": _iso(r[2])} for r in rows]

    # --- feature values -------------------------------------------------------------------
    async def _names_of(self, con: Any, keys: list[str]) -> dict[str, tuple[str, ...]]:
        """Column names per feature_key (immutable once committed, so cached)."""
        unknown = [k for k in keys if k not in self._feature_sets]
        if unknown:
            for key, names in await con.fetch(
                    "SELECT feature_key, names FROM feature_sets WHERE feature_key = ANY($1::text[])",
                    unknown):
                self._feature_sets[key] = tuple(names)
        return {k: self._feature_sets[k] for k in keys if k in self._feature_sets}

    async def write_features(self, interval: str, feature_key: str, names: tuple[str, ...],
                             symbols: np.ndarray, ts: np.ndarray, values: np.ndarray) -> int:
        n = int(ts.shape[0])
        names = tuple(names)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n, len(names)):
            raise ValidationError(f"feature matrix shape {values.shape} != ({n}, {len(names)})")
        cached = self._feature_sets.get(feature_key)
        if cached is not None and cached != names:
            raise self._names_refused(feature_key, cached, names)
        ts = np.asarray(ts, dtype=TS_DTYPE)
        distinct, sym = _codes(np.asarray(symbols, dtype=object))
        if sym.shape[0] != n:
            raise ValidationError(f"{sym.shape[0]} symbols for {n} feature rows")
        _refuse_duplicate_rows(distinct, sym, ts)
        async def claim_key(con: Any) -> None:
            if cached is not None:
                return
            await con.execute(
                f"INSERT INTO feature_sets (feature_key, names, created_at) VALUES ($1, $2, {_NOW})"
                " ON CONFLICT (feature_key) DO NOTHING", feature_key, list(names))
            stored = tuple(await con.fetchval(
                "SELECT names FROM feature_sets WHERE feature_key = $1", feature_key))
            if stored != names:
                raise self._names_refused(feature_key, stored, names)

        async with self._connection() as con:
            if n == 0:
                async with con.transaction():
                    await claim_key(con)
            else:
                keys = (distinct, interval, feature_key)
                await self._merge(
                    con, "_in_features", _copy_payload([("i4", sym), ("ts", ts), ("f8[]", values)]),
                    delete=("DELETE FROM feature_values f USING _in_features i WHERE"
                            " f.symbol = ANY($1::text[]) AND f.interval = $2 AND f.feature_key = $3"
                            " AND f.ts BETWEEN $4 AND $5 AND f.symbol = ($1::text[])[i.sym]"
                            " AND f.ts = i.ts", (*keys, _py_ts(ts.min()), _py_ts(ts.max()))),
                    insert=("INSERT INTO feature_values (symbol, interval, ts, feature_key, vals,"
                            f" created_at) SELECT ($1::text[])[sym], $2, ts, $3, vals, {_NOW}"
                            " FROM _in_features", keys),
                    on_conflict=(" ON CONFLICT (symbol, interval, ts, feature_key) DO UPDATE SET"
                                 " vals = excluded.vals, created_at = excluded.created_at"),
                    before=claim_key,
                    after=("INSERT INTO feature_coverage (symbol, interval, feature_key, first_ts,"
                           " last_ts) SELECT ($1::text[])[sym], $2, $3, min(ts), max(ts)"
                           " FROM _in_features GROUP BY sym ON CONFLICT (symbol, interval, feature_key)"
                           " DO UPDATE SET first_ts = least(feature_coverage.first_ts, excluded.first_ts),"
                           " last_ts = greatest(feature_coverage.last_ts, excluded.last_ts)", keys))
        self._feature_sets[feature_key] = names  # committed: the key's names are now fixed
        await self._analyze("feature_values", n)
        return n

    @staticmethod
    def _names_refused(key: str, existing: tuple[str, ...], incoming: tuple[str, ...]) -> ValidationError:
        return ValidationError(
            f"feature_key {key!r} already holds the columns {list(existing)};"
            " use a new --feature-key for a different column set",
            details={"feature_key": key, "existing": list(existing), "incoming": list(incoming)})

    async def read_features(self, symbol: str, interval: str, names: tuple[str, ...], *,
                            start: np.datetime64 | None = None, end: np.datetime64 | None = None,
                            ts: np.ndarray | None = None,
                            feature_key: str | None = None) -> FeatureRead:
        names = tuple(names)
        wanted: np.ndarray | None = None
        if ts is not None:
            wanted = unique_ts(ts)
            if wanted.size == 0:
                return FeatureRead(_empty_batch(symbol, interval, names), 0, 0)
            if wanted.size <= _ROWS_READ_MAX_TS:
                return (await self._read_features_rows(symbol, interval, names, wanted, feature_key))[0]
        return await self._read_features_copy(symbol, interval, names, start, end, wanted, feature_key)

    async def read_bar(self, symbol: str, interval: str, names: tuple[str, ...], ts: np.datetime64, *,
                       feature_key: str | None = None,
                       position: tuple[str, int] | None = None) -> tuple[FeatureRead, int]:
        wanted = np.array([ts], dtype=TS_DTYPE)
        return await self._read_features_rows(symbol, interval, tuple(names), wanted, feature_key, position)

    async def _read_features_rows(self, symbol: str, interval: str, names: tuple[str, ...],
                                  wanted: np.ndarray, feature_key: str | None,
                                  position: tuple[str, int] | None = None) -> tuple[FeatureRead, int]:
        """A few bars (the live path): one prepared statement, one round trip. With ``position``
        (one bar: ``read_bar``) the same statement reads the side before the bar."""
        params: list[Any] = [symbol, interval, _py_ts_list(wanted)]
        key_filter = ""
        if feature_key is not None:
            params.append(feature_key)
            key_filter = " AND feature_key = $4"
        side_column = ""
        if position is not None:
            params += [position[0], int(position[1]), _py_ts(wanted[0])]
            last = len(params)
            # uncorrelated: PostgreSQL evaluates it once (an InitPlan), on the index's seek
            side_column = (f", coalesce((SELECT {_SIDE_SQL} FROM signal_history WHERE signal_id = ${last - 2}"
                           f" AND model_version = ${last - 1} AND symbol = $1 AND interval = $2"
                           f" AND action <> 'hold' AND NOT shadow AND ts < ${last} ORDER BY ts DESC LIMIT 1),"
                           " 0::int2)")
        bar_filter = "symbol = $1 AND interval = $2 AND ts = ANY($3::timestamp[])"
        # The newest row per ts (or the pinned key's) beside every candle bar.
        sql = (
            "WITH f AS (SELECT DISTINCT ON (ts) ts, feature_key, vals FROM feature_values"
            f" WHERE {bar_filter}{key_filter} ORDER BY ts, created_at DESC, feature_key DESC),"
            f" c AS (SELECT ts, close FROM candles WHERE {bar_filter})"
            " SELECT coalesce(f.ts, c.ts) AS ts, f.ts IS NOT NULL, coalesce(f.feature_key, ''),"
            " coalesce(array_send(f.vals), ''::bytea), c.ts IS NOT NULL, coalesce(c.close, 'NaN')"
            f"{side_column} FROM f FULL JOIN c ON c.ts = f.ts ORDER BY 1"
        )
        async with self._connection() as con:
            rows = await con.fetch(sql, *params)
            if not rows:
                return FeatureRead(_empty_batch(symbol, interval, names), 0, 0), FLAT
            columns = list(zip(*rows, strict=True))
            bar_ts, has_row_t, keys_t, blobs, has_candle_t, close_t = columns[:6]
            side = int(columns[6][0]) if position is not None else FLAT
            has_row = np.array(has_row_t, dtype=bool)
            missing = int(np.count_nonzero(np.array(has_candle_t, dtype=bool) & ~has_row))
            at = np.flatnonzero(has_row)
            if at.size == 0:
                return FeatureRead(_empty_batch(symbol, interval, names), 0, missing), FLAT
            distinct, codes = _codes(np.array([keys_t[i] for i in at], dtype=object))
            codes -= 1
            key_names = await self._names_of(con, distinct)
        k = len(names)
        values = np.empty((at.size, k), dtype=np.float64)
        keep = np.zeros(at.size, dtype=bool)
        for code, key in enumerate(distinct):
            index = _column_index(key_names.get(key), names)
            if index is None:
                continue  # rows of this key lack a requested name: incomplete
            rows_of = np.flatnonzero(codes == code)
            keep[rows_of] = True
            if k:
                width = len(key_names[key])
                blob = b"".join([blobs[at[i]] for i in rows_of])
                values[rows_of] = _parse_float_arrays(blob, rows_of.size, width)[:, index]
        kept = np.flatnonzero(keep)
        bars = np.array([bar_ts[i] for i in at[kept]], dtype=TS_DTYPE).reshape(-1)
        batch = FeatureBatch(symbol, interval, bars, np.ascontiguousarray(values[kept]), names,
                             np.asarray(distinct, dtype=object)[codes[kept]],
                             np.array(close_t, dtype=np.float64)[at[kept]])
        return FeatureRead(batch, int(at.size - kept.size), missing), side if kept.size else FLAT

    async def _read_features_copy(self, symbol: str, interval: str, names: tuple[str, ...],
                                  start: np.datetime64 | None, end: np.datetime64 | None,
                                  wanted: np.ndarray | None, feature_key: str | None) -> FeatureRead:
        """A window or many bars: binary COPY out per feature_key, decoded by numpy, in one
        snapshot; the newest created_at wins per ts here, not in a server-side sort."""
        lo, hi = (wanted[0], wanted[-1]) if wanted is not None else (start, end)
        where = [f"symbol = {_literal(symbol)}", f"interval = {_literal(interval)}"]
        if lo is not None:
            where.append(f"ts >= {_ts_literal(lo)}")
        if hi is not None:
            where.append(f"ts <= {_ts_literal(hi)}")
        if wanted is not None:
            where.append("ts IN (SELECT ts FROM _in_ts)")
        bar_filter = " AND ".join(where)
        k = len(names)
        parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None, list[int] | None]] = []
        async with self._connection() as con, con.transaction(isolation="repeatable_read"):
            if wanted is not None:
                await con.copy_to_table("_in_ts", source=_copy_payload([("ts", wanted)]), format="binary")
            if feature_key is None:
                keys = [r[0] for r in await con.fetch(
                    "SELECT feature_key FROM feature_coverage WHERE symbol = $1 AND interval = $2"
                    " AND ($3::timestamp IS NULL OR last_ts >= $3)"
                    " AND ($4::timestamp IS NULL OR first_ts <= $4) ORDER BY feature_key",
                    symbol, interval, _py_ts(lo), _py_ts(hi))]
            else:
                keys = [feature_key]
            key_names = await self._names_of(con, keys)
            for key in keys:  # in feature_key order: the tie-break below relies on it
                stored = key_names.get(key)
                if stored is None:
                    continue  # never written
                index = _column_index(stored, names)
                width = len(stored) if index is not None and k else None
                columns = "ts, created_at" + (", vals" if width is not None else "")
                blob = await _copy_out(con, f"SELECT {columns} FROM feature_values WHERE {bar_filter}"
                                            f" AND feature_key = {_literal(key)} ORDER BY ts")
                rows = _parse_copy(blob, _feature_layout(width))
                vals = rows["el"]["v"] if width else None
                parts.append((key, _pg_ts(rows["ts"]), rows["created"].astype(np.int64), vals, index))
            candles = _parse_copy(await _copy_out(
                con, f"SELECT ts, coalesce(close, 'NaN') FROM candles WHERE {bar_filter} ORDER BY ts"),
                _CLOSE_LAYOUT)
        candle_ts, candle_close = _pg_ts(candles["ts"]), candles["close"].astype(np.float64)
        sizes = [p[1].size for p in parts]
        if not sum(sizes):
            return FeatureRead(_empty_batch(symbol, interval, names), 0, int(candle_ts.size))
        part_of = np.repeat(np.arange(len(parts)), sizes)
        row_of = np.concatenate([np.arange(size) for size in sizes])
        bar_ts = np.concatenate([p[1] for p in parts])
        if len(parts) > 1:
            created = np.concatenate([p[2] for p in parts])
            order = np.lexsort((-part_of, -created, bar_ts))  # ts, newest created_at, key desc
            sorted_ts = bar_ts[order]
            first = np.ones(order.size, dtype=bool)
            first[1:] = sorted_ts[1:] != sorted_ts[:-1]
            winners = order[first]
            bar_ts, part_of, row_of = bar_ts[winners], part_of[winners], row_of[winners]
        values = np.empty((bar_ts.size, k), dtype=np.float64)
        keep = np.zeros(bar_ts.size, dtype=bool)
        for p, (_, _, _, vals, index) in enumerate(parts):
            if index is None:
                continue  # this key lacks a requested name: its winning rows are incomplete
            if len(parts) == 1:
                keep[:] = True
                if vals is not None:
                    values[:] = vals if index == list(range(vals.shape[1])) else vals[:, index]
                continue
            sel = np.flatnonzero(part_of == p)
            keep[sel] = True
            if vals is not None:
                values[sel] = vals[row_of[sel][:, None], np.asarray(index)[None, :]]
        key_of = np.asarray([p[0] for p in parts], dtype=object)[part_of]
        # bars with a candle but no feature row at all are missing (incomplete ones are not)
        pos = np.minimum(np.searchsorted(bar_ts, candle_ts), bar_ts.size - 1)
        missing = int(np.count_nonzero(bar_ts[pos] != candle_ts))
        kept = np.flatnonzero(keep)
        if kept.size != bar_ts.size:
            bar_ts, values, key_of = bar_ts[kept], values[kept], key_of[kept]
        close = np.full(bar_ts.size, np.nan)
        if candle_ts.size:
            at = np.minimum(np.searchsorted(candle_ts, bar_ts), candle_ts.size - 1)
            hit = candle_ts[at] == bar_ts
            close[hit] = candle_close[at[hit]]
        batch = FeatureBatch(symbol, interval, bar_ts, np.ascontiguousarray(values), names, key_of, close)
        return FeatureRead(batch, int(keep.size - kept.size), missing)
    async def feature_window_stats(self, symbol: str, interval: str, start: np.datetime64 | None,
                                   end: np.datetime64 | None) -> tuple[int, np.datetime64 | None,
                                                                        np.datetime64 | None]:
        params: list[Any] = [symbol, interval]
        where = ["symbol = $1", "interval = $2"]
        if start is not None:
            params.append(_py_ts(start))
            where.append(f"ts >= ${len(params)}")
        if end is not None:
            params.append(_py_ts(end))
            where.append(f"ts <= ${len(params)}")
        async with self._connection() as con:
            row = await con.fetchrow(
                f"SELECT count(DISTINCT ts), min(ts), max(ts) FROM feature_values WHERE {' AND '.join(where)}",
                *params)
        return int(row[0]), _np_ts(row[1]), _np_ts(row[2])

    async def newest_feature_ts(self, symbol: str, interval: str) -> np.datetime64 | None:
        # one backward seek on the primary key (symbol, interval, ts, feature_key)
        async with self._connection() as con:
            newest = await con.fetchval(
                "SELECT max(ts) FROM feature_values WHERE symbol = $1 AND interval = $2", symbol, interval)
        return _np_ts(newest)

    # --- candles --------------------------------------------------------------------------
    async def write_candles(self, symbol: str, interval: str, candles: Candles) -> int:
        ts = np.asarray(candles.ts, dtype=TS_DTYPE)
        n = int(ts.shape[0])
        if n == 0:
            return 0
        if n > 1 and not bool(np.all(ts[1:] > ts[:-1])):
            uniq, counts = np.unique(ts, return_counts=True)
            if (counts > 1).any():
                dup = f"{uniq[counts > 1][0]}Z"
                raise ValidationError(f"duplicate candles for ts {dup}", details={"ts": dup})
        columns = [("ts", ts)] + [("f8", np.asarray(getattr(candles, c), dtype=np.float64))
                                  for c in ("open", "high", "low", "close", "volume")]
        if any(c[1].shape != (n,) for c in columns):
            raise ValidationError("candle columns differ in length")
        payload = _copy_payload(columns)
        async with self._connection() as con:
            await self._merge(
                con, "_in_candles", payload,
                delete=("DELETE FROM candles c USING _in_candles i WHERE c.symbol = $1 AND c.interval = $2"
                        " AND c.ts BETWEEN $3 AND $4 AND c.ts = i.ts",
                        (symbol, interval, _py_ts(ts.min()), _py_ts(ts.max()))),
                insert=("INSERT INTO candles (symbol, interval, ts, open, high, low, close, volume,"
                        f" created_at) SELECT $1, $2, ts, open, high, low, close, volume, {_NOW}"
                        " FROM _in_candles", (symbol, interval)),
                on_conflict=(" ON CONFLICT (symbol, interval, ts) DO UPDATE SET open = excluded.open,"
                             " high = excluded.high, low = excluded.low, close = excluded.close,"
                             " volume = excluded.volume, created_at = excluded.created_at"))
        await self._analyze("candles", n)
        return n

    async def read_candles(self, symbol: str, interval: str, start: np.datetime64 | None = None,
                           end: np.datetime64 | None = None) -> Candles:
        where = [f"symbol = {_literal(symbol)}", f"interval = {_literal(interval)}"]
        if start is not None:
            where.append(f"ts >= {_ts_literal(start)}")
        if end is not None:
            where.append(f"ts <= {_ts_literal(end)}")
        columns = ", ".join(f"coalesce({c}, 'NaN')" for c in ("open", "high", "low", "close", "volume"))
        async with self._connection() as con:
            blob = await _copy_out(con, f"SELECT ts, {columns} FROM candles WHERE {' AND '.join(where)}"
                                        " ORDER BY ts")
        rows = _parse_copy(blob, _CANDLE_LAYOUT)
        return Candles(_pg_ts(rows["ts"]), *(rows[c].astype(np.float64) for c in
                                             ("open", "high", "low", "close", "volume")))

    async def bars_missing_features(self, interval: str, symbol: str | None = None,
                                    start: np.datetime64 | None = None,
                                    end: np.datetime64 | None = None,
                                    limit: int = 20) -> tuple[int, list[tuple[str, np.datetime64]]]:
        params: list[Any] = [interval]
        where = ["c.interval = $1"]
        if symbol is not None:
            params.append(symbol)
            where.append(f"c.symbol = ${len(params)}")
        if start is not None:
            params.append(_py_ts(start))
            where.append(f"c.ts >= ${len(params)}")
        if end is not None:
            params.append(_py_ts(end))
            where.append(f"c.ts <= ${len(params)}")
        sql = (f"FROM candles c WHERE {' AND '.join(where)} AND NOT EXISTS (SELECT 1 FROM"
               " feature_values f WHERE f.symbol = c.symbol AND f.interval = c.interval AND f.ts = c.ts)")
        async with self._connection() as con:
            count = await con.fetchval(f"SELECT count(*) {sql}", *params)
            rows = await con.fetch(
                f"SELECT c.symbol, c.ts {sql} ORDER BY c.symbol, c.ts LIMIT ${len(params) + 1}",
                *params, int(limit))
        return int(count), [(r[0], np.datetime64(r[1], "us")) for r in rows]

    # --- signal definitions ---------------------------------------------------------------
    _SIGNAL_DEF_COLUMNS = ("signal_id, model_name, model_ref, interval, symbols, policy, status,"
                           " feature_key, created_at")

    @staticmethod
    def _definition(row: Any) -> SignalDefinition:
        return SignalDefinition(
            signal_id=row[0], model_name=row[1], model_ref=row[2], interval=row[3],
            symbols=tuple(row[4]), policy=Policy.from_json(row[5]), status=row[6],
            feature_key=row[7], created_at=_iso(row[8]))

    async def create_signal(self, definition: SignalDefinition) -> None:
        async with self._connection() as con:
            created = await con.fetchval(
                "INSERT INTO signal_definitions (signal_id, model_name, model_ref, interval, symbols,"
                " policy, status, feature_key, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6,"
                f" $7, $8, {_NOW}, {_NOW}) ON CONFLICT (signal_id) DO NOTHING RETURNING signal_id",
                definition.signal_id, definition.model_name, definition.model_ref,
                definition.interval, list(definition.symbols),
                json.loads(definition.policy.to_json()), definition.status, definition.feature_key)
        if created is None:
            raise ValidationError(f"signal {definition.signal_id!r} already exists",
                                  details={"signal_id": definition.signal_id})

    async def get_signal(self, signal_id: str) -> SignalDefinition | None:
        async with self._connection() as con:
            row = await con.fetchrow(f"SELECT {self._SIGNAL_DEF_COLUMNS} FROM signal_definitions"
                                     " WHERE signal_id = $1", signal_id)
        return self._definition(row) if row else None

    async def list_signals(self) -> list[SignalDefinition]:
        async with self._connection() as con:
            rows = await con.fetch(f"SELECT {self._SIGNAL_DEF_COLUMNS} FROM signal_definitions"
                                   " ORDER BY signal_id")
        return [self._definition(r) for r in rows]

    async def set_signal_status(self, signal_id: str, status: str) -> None:
        async with self._connection() as con:
            row = await con.fetchval(f"UPDATE signal_definitions SET status=$2, updated_at={_NOW}"
                                     " WHERE signal_id=$1 RETURNING signal_id", signal_id, status)
        if row is None:
            raise SignalNotFound(f"no signal {signal_id!r}", details={"signal_id": signal_id})

    # --- signal history -------------------------------------------------------------------
    async def write_signals(self, batch: SignalBatch) -> int:
        return (await self.write_signal_batches([batch]))[0]

    async def write_signal_batches(self, batches: Sequence[SignalBatch]) -> list[int]:
        """Every batch in one transaction (a stream's write cycle: one commit for every symbol's
        rows instead of one each). Up to ``_ARRAY_ROWS_MAX`` rows (a write cycle's) are one
        upsert statement with the rows as array parameters: one round trip, no transaction block
        (``bench/write_cycle.py`` on VM-R, 4 histories x 12 rows: 0.32 ms of the caller's CPU and
        1.1 ms a cycle, against 0.57 and 2.3 through COPY). More rows go through COPY: several
        histories' batches together (:meth:`_histories_step`), a lone batch on its own."""
        steps = _StepsAsNeeded(self._group_step, _history_groups([batch for batch in batches if len(batch)]))
        if not steps:
            return [0] * len(batches)
        async with self._connection() as con:
            if len(steps) == 1 and steps[0].payload is None:  # the live path: one round trip
                await con.execute(steps[0].insert[0], *steps[0].insert[1])
            else:
                await self._merge_steps(con, steps)
        rows = sum(len(batch) for batch in batches)
        await self._analyze("signal_history", rows)
        return [len(batch) for batch in batches]

    @staticmethod
    def _group_step(group: list[SignalBatch]) -> _MergeStep:
        rows = sum(len(batch) for batch in group)
        if rows == 1 or rows > _ARRAY_ROWS_MAX:
            return PostgresStore._signal_step(group[0]) if len(group) == 1 else PostgresStore._histories_step(group)
        # A write cycle's rows: one statement with its rows as parameters, against a COPY into a
        # staging table and its INSERT inside a transaction (four round trips, each a wake-up
        # of the worker's loop, and twice the server's CPU).
        return _MergeStep("", None, None, (_INSERT_HISTORIES_ARRAYS, _history_arrays(group)), "")

    @staticmethod
    def _histories_step(batches: Sequence[SignalBatch]) -> _MergeStep:
        """The upsert of several histories' batches (distinct keys, one raw-output width) through
        one COPY and one ``INSERT ... ON CONFLICT``: a stream worker's write cycle is four round
        trips whatever its number of symbols, where it was a COPY and three statements per
        symbol (one statement for a one-row batch). ``bench/write_cycle.py`` on VM-Q, 50
        histories x 2 rows: 1.6-1.8 ms of the worker's CPU and 5.9-6.2 ms a cycle, against 16.5
        and 28.5; 4 x 12: 0.55-0.76 and 2.5-3.0 against 1.9 and 4.9. A stream's appends conflict
        with nothing, so the DELETE-then-INSERT of a bulk load (cheaper there than ON CONFLICT for
        millions of rows) would be a round trip and an index probe a row for nothing."""
        payload, columns = _staged_signals(batches, with_history=True)
        return _MergeStep(
            "_in_histories", payload,
            None,  # no DELETE: ON CONFLICT at once
            (_INSERT_HISTORIES_STAGED, _history_params(batches, columns)),
            _SIGNAL_UPSERT)

    @staticmethod
    def _signal_step(batch: SignalBatch) -> _MergeStep:
        """The upsert of one batch: its one-row statement, or its COPY payload and statements."""
        constants = (batch.signal_id, int(batch.model_version), batch.symbol, batch.interval)
        if len(batch) == 1:
            check_signals(batch)
            return _MergeStep("", None, ("", ()), (_INSERT_SIGNAL_ROW, (
                *constants, _py_ts(np.asarray(batch.ts, dtype=TS_DTYPE)[0]), ACTIONS[int(batch.action[0])],
                float(batch.confidence[0]), np.asarray(batch.raw_output, dtype=np.float64).reshape(-1).tolist(),
                float(batch.entry_price[0]), float(batch.stop_loss[0]), float(batch.take_profit[0]),
                float(batch.recommended_size[0]), batch.model_name, batch.model_sha256,
                _opt_str(batch.feature_keys[0]), batch.source, float(batch.latency_ms[0]),
                _opt_str(batch.flags[0]), bool(batch.shadow))), "")
        payload, c = _staged_signals([batch], with_history=False)
        return _MergeStep(
            "_in_signals", payload,
            (_DELETE_STAGED_SIGNALS, (*constants, _py_ts(c.ts.min()), _py_ts(c.ts.max()))),
            (_INSERT_SIGNALS_STAGED, (
                *constants, list(ACTIONS), batch.model_name, batch.model_sha256,
                [_opt_str(k) for k in c.keys], batch.source, [_opt_str(f) for f in c.flags],
                bool(batch.shadow))),
            _SIGNAL_UPSERT)

    async def _analyze(self, table: str, rows: int) -> None:
        """Fresh planner statistics after a bulk load. Without them a point read of a table just
        loaded picked a plan that filtered ts instead of seeking it: 16.7 ms against 0.8 ms."""
        if rows >= _ANALYZE_ROWS:
            async with self._connection() as con:
                await con.execute(f"ANALYZE {table}")

    async def position_sides(self, signal_id: str, model_version: int, symbol: str, interval: str,
                             before: np.ndarray) -> np.ndarray:
        before = np.asarray(before, dtype=TS_DTYPE)
        sides = np.full(before.shape[0], FLAT, dtype=np.int8)
        if before.size == 0:
            return sides
        # The newest event before the earliest query, then every event up to the latest one.
        if before.size <= _ROWS_READ_MAX_TS:  # the live path: one prepared statement
            async with self._connection() as con:
                rows = await con.fetch(_POSITION_EVENTS, signal_id, int(model_version), symbol,
                                       interval, _py_ts(before.min()), _py_ts(before.max()))
            if not rows:
                return sides
            event_ts = np.array([r[0] for r in rows], dtype=TS_DTYPE)
            at = np.searchsorted(event_ts, before, side="left") - 1  # strictly before
            found = at >= 0
            sides[found] = np.array([r[1] for r in rows], dtype=np.int8)[at[found]]
            return sides
        key = (f"signal_id = {_literal(signal_id)} AND model_version = {int(model_version)}"
               f" AND symbol = {_literal(symbol)} AND interval = {_literal(interval)}"
               " AND action <> 'hold' AND NOT shadow")
        side = _SIDE_SQL
        lo, hi = _ts_literal(before.min()), _ts_literal(before.max())
        async with self._connection() as con:
            blob = await _copy_out(
                con, f"SELECT * FROM ((SELECT ts, {side} FROM signal_history WHERE {key} AND ts < {lo}"
                     f" ORDER BY ts DESC LIMIT 1) UNION ALL (SELECT ts, {side} FROM signal_history"
                     f" WHERE {key} AND ts >= {lo} AND ts < {hi})) AS e ORDER BY 1")
        events = _parse_copy(blob, _EVENT_LAYOUT)
        if events.size == 0:
            return sides
        at = np.searchsorted(_pg_ts(events["ts"]), before, side="left") - 1  # strictly before
        found = at >= 0
        sides[found] = events["side"].astype(np.int8)[at[found]]
        return sides

    async def last_signal_ts(self, signal_id: str, symbol: str,
                             interval: str) -> np.datetime64 | None:
        async with self._connection() as con:
            value = await con.fetchval(
                "SELECT max(ts) FROM signal_history WHERE signal_id=$1 AND symbol=$2 AND interval=$3"
                " AND NOT shadow", signal_id, symbol, interval)
        return _np_ts(value)

    async def read_signals(self, signal_id: str, symbol: str | None = None,
                           interval: str | None = None, start: np.datetime64 | None = None,
                           end: np.datetime64 | None = None,
                           limit: int | None = None) -> list[dict[str, Any]]:
        params: list[Any] = [signal_id]
        where = ["signal_id = $1"]
        for column, op, value in (("symbol", "=", symbol), ("interval", "=", interval),
                                  ("ts", ">=", _py_ts(start)), ("ts", "<=", _py_ts(end))):
            if value is not None:
                params.append(value)
                where.append(f"{column} {op} ${len(params)}")
        sql = (f"SELECT {_SIGNAL_COLUMNS} FROM signal_history WHERE {' AND '.join(where)}"
               " ORDER BY ts, symbol, model_version")
        if limit is not None:
            params.append(int(limit))
            sql += f" LIMIT ${len(params)}"
        async with self._connection() as con:
            rows = await con.fetch(sql, *params)
        return [dict(r.items()) for r in rows]

    async def signal_action_counts(self, signal_id: str) -> dict[str, int]:
        async with self._connection() as con:
            rows = await con.fetch("SELECT action, count(*) FROM signal_history WHERE signal_id=$1"
                                   " AND NOT shadow GROUP BY action", signal_id)
        return {r[0]: int(r[1]) for r in rows}

    # --- training runs --------------------------------------------------------------------
    _RUN_COLUMNS = ("run_id, model_type, experiment, config_hash, dataset_version, metrics, details,"
                    " status, created_at, completed_at")

    @staticmethod
    def _run(row: Any) -> TrainingRun:
        return TrainingRun(
            run_id=row[0], model_type=row[1], experiment=row[2], config_hash=row[3],
            dataset_version=row[4], metrics=dict(row[5] or {}), details=dict(row[6] or {}),
            status=row[7], created_at=_iso(row[8]), completed_at=_iso(row[9]) if row[9] else None)

    async def save_training_run(self, run: TrainingRun) -> TrainingRun:
        completed = None
        if run.completed_at:
            completed = datetime.fromisoformat(run.completed_at).astimezone(UTC).replace(tzinfo=None)
        metrics = json.loads(json.dumps(run.metrics, default=str))
        details = json.loads(json.dumps(run.details, default=str))
        async with self._connection() as con:
            row = await con.fetchrow(
                f"INSERT INTO training_runs ({self._RUN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
                f" {_NOW}, coalesce($9::timestamp, CASE WHEN $8 <> 'running' THEN {_NOW} END))"
                " ON CONFLICT (run_id) DO UPDATE SET model_type = excluded.model_type,"
                " experiment = excluded.experiment, config_hash = excluded.config_hash,"
                " dataset_version = excluded.dataset_version, metrics = excluded.metrics,"
                " details = excluded.details, status = excluded.status,"
                " completed_at = coalesce(training_runs.completed_at, excluded.completed_at)"
                f" RETURNING {self._RUN_COLUMNS}",
                run.run_id, run.model_type, run.experiment, run.config_hash, run.dataset_version,
                metrics, details, run.status, completed)
        return self._run(row)

    async def get_training_run(self, run_id: str) -> TrainingRun | None:
        async with self._connection() as con:
            row = await con.fetchrow(
                f"SELECT {self._RUN_COLUMNS} FROM training_runs WHERE run_id = $1", run_id)
        return self._run(row) if row else None

    async def list_training_runs(self, experiment: str | None = None) -> list[TrainingRun]:
        async with self._connection() as con:
            rows = await con.fetch(
                f"SELECT {self._RUN_COLUMNS} FROM training_runs WHERE $1::text IS NULL OR experiment = $1"
                " ORDER BY created_at, run_id", experiment)
        return [self._run(r) for r in rows]

    # --- traffic policies -----------------------------------------------------------------
    @staticmethod
    def _policy(row: Any) -> TrafficPolicy:
        data = dict(row[0])
        data.update(updated_at=_iso(row[1]), updated_by=row[2])
        return TrafficPolicy.from_dict(data)

    async def get_traffic_policy(self, signal_id: str) -> TrafficPolicy | None:
        async with self._connection() as con:
            row = await con.fetchrow("SELECT policy, updated_at, updated_by FROM traffic_policies"
                                     " WHERE signal_id = $1", signal_id)
        return self._policy(row) if row else None

    async def list_traffic_policies(self) -> list[TrafficPolicy]:
        async with self._connection() as con:
            rows = await con.fetch("SELECT policy, updated_at, updated_by FROM traffic_policies"
                                   " ORDER BY signal_id")
        return [self._policy(r) for r in rows]

    async def set_traffic_policy(self, policy: TrafficPolicy, *, actor: str,
                                 action: str) -> TrafficPolicy:
        body = {k: v for k, v in policy.to_dict().items() if k not in ("updated_at", "updated_by")}
        async with self._connection() as con, con.transaction():
            old = await con.fetchrow("SELECT policy, updated_at, updated_by FROM traffic_policies"
                                     " WHERE signal_id = $1 FOR UPDATE", policy.signal_id)
            row = await con.fetchrow(
                f"INSERT INTO traffic_policies VALUES ($1, $2, {_NOW}, $3) ON CONFLICT (signal_id)"
                " DO UPDATE SET policy = excluded.policy, updated_at = excluded.updated_at,"
                " updated_by = excluded.updated_by RETURNING policy, updated_at, updated_by",
                policy.signal_id, body, actor)
            stored = self._policy(row)
            previous = self._policy(old).to_dict() if old else None
            await con.execute(
                "INSERT INTO rollout_events (signal_id, occurred_at, actor, action, from_policy,"
                " to_policy) VALUES ($1, $2, $3, $4, $5, $6)", policy.signal_id, row[1], actor, action,
                previous, stored.to_dict())
        return stored

    async def rollout_events(self, signal_id: str) -> list[dict[str, Any]]:
        async with self._connection() as con:
            rows = await con.fetch("SELECT occurred_at, actor, action, from_policy, to_policy"
                                   " FROM rollout_events WHERE signal_id = $1 ORDER BY id", signal_id)
        return [{"at": _iso(r[0]), "actor": r[1], "action": r[2],
                 "from": dict(r[3]) if r[3] else None, "to": dict(r[4])} for r in rows]


def _empty_batch(symbol: str, interval: str, names: tuple[str, ...]) -> FeatureBatch:
    return FeatureBatch(symbol, interval, np.empty(0, TS_DTYPE), np.empty((0, len(names))), names,
                        np.empty(0, dtype=object), np.empty(0))


def _refuse_duplicate_rows(symbols: list[str], codes: np.ndarray, ts: np.ndarray) -> None:
    """Refuse a feature batch holding one (symbol, ts) twice, before anything is written."""
    if ts.size < 2:
        return
    if len(symbols) <= 1 and bool(np.all(ts[1:] > ts[:-1])):
        return  # one symbol, sorted unique ts: the usual, cheap case
    order = np.lexsort((ts.view(np.int64), codes))
    same = (codes[order][1:] == codes[order][:-1]) & (ts[order][1:] == ts[order][:-1])
    if same.any():
        i = int(order[int(np.flatnonzero(same)[0])])
        symbol, when = symbols[int(codes[i]) - 1], f"{ts[i]}Z"
        raise ValidationError(f"duplicate feature rows for (symbol, ts) = ({symbol}, {when})",
                              details={"symbol": symbol, "ts": when})
