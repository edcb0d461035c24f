"""The embedded default Store: one DuckDB file, zero setup.

Design notes (measured on the 2-core dev machine, see bench/):

- ``signal_history`` and ``feature_values`` carry no PRIMARY KEY. DuckDB's ART index made a
  1M-row upsert take 4 s the first time and 26 s the second; a delete of the batch's keys followed
  by an insert, in one transaction, takes 0.8 s and gives the same upsert semantics. The natural
  key is enforced by this write path, and DuckDB admits one writing process per file.
- Bulk reads and writes go through Arrow (zero copy for numeric columns), and run in a worker
  thread on a cursor of their own so that an event loop stays free. pyarrow is imported there,
  on first use: it is not on a server's startup path.
- The live path (one bar: the bar cache's block read, ``_write_one``, the cached position) uses
  parameterised statements and ``fetchall``/``fetchnumpy``, no Arrow (a first Arrow timestamp
  conversion imports pandas, ~0.3 s of a cold start). Reads of one bar or a few (up to 8 blocks)
  go through :class:`.bar_cache.BarCache`: a bar not in memory is read with its block of 256
  bars (two statements, about the cost of the two point reads of one bar), kept until a write
  of that series' features or candles; the next bars of a replay are answered from memory. The
  position before a bar comes from :class:`.positions.PositionBook` (the newest position of
  each history; every non-hold row of a history once a bar inside it is asked for). Small
  signal writes go through the signal journal (below); applied, a one-row write after the
  newest bar of its history is one INSERT, inside history one UPDATE of the row at its key
  (or one INSERT where there is none).
- DuckDB runs one thread between bulk statements and its default pool during them
  (``_parallel``): a point statement costs less without waking the pool, most of all when the
  process is pinned to one core; a 300k-row write or read is 1.3-2.5x faster with the pool.
- What one served bar costs here is DuckDB's own per-statement cost (parse, bind, optimise and
  run each time): about 0.8-1.4 ms for each point SELECT, ~2.5-3 ms for a one-row INSERT with
  its commit (WAL record plus an fdatasync of ~0.2 ms), ~3.3 ms for the UPDATE of one row, against
  ~4 ms for BEGIN + DELETE + INSERT + COMMIT and ~7.5 ms for INSERT ... ON CONFLICT on an ART
  primary key. SQL PREPARE/EXECUTE, appenders, MERGE INTO, disabled optimizers and a smaller
  checkpoint_threshold measured no cheaper (the last: more frequent ~25 ms checkpoints). One live
  bar is now mostly its INSERT: the feature row comes from the bar cache, the position from
  the position book. That INSERT with its commit measured p50 3.2 / p99 6.9 ms on VM-G (a bare
  one-row INSERT into a 9-column table: 2.9 / 7.4 ms on the file, 1.0 / 1.7 ms in memory; the
  commit's fdatasync alone 0.5 / 1.6 ms). Most of that is DuckDB's own work per statement, not
  the sync: strace counts one write and one fdatasync per commit, ~50 us each. So signal rows
  of a file go through :mod:`.signal_journal` (the signal journal): the answer waits for an
  append and an fdatasync of our own file, and a background thread applies the rows to
  ``signal_history`` through Arrow: a linger's worth of every series' new bars in one INSERT
  (~5 ms for 20 rows against 20 x 3 ms; a stream serving four symbols paid four statements per
  apply before), a replayed or corrected bar as a replace of its row. ``_guard`` applies
  pending rows before any statement that may read them; a served bar reads none (the position
  from the position book), replays and corrections included.
- The first statement after a commit costs about twice what it does otherwise (a point SELECT
  0.6 ms alone, 1.25-1.55 ms right after a one-row INSERT; even an empty BEGIN/COMMIT makes it
  1.07 ms; measured on VM-D with DuckDB 2.0.1), and the cost is per scan, not per statement: the
  feature row and the candle read as one UNION ALL or one join measured no cheaper than two
  statements (1.27-1.74 against 1.25-1.27 ms). A second cursor for the reads did not help.
- Feature vectors are stored as ``DOUBLE[]`` with their names kept once per ``feature_key`` in
  ``feature_sets``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..domain import (
    ACTIONS,
    FLAT,
    HOLD,
    FeatureBatch,
    ModelCard,
    Policy,
    SignalBatch,
    SignalDefinition,
    Stage,
    Task,
    TrafficPolicy,
    TrainingRun,
    merge_batches,
)
from ..errors import InternalError, SigserveError, StoreUnavailable, ValidationError
from ..timeutil import TS_DTYPE, interval_us, unique_ts
from ._common import check_signals as _check_signals
from .bar_cache import BarCache, Block
from .base import Candles, FeatureRead
from .positions import SIDE_OF_CODE, PositionBook, history_of
from .signal_journal import Entry, SignalJournal

if TYPE_CHECKING:
    import pyarrow as pa

T = TypeVar("T")

# Rows at or above this many go to a worker thread; smaller ones run inline (cheaper than a hop).
_BULK_ROWS = 5_000
# The journal's applier waits this long after the first pending record, so that one write
# carries the rows of many requests (a DuckDB write costs about the same for 1 row or 50)
JOURNAL_LINGER_S = 0.05
# Past this many rows not yet taken, the applier (idle priority) runs at normal priority until it
# has caught up: a process busy enough to starve it shares its cores with it
JOURNAL_BOOST_ROWS = 2_000
# Past this many, a writer applies them itself: memory and replay time stay bounded
JOURNAL_MAX_PENDING_ROWS = 50_000
log = logging.getLogger("sigserve.stores.duckdb")

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE model_registry (
            name VARCHAR NOT NULL, version INTEGER NOT NULL, flavor VARCHAR NOT NULL,
            sha256 VARCHAR, artifact_path VARCHAR, task VARCHAR NOT NULL,
            feature_names VARCHAR[] NOT NULL, classes VARCHAR[] NOT NULL,
            stage VARCHAR NOT NULL DEFAULT 'registered', runtime VARCHAR,
            metrics JSON, extra JSON, created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL,
            PRIMARY KEY (name, version),
            CHECK (stage IN ('registered','staging','production','retired','rejected_by_operator'))
        );
        CREATE TABLE model_events (
            name VARCHAR NOT NULL, version INTEGER NOT NULL, from_stage VARCHAR,
            to_stage VARCHAR NOT NULL, actor VARCHAR NOT NULL, occurred_at TIMESTAMP NOT NULL
        );
        CREATE TABLE feature_registry (
            name VARCHAR PRIMARY KEY, status VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL,
            CHECK (status IN ('registered','deprecated'))
        );
        CREATE TABLE feature_sets (
            feature_key VARCHAR PRIMARY KEY, names VARCHAR[] NOT NULL, created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE feature_values (
            symbol VARCHAR NOT NULL, interval VARCHAR NOT NULL, ts TIMESTAMP NOT NULL,
            feature_key VARCHAR NOT NULL, vals DOUBLE[] NOT NULL, created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE candles (
            symbol VARCHAR NOT NULL, interval VARCHAR NOT NULL, ts TIMESTAMP NOT NULL,
            open DOUBLE, high DOUBLE, low DOUBLE, close DOUBLE, volume DOUBLE,
            created_at TIMESTAMP NOT NULL
        );
        CREATE TABLE signal_definitions (
            signal_id VARCHAR PRIMARY KEY, model_name VARCHAR NOT NULL, model_ref VARCHAR NOT NULL,
            interval VARCHAR NOT NULL, symbols VARCHAR[] NOT NULL, policy JSON NOT NULL,
            status VARCHAR NOT NULL, feature_key VARCHAR,
            created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL,
            CHECK (status IN ('active','retired'))
        );
        CREATE TABLE signal_history (
            signal_id VARCHAR NOT NULL, model_version INTEGER NOT NULL, symbol VARCHAR NOT NULL,
            interval VARCHAR NOT NULL, ts TIMESTAMP NOT NULL, action VARCHAR NOT NULL,
            confidence DOUBLE NOT NULL, raw_output DOUBLE[] NOT NULL,
            entry_price DOUBLE, stop_loss DOUBLE, take_profit DOUBLE, recommended_size DOUBLE,
            model_name VARCHAR NOT NULL, model_sha256 VARCHAR NOT NULL, feature_key VARCHAR,
            source VARCHAR NOT NULL, latency_ms DOUBLE, flags VARCHAR NOT NULL DEFAULT '',
            shadow BOOLEAN NOT NULL DEFAULT false, created_at TIMESTAMP NOT NULL,
            CHECK (source IN ('stream','catchup_scan','historical_replay')),
            CHECK (action IN ('hold','buy','sell','close_long','close_short')),
            CHECK (confidence >= 0 AND confidence <= 1)
        );
        CREATE VIEW predictions AS
            SELECT ts, 'models:/' || model_name || '/' || model_version AS model_path,
                   raw_output[len(raw_output)] AS y_pred, feature_key,
                   symbol || '/' || interval AS dataset, created_at,
                   signal_id, symbol, interval, model_sha256
            FROM signal_history WHERE NOT shadow;
        """,
    ),
]

MIGRATIONS.append((
    2,
    """
    CREATE TABLE feature_coverage (
        symbol VARCHAR NOT NULL, interval VARCHAR NOT NULL, feature_key VARCHAR NOT NULL,
        first_ts TIMESTAMP NOT NULL, last_ts TIMESTAMP NOT NULL,
        PRIMARY KEY (symbol, interval, feature_key)
    );
    INSERT INTO feature_coverage
        SELECT symbol, interval, feature_key, min(ts), max(ts) FROM feature_values GROUP BY ALL;
    """,
))

MIGRATIONS.append((
    3,
    """
    CREATE TABLE training_runs (
        run_id VARCHAR PRIMARY KEY, model_type VARCHAR NOT NULL, experiment VARCHAR NOT NULL,
        config_hash VARCHAR NOT NULL, dataset_version VARCHAR NOT NULL, metrics JSON, details JSON,
        status VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL, completed_at TIMESTAMP,
        CHECK (status IN ('running','completed','failed'))
    );
    """,
))

MIGRATIONS.append((
    4,
    """
    CREATE TABLE traffic_policies (
        signal_id VARCHAR PRIMARY KEY, policy JSON NOT NULL, updated_at TIMESTAMP NOT NULL,
        updated_by VARCHAR NOT NULL
    );
    CREATE TABLE rollout_events (
        signal_id VARCHAR NOT NULL, seq BIGINT NOT NULL, occurred_at TIMESTAMP NOT NULL,
        actor VARCHAR NOT NULL, action VARCHAR NOT NULL, from_policy JSON, to_policy JSON NOT NULL,
        PRIMARY KEY (signal_id, seq)
    );
    """,
))

MIGRATIONS.append((
    5,
    """
    -- moves with every change a signal's resolution reads (see catalog_version)
    CREATE TABLE catalog_version (version BIGINT NOT NULL);
    INSERT INTO catalog_version VALUES (0);
    """,
))

# DuckDB has no triggers: every catalog change runs this in its own transaction
# (DuckDBStore._catalog_change; the changes made on a worker connection run it themselves)
_BUMP_CATALOG = "UPDATE catalog_version SET version = version + 1"

_SIDE_OF_ACTION = {action: int(SIDE_OF_CODE[code]) for code, action in enumerate(ACTIONS) if code != HOLD}


def _first(rows: list[Any]) -> Any:
    """The first row or None. (DuckDB wants every result read to its end before the next.)"""
    return rows[0] if rows else None


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _ts_py(ts: np.datetime64 | None) -> datetime | None:
    if ts is None:
        return None
    micros = int(np.asarray(ts, dtype=TS_DTYPE).astype(np.int64))
    return datetime(1970, 1, 1) + timedelta(microseconds=micros)


def _np_ts(value: Any) -> np.datetime64 | None:
    if value is None:
        return None
    return np.datetime64(value, "us")


def _runs(entries: list[Entry]) -> Iterator[list[Entry]]:
    """Consecutive entries whose batches share every per-batch field (one history's entries)."""
    run: list[Entry] = []
    for entry in entries:
        if run and _batch_fields(run[-1][0]) != _batch_fields(entry[0]):
            yield run
            run = []
        run.append(entry)
    if run:
        yield run


def _set_idle_priority(idle: bool, thread: int = 0) -> bool:
    """A thread (by native id; 0: the calling one) under SCHED_IDLE (``idle``) or back under
    SCHED_OTHER (Linux; a no-op elsewhere); returns ``idle``."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(thread, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
    return idle


def _batch_fields(batch: SignalBatch) -> tuple[Any, ...]:
    return (batch.model_name, batch.model_sha256, batch.source, batch.shadow)


def _nan_for_null(column: Any) -> np.ndarray:
    """A ``fetchnumpy`` float column with NULL as NaN. DuckDB answers a masked array only when
    the column holds NULLs; ``numpy.ma`` is not imported otherwise (11 ms of a cold start)."""
    if hasattr(column, "mask"):
        return np.asarray(column.astype(np.float64).filled(np.nan))
    return np.asarray(column, dtype=np.float64)


def _ts_column(table: pa.Table, name: str) -> np.ndarray:
    import pyarrow as pa

    column = table.column(name)
    if column.num_chunks == 0:
        return np.empty(0, dtype=TS_DTYPE)
    arr = column.combine_chunks().cast(pa.timestamp("us"))
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=TS_DTYPE)


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if column.num_chunks == 0:
        return np.empty(0, dtype=np.float64)
    return np.asarray(column.combine_chunks().to_numpy(zero_copy_only=False), dtype=np.float64)


def _row_columns(batch: SignalBatch) -> dict[str, Any]:
    """A signal batch's per-row values as Arrow columns (NaN levels as NULL), in the table's
    types: what every Arrow write of ``signal_history`` sends whatever else it sends once."""
    import pyarrow as pa

    n = len(batch)
    return {
        "ts": pa.array(np.asarray(batch.ts, dtype=TS_DTYPE)),
        "action": pa.array(np.asarray(batch.action, dtype=np.int8)),
        "confidence": pa.array(np.asarray(batch.confidence, dtype=np.float64)),
        "raw_output": _list_array(np.asarray(batch.raw_output, dtype=np.float64).reshape(n, -1)),
        "entry_price": pa.array(batch.entry_price, pa.float64(), from_pandas=True),
        "stop_loss": pa.array(batch.stop_loss, pa.float64(), from_pandas=True),
        "take_profit": pa.array(batch.take_profit, pa.float64(), from_pandas=True),
        "recommended_size": pa.array(batch.recommended_size, pa.float64(), from_pandas=True),
        "latency_ms": pa.array(np.asarray(batch.latency_ms, dtype=np.float64)),
    }


def _list_array(values: np.ndarray) -> pa.Array:
    """A (n, k) float matrix as an Arrow list<double> column without a Python loop."""
    import pyarrow as pa

    n, k = values.shape
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float64).ravel())
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)  # k = 0: n empty lists
    return pa.ListArray.from_arrays(offsets, flat)


class DuckDBStore:
    """Store on a DuckDB file (or ``:memory:``).

    Usage::

        store = DuckDBStore("/data/sigserve.duckdb")
        await store.open()
    """

    def __init__(self, path: str | Path, *, journal: bool = True,
                 journal_linger_s: float = JOURNAL_LINGER_S) -> None:
        self.path = str(path)
        self.url = f"duckdb:///{self.path}"
        self._con: Any = None
        # signal rows are durable in the journal first, applied to signal_history in the
        # background (see .signal_journal); a file store only (":memory:" keeps nothing anyway)
        self._journal_wanted = journal and self.path != ":memory:"
        self._journal: SignalJournal | None = None
        self._journal_con: Any = None  # the cursor that applies it, under _apply_lock
        self._apply_lock = threading.Lock()
        self._applier_tid = 0  # the applier thread's native id, once it runs
        self._applier_hurried = False  # a waiter raised it to normal priority (see _flush_journal)
        self._applier: threading.Thread | None = None
        self._applier_wake = threading.Condition()
        self._applier_stop = False
        self._apply_failures = 0
        self._journal_linger_s = journal_linger_s
        self._lock = threading.RLock()
        self._feature_sets: dict[str, tuple[str, ...]] = {}
        # the position of each (signal_id, model_version, symbol, interval): see .positions
        self._book = PositionBook()
        self._coverage: dict[tuple[str, str], list[tuple[str, np.datetime64, np.datetime64]]] = {}
        # feature rows and closes of recently read bars: this process is the file's only writer
        self._bars = BarCache()
        # bar cache blocks loading ahead, on a thread of their own: thread futures, not a loop's,
        # because the stream's StoreRunner calls the store from its own event loop and close()
        # runs on another (gathering a future of the runner's loop there raised at shutdown)
        self._prefetches: set[concurrent.futures.Future[None]] = set()
        self._prefetch_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # newest ts of any signal row (shadows too) per (signal_id, model_version, symbol,
        # interval), and the chunks of a history being written: see _write_one
        self._newest_signal: dict[tuple[str, int, str, str], np.datetime64 | None] = {}
        self._chunks_writing: dict[tuple[str, int, str, str], int] = {}
        # DuckDB's thread pool: one thread between bulk statements, its default during them
        self._threads = 1
        self._parallel_ops = 0
        self._threads_lock = threading.Lock()

    @property
    def position_book(self) -> PositionBook:
        """Each signal history's position kept in memory (see :mod:`.positions`): its
        ``loaded_events`` (non-hold rows held) is exported on a server's ``/metrics``."""
        return self._book

    @property
    def bar_cache(self) -> BarCache:
        """The feature rows and closes kept in memory (see :mod:`.bar_cache`): its ``hits``,
        ``misses`` and size are exported on a server's ``/metrics``."""
        return self._bars

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            import duckdb
        except ImportError as exc:  # pragma: no cover - duckdb is a core dependency
            raise StoreUnavailable("duckdb is not installed") from exc
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(self.path)
            self._con.execute("SET TimeZone = 'UTC'")
            # Small statements on one thread: a point query or a one-row upsert spends less
            # (measured 1.1-1.3 ms less per served bar, more when the process is pinned to one
            # core) than with DuckDB's pool waking; bulk statements get the pool back (_parallel).
            self._threads = int(self._con.execute("SELECT current_setting('threads')").fetchall()[0][0])
            if self._threads > 1:
                self._con.execute("SET threads = 1")
        except duckdb.Error as exc:
            raise StoreUnavailable(
                f"cannot open the DuckDB store at {self.path}: {exc}",
                details={"store": self.url},
            ) from exc
        with self._guard(flush=False):
            self._migrate()
            if self._journal_wanted:
                try:
                    self._open_journal()
                except BaseException:
                    self._con.close()
                    self._con = None
                    raise

    @property
    def journal(self) -> SignalJournal | None:
        """The signal journal of a file store (None on ``:memory:`` or with ``journal=False``):
        its ``pending_rows``, ``unapplied_rows``, ``appended`` and ``applied`` counts."""
        return self._journal

    @property
    def journal_apply_failures(self) -> int:
        """Failed applies of the journal in a row (0 when the last one succeeded)."""
        return self._apply_failures

    def _open_journal(self) -> None:
        journal = SignalJournal(Path(self.path + ".journal"))
        left, segments = journal.open()
        try:
            self._journal_con = self._con.cursor()
            self._journal_con.execute("SET TimeZone = 'UTC'")
            if left:  # a crash left rows that were acknowledged but not applied: apply them first
                self._apply_entries(self._journal_con, left)
                log.warning("applied %d signal rows from the journal a previous process left",
                            sum(len(b) for b, _ in left))
            journal.done(segments)
        except BaseException:
            journal.close()  # its segments stay for the next open; its lock is released
            raise
        self._journal = journal
        self._applier_stop = False
        self._applier = threading.Thread(target=self._apply_in_background, name="sigserve-journal",
                                         daemon=True)
        self._applier.start()

    async def close(self) -> None:
        pending = list(self._prefetches)
        if pending:  # their cursors read the connection closed below
            await asyncio.to_thread(concurrent.futures.wait, pending)
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=False)
            self._prefetch_pool = None
        journal, applier = self._journal, self._applier
        if applier is not None:
            with self._applier_wake:
                self._applier_stop = True
                self._applier_wake.notify()
            await asyncio.to_thread(applier.join)
            self._applier = None
            self._applier_tid = 0
        if journal is not None:
            with self._guard(flush=False):
                self._flush_journal(retire=True)  # nothing left to replay at the next open
            journal.close()
            self._journal = None
            self._journal_con.close()
            self._journal_con = None
        if self._con is not None:
            self._con.close()
            self._con = None
        # another process may write the file before this store opens it again
        self._bars.clear()

    async def warm_up(self) -> None:
        """Pay the bulk write path's one-time cost before a latency-sensitive driver needs it:
        DuckDB builds its Arrow scan on first use (about 0.3 s). Done on a throwaway in-memory
        database with ``write_signals``' column types: nothing touches this store's file."""
        import duckdb
        import pyarrow as pa

        con = duckdb.connect(":memory:")
        try:
            n = 2
            table = pa.table({
                "ts": pa.array(np.zeros(n, dtype=TS_DTYPE)), "action": pa.array(np.zeros(n, dtype=np.int8)),
                "confidence": np.zeros(n), "raw_output": _list_array(np.zeros((n, 2))),
                "entry_price": pa.array(np.full(n, np.nan), from_pandas=True), "key": pa.array(["a", "b"])})
            con.register("incoming_warm_up", table)
            con.execute("CREATE TEMP TABLE warm_up AS SELECT * FROM incoming_warm_up WHERE false")
            con.execute("BEGIN TRANSACTION")
            con.execute("DELETE FROM warm_up WHERE ts IN (SELECT ts FROM incoming_warm_up)")
            con.execute("INSERT INTO warm_up SELECT * FROM incoming_warm_up")
            con.execute("COMMIT")
            con.unregister("incoming_warm_up")
        finally:
            con.close()

    async def ping(self) -> None:
        with self._guard():
            self._con.execute("SELECT 1").fetchall()

    async def catalog_version(self) -> int:
        # flush=False: the catalog holds no signal rows, and a server asks for it every TTL on
        # its event loop (a flush there applied the journal and closed a segment: 20-90 ms
        # with 16 requests in flight, once a second)
        with self._guard(flush=False):
            return int(_first(self._con.execute("SELECT version FROM catalog_version").fetchall())[0])

    async def schema_version(self) -> int:
        with self._guard(flush=False):
            row = _first(self._con.execute(
                "SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall())
        return int(row[0])

    def _migrate(self) -> None:
        con = self._con
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " applied_at TIMESTAMP NOT NULL)"
        )
        applied = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
        for version, sql in MIGRATIONS:
            if version in applied:
                continue
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(sql)
                con.execute("INSERT INTO schema_migrations VALUES (?, ?)", [version, _now()])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise

    @contextmanager
    def _guard(self, flush: bool = True, retire: bool = False) -> Iterator[None]:
        """Translate DuckDB exceptions at the boundary; first apply the signal journal's pending
        rows (``flush``: every statement that may read ``signal_history``), and with ``retire``
        close and delete every segment that holds a record (before a statement that writes
        ``signal_history`` straight: see .signal_journal's rules). A read needs the rows
        applied, not the segments gone: retiring them for every read closed a segment (three
        syncs) per read."""
        import duckdb

        if self._con is None:
            raise StoreUnavailable("the store is not open", details={"store": self.url})
        try:
            journal = self._journal
            if flush and journal is not None and (journal.holds_records if retire else journal.unapplied_rows):
                self._flush_journal(retire=retire)
            yield
        except SigserveError:
            raise
        except duckdb.ConstraintException as exc:
            raise ValidationError(f"store constraint violated: {exc}") from exc
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            raise StoreUnavailable(f"store I/O failed: {exc}", details={"store": self.url}) from exc
        except duckdb.Error as exc:
            raise InternalError(f"store error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc

    async def _bulk(self, rows: int, fn: Callable[[Any], T], *, flush: bool = True, retire: bool = False) -> T:
        """Run ``fn(connection)`` inline when small, else on a cursor in a worker thread
        (``flush``, ``retire``: as ``_guard``'s)."""
        if rows < _BULK_ROWS:
            with self._guard(flush, retire):
                return fn(self._con)

        def work() -> T:
            with self._guard(flush, retire):
                cursor = self._con.cursor()
                try:
                    cursor.execute("SET TimeZone = 'UTC'")
                    with self._parallel(cursor):
                        return fn(cursor)
                finally:
                    cursor.close()

        return await asyncio.to_thread(work)

    @contextmanager
    def _parallel(self, con: Any) -> Iterator[None]:
        """DuckDB's default thread count while at least one bulk statement runs, one after.
        ``threads`` is a database-wide setting: the count of running bulk calls decides."""
        if self._threads <= 1:
            yield
            return
        with self._threads_lock:
            self._parallel_ops += 1
            if self._parallel_ops == 1:
                con.execute(f"SET threads = {self._threads}")
        try:
            yield
        finally:
            with self._threads_lock:
                self._parallel_ops -= 1
                if self._parallel_ops == 0:
                    con.execute("SET threads = 1")

    @contextmanager
    def _catalog_change(self) -> Iterator[Any]:
        """A change to what resolutions read, on the store's connection: one transaction that
        also moves the catalog version (DuckDB has no triggers), or nothing at all."""
        with self._guard(), self._lock:
            con = self._con
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute(_BUMP_CATALOG)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    @staticmethod
    def _transaction(con: Any, fn: Callable[[], T]) -> T:
        con.execute("BEGIN TRANSACTION")
        try:
            result = fn()
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        return result

    # --- model registry -------------------------------------------------------------------
    _MODEL_COLUMNS = (
        "name, version, flavor, sha256, artifact_path, task, feature_names, classes, stage,"
        " runtime, metrics, extra, created_at"
    )

    @staticmethod
    def _card(row: tuple[Any, ...]) -> ModelCard:
        return ModelCard(
            name=row[0], version=int(row[1]), flavor=row[2], sha256=row[3], artifact_path=row[4],
            task=Task(row[5]), feature_names=tuple(row[6]), classes=tuple(row[7]),
            stage=Stage(row[8]), runtime=row[9], metrics=json.loads(row[10] or "{}"),
            extra=json.loads(row[11] or "{}"),
            created_at=row[12].replace(tzinfo=UTC).isoformat() if row[12] else "",
        )

    async def insert_model(self, card: ModelCard) -> ModelCard:
        def work(con: Any) -> ModelCard:
            def txn() -> ModelCard:
                row = _first(con.execute(
                    "SELECT coalesce(max(version), 0) + 1 FROM model_registry WHERE name = ?",
                    [card.name],
                ).fetchall())
                version = int(row[0])
                now = _now()
                con.execute(
                    "INSERT INTO model_registry VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [card.name, version, card.flavor, card.sha256, card.artifact_path,
                     str(card.task), list(card.feature_names), list(card.classes),
                     str(card.stage), card.runtime, json.dumps(card.metrics),
                     json.dumps(card.extra), now, now],
                )
                con.execute("INSERT INTO model_events VALUES (?, ?, NULL, ?, 'register', ?)",
                            [card.name, version, str(card.stage), now])
                con.execute(_BUMP_CATALOG)
                got = _first(con.execute(
                    f"SELECT {self._MODEL_COLUMNS} FROM model_registry WHERE name=? AND version=?",
                    [card.name, version],
                ).fetchall())
                return self._card(got)

            return self._transaction(con, txn)

        with self._lock:
            return await self._bulk(0, work)

    async def get_model(self, name: str, version: int) -> ModelCard | None:
        with self._guard():
            row = _first(self._con.execute(
                f"SELECT {self._MODEL_COLUMNS} FROM model_registry WHERE name=? AND version=?",
                [name, version],
            ).fetchall())
        return self._card(row) if row else None

    async def list_models(self, name: str | None = None) -> list[ModelCard]:
        with self._guard():
            rows = self._con.execute(
                f"SELECT {self._MODEL_COLUMNS} FROM model_registry"
                " WHERE ? IS NULL OR name = ? ORDER BY name, version",
                [name, name],
            ).fetchall()
        return [self._card(r) for r in rows]

    async def set_model_stage(self, name: str, version: int, stage: Stage, actor: str) -> None:
        def work(con: Any) -> None:
            def txn() -> None:
                now = _now()
                row = _first(con.execute("SELECT stage FROM model_registry WHERE name=? AND version=?",
                                  [name, version]).fetchall())
                if row is None:
                    raise ValidationError(f"no model {name}:{version}")
                if stage in (Stage.STAGING, Stage.PRODUCTION):
                    holders = con.execute(
                        "SELECT version FROM model_registry WHERE name=? AND stage=? AND version<>?",
                        [name, str(stage), version],
                    ).fetchall()
                    for (held,) in holders:
                        con.execute(
                            "UPDATE model_registry SET stage='registered', updated_at=?"
                            " WHERE name=? AND version=?", [now, name, held])
                        con.execute("INSERT INTO model_events VALUES (?, ?, ?, 'registered', ?, ?)",
                                    [name, held, str(stage), actor, now])
                con.execute("UPDATE model_registry SET stage=?, updated_at=? WHERE name=? AND version=?",
                            [str(stage), now, name, version])
                con.execute("INSERT INTO model_events VALUES (?, ?, ?, ?, ?, ?)",
                            [name, version, row[0], str(stage), actor, now])
                con.execute(_BUMP_CATALOG)

            self._transaction(con, txn)

        with self._lock:
            await self._bulk(0, work)

    async def update_model_extra(self, name: str, version: int, runtime: str | None,
                                 extra: dict[str, Any]) -> None:
        with self._catalog_change() as con:
            con.execute(
                "UPDATE model_registry SET runtime=?, extra=?, updated_at=? WHERE name=? AND version=?",
                [runtime, json.dumps(extra), _now(), name, version],
            )

    async def model_events(self, name: str) -> list[dict[str, Any]]:
        with self._guard():
            rows = self._con.execute(
                "SELECT version, from_stage, to_stage, actor, occurred_at FROM model_events WHERE name=?"
                " ORDER BY occurred_at, version", [name]).fetchall()
        return [
            {"version": r[0], "from": r[1], "to": r[2], "actor": r[3],
             "at": r[4].replace(tzinfo=UTC).isoformat()}
            for r in rows
        ]

    # --- feature registry -----------------------------------------------------------------
    async def register_features(self, names: list[str]) -> list[str]:
        with self._guard(), self._lock:
            known = {r[0] for r in self._con.execute(
                "SELECT name FROM feature_registry WHERE list_contains(?, name)", [names]).fetchall()}
            new = [n for n in dict.fromkeys(names) if n not in known]
            now = _now()
            if new:
                with self._catalog_change() as con:
                    con.executemany("INSERT INTO feature_registry VALUES (?, 'registered', ?, ?)",
                                    [[n, now, now] for n in new])
        return new

    async def feature_statuses(self, names: list[str]) -> dict[str, str]:
        with self._guard():
            rows = self._con.execute(
                "SELECT name, status FROM feature_registry WHERE list_contains(?, name)", [names]
            ).fetchall()
        return dict(rows)

    async def set_feature_status(self, name: str, status: str) -> None:
        with self._catalog_change() as con:
            row = _first(con.execute(
                "UPDATE feature_registry SET status=?, updated_at=? WHERE name=? RETURNING name",
                [status, _now(), name]).fetchall())
            if row is None:
                raise ValidationError(f"no registered feature named {name!r}", details={"name": name})

    async def list_features(self) -> list[dict[str, Any]]:
        with self._guard():
            rows = self._con.execute(
                "SELECT name, status, created_at FROM feature_registry ORDER BY name").fetchall()
        return [{"name": r[0], "status": r[1], "created_at": r[2].replace(tzinfo=UTC).isoformat()}
                for r in rows]

    # --- feature values -------------------------------------------------------------------
    def _names_of(self, con: Any, feature_key: str) -> tuple[str, ...] | None:
        names = self._feature_sets.get(feature_key)
        if names is None:
            row = _first(con.execute("SELECT names FROM feature_sets WHERE feature_key=?",
                              [feature_key]).fetchall())
            if row is None:
                return None
            names = tuple(row[0])
            self._feature_sets[feature_key] = names
        return names

    async def write_features(self, interval: str, feature_key: str, names: tuple[str, ...],
                             symbols: np.ndarray, ts: np.ndarray, values: np.ndarray) -> int:
        n = int(ts.shape[0])
        if values.shape != (n, len(names)):
            raise ValidationError(f"feature matrix shape {values.shape} != ({n}, {len(names)})")
        import pyarrow as pa  # bulk writes go through Arrow (imported here: not on the live path)

        table = pa.table({
            "symbol": pa.array(np.asarray(symbols, dtype=object), pa.string()),
            "ts": pa.array(np.asarray(ts, dtype=TS_DTYPE)),
            "vals": _list_array(values),
        })

        def work(con: Any) -> int:
            con.register("incoming_features", table)
            try:
                dup = _first(con.execute(
                    "SELECT symbol, ts FROM incoming_features GROUP BY ALL HAVING count(*) > 1 LIMIT 1"
                ).fetchall())
                if dup:
                    raise ValidationError(
                        f"duplicate feature rows for (symbol, ts) = ({dup[0]}, {dup[1]}Z)",
                        details={"symbol": dup[0], "ts": f"{dup[1].isoformat()}Z"})

                def txn() -> int:
                    existing = self._names_of(con, feature_key)
                    if existing is None:
                        con.execute("INSERT INTO feature_sets VALUES (?, ?, ?)",
                                    [feature_key, list(names), _now()])
                        self._feature_sets[feature_key] = tuple(names)
                    elif tuple(existing) != tuple(names):
                        raise ValidationError(
                            f"feature_key {feature_key!r} already holds the columns {list(existing)};"
                            " use a new --feature-key for a different column set",
                            details={"feature_key": feature_key, "existing": list(existing),
                                     "incoming": list(names)})
                    con.execute(
                        "DELETE FROM feature_values WHERE interval=$interval AND feature_key=$key"
                        " AND (symbol, ts) IN (SELECT (symbol, ts) FROM incoming_features)",
                        {"interval": interval, "key": feature_key})
                    con.execute(
                        "INSERT INTO feature_values SELECT symbol, $interval, ts, $key, vals, $now"
                        " FROM incoming_features",
                        {"interval": interval, "key": feature_key, "now": _now()})
                    con.execute(
                        "INSERT INTO feature_coverage SELECT symbol, $interval, $key, min(ts), max(ts)"
                        " FROM incoming_features GROUP BY symbol ON CONFLICT DO UPDATE SET"
                        " first_ts = least(first_ts, excluded.first_ts),"
                        " last_ts = greatest(last_ts, excluded.last_ts)",
                        {"interval": interval, "key": feature_key})
                    return n

                return self._transaction(con, txn)
            finally:
                con.unregister("incoming_features")

        written = set(np.asarray(symbols, dtype=object).tolist())
        try:
            with self._bars.writing(written, interval):
                result = await self._bulk(n, work, flush=False)
        except ValidationError:
            self._feature_sets.pop(feature_key, None)
            raise
        finally:
            for symbol in written:
                self._coverage.pop((symbol, interval), None)
        return result

    async def read_features(self, symbol: str, interval: str, names: tuple[str, ...], *,
                            start: np.datetime64 | None = None, end: np.datetime64 | None = None,
                            ts: np.ndarray | None = None,
                            feature_key: str | None = None) -> FeatureRead:
        if ts is not None:
            wanted = unique_ts(ts)
            with self._guard(flush=False):  # the live path and small sets of bars: blocks kept in memory
                con = self._con
                cached = self._bars.read(
                    symbol, interval, names, wanted, feature_key,
                    lambda first, end: self._load_block(con, symbol, interval, first, end),
                    lambda key: self._names_of(con, key))
            if cached is not None:
                if len(wanted):
                    self._prefetch_after(symbol, interval, wanted[-1])
                return cached
        import pyarrow as pa  # bulk reads go through Arrow

        params: dict[str, Any] = {"symbol": symbol, "interval": interval}
        where = ["symbol = $symbol", "interval = $interval"]
        query_ts: pa.Table | None = None
        if ts is not None:  # more bars than the bar cache reads at once
            query_ts = pa.table({"ts": pa.array(wanted)})
            where.append("ts IN (SELECT ts FROM query_ts)")
            rows_hint = int(wanted.size)
        else:
            if start is not None:
                where.append("ts >= $start")
                params["start"] = _ts_py(start)
            if end is not None:
                where.append("ts <= $end")
                params["end"] = _ts_py(end)
            rows_hint = _BULK_ROWS
        bar_filter = " AND ".join(where)
        feature_params = dict(params)
        key_filter = ""
        if feature_key is not None:
            key_filter = " AND feature_key = $key"
            feature_params["key"] = feature_key

        def work(con: Any) -> FeatureRead:
            if query_ts is not None:
                con.register("query_ts", query_ts)
            try:
                newest = ""
                if feature_key is None and self._keys_overlap(con, symbol, interval, start, end, ts) > 1:
                    # Several computations cover these bars: the newest created_at wins per ts.
                    newest = (" QUALIFY row_number() OVER (PARTITION BY ts ORDER BY created_at DESC,"
                              " feature_key DESC) = 1")
                table = con.sql(
                    f"SELECT ts, feature_key, vals FROM feature_values WHERE {bar_filter}{key_filter}"
                    f"{newest}", params=feature_params).to_arrow_table()
                candles = con.sql(f"SELECT ts, close FROM candles WHERE {bar_filter}",
                                  params=params).to_arrow_table()
                return self._assemble(con, table, candles, symbol, interval, names)
            finally:
                if query_ts is not None:
                    con.unregister("query_ts")

        return await self._bulk(rows_hint, work, flush=False)

    def _prefetch_after(self, symbol: str, interval: str, last: np.datetime64) -> None:
        """Near the end of a bar cache block, load the next one on a worker thread (a cursor of
        its own), so the bar that opens it is answered from memory (see BarCache)."""
        first = self._bars.next_to_prefetch(symbol, interval, last)
        if first is None:
            return
        con = self._con

        def work() -> None:
            try:
                cursor = con.cursor()
                try:
                    cursor.execute("SET TimeZone = 'UTC'")
                    self._bars.prefetch(symbol, interval, first,
                                        lambda a, b: self._load_block(cursor, symbol, interval, a, b))
                finally:
                    cursor.close()
            except Exception:  # only a head start: the read of that bar loads the block itself
                log.debug("prefetching a bar cache block failed", exc_info=True)

        if self._prefetch_pool is None:
            self._prefetch_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sigserve-prefetch")
        future = self._prefetch_pool.submit(work)
        self._prefetches.add(future)
        future.add_done_callback(self._prefetches.discard)

    @staticmethod
    def _load_block(con: Any, symbol: str, interval: str, first: np.datetime64,
                    end: np.datetime64) -> Block:
        """The feature rows and closes of ``[first, end)``: two parameterised statements read
        with ``fetchnumpy`` (no Arrow: a live server never imports pyarrow or pandas for it).
        Each row comes out as its width, then its values, so rows of any width share one
        column."""
        params = [symbol, interval, _ts_py(first), _ts_py(end)]
        rows = con.execute(
            "SELECT ts, feature_key, created_at, unnest(list_prepend(len(vals)::DOUBLE, vals)) AS v"
            " FROM (SELECT ts, feature_key, created_at, vals FROM feature_values WHERE symbol=?"
            " AND interval=? AND ts>=? AND ts<? ORDER BY ts, feature_key)", params).fetchnumpy()
        candles = con.execute(
            "SELECT ts, close FROM candles WHERE symbol=? AND interval=? AND ts>=? AND ts<? ORDER BY ts",
            params).fetchnumpy()
        return Block.from_unnested(rows["ts"], rows["feature_key"], rows["created_at"],
                                   _nan_for_null(rows["v"]), candles["ts"], _nan_for_null(candles["close"]))

    def _keys_overlap(self, con: Any, symbol: str, interval: str, start: np.datetime64 | None,
                      end: np.datetime64 | None, ts: np.ndarray | None) -> int:
        """How many feature_keys hold rows in the window, from the coverage kept in memory
        (this process is DuckDB's only writer, so it sees every change)."""
        if ts is not None:
            wanted = np.asarray(ts, dtype=TS_DTYPE)
            if wanted.size == 0:
                return 0
            start, end = wanted.min(), wanted.max()
        return sum(1 for _, first, last in self._spans(con, symbol, interval)
                   if (start is None or last >= start) and (end is None or first <= end))

    def _spans(self, con: Any, symbol: str, interval: str) -> list[tuple[str, np.datetime64, np.datetime64]]:
        """(feature_key, first ts, last ts) of each key's rows of the series, kept in memory
        (this process is DuckDB's only writer, so it sees every change; see write_features)."""
        spans = self._coverage.get((symbol, interval))
        if spans is None:
            rows = con.execute(
                "SELECT feature_key, first_ts, last_ts FROM feature_coverage WHERE symbol=$s"
                " AND interval=$i", {"s": symbol, "i": interval}).fetchall()
            spans = [(r[0], np.datetime64(r[1], "us"), np.datetime64(r[2], "us")) for r in rows]
            self._coverage[(symbol, interval)] = spans
        return spans

    async def newest_feature_ts(self, symbol: str, interval: str) -> np.datetime64 | None:
        # feature rows are only ever upserted, so the newest bar is the coverage's newest last_ts
        with self._guard():
            return max((last for _, _, last in self._spans(self._con, symbol, interval)), default=None)

    def _assemble(self, con: Any, table: pa.Table, candles: pa.Table, symbol: str, interval: str,
                  names: tuple[str, ...]) -> FeatureRead:
        n = table.num_rows
        k = len(names)
        candle_ts = _ts_column(candles, "ts")
        if n == 0:
            empty = FeatureBatch(symbol, interval, np.empty(0, TS_DTYPE), np.empty((0, k)), names,
                                 np.empty(0, dtype=object), np.empty(0))
            return FeatureRead(empty, 0, int(candle_ts.size))
        ts_all = _ts_column(table, "ts")
        order: np.ndarray | None = None
        if n > 1 and not bool(np.all(ts_all[1:] > ts_all[:-1])):
            order = np.argsort(ts_all, kind="stable")
            ts_all = ts_all[order]
        keys_col = table.column("feature_key").combine_chunks().dictionary_encode()
        key_codes = keys_col.indices.to_numpy(zero_copy_only=False)
        key_names = keys_col.dictionary.to_pylist()
        column = table.column("vals")
        flat = np.concatenate([np.asarray(chunk.flatten().to_numpy(zero_copy_only=False),
                                          dtype=np.float64) for chunk in column.chunks])
        lengths = np.concatenate([chunk.value_lengths().to_numpy(zero_copy_only=False)
                                  for chunk in column.chunks]).astype(np.int64)
        offsets = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        if order is not None:
            key_codes, offsets, lengths = key_codes[order], offsets[order], lengths[order]
        keep = np.ones(n, dtype=bool)
        index = np.empty((len(key_names), k), dtype=np.int64)
        for code, key in enumerate(key_names):
            position = {name: i for i, name in enumerate(self._names_of(con, key) or ())}
            if any(name not in position for name in names):
                keep &= key_codes != code
                index[code] = 0
            else:
                index[code] = [position[name] for name in names]
        kept = np.flatnonzero(keep) if not keep.all() else None
        if kept is not None:
            ts_all, key_codes, offsets, lengths = (ts_all[kept], key_codes[kept], offsets[kept],
                                                   lengths[kept])
        rows = ts_all.size
        if len(key_names) == 1:
            idx = index[0]
            width = int(lengths[0]) if rows else k
            contiguous = (order is None and kept is None and flat.size == rows * width
                          and np.array_equal(idx, np.arange(width)))
            values = flat.reshape(rows, width) if contiguous else flat[offsets[:, None] + idx[None, :]]
        else:
            values = flat[offsets[:, None] + index[key_codes]]
        close = np.full(rows, np.nan)
        matched = 0
        if candle_ts.size:
            candle_close = _float_column(candles, "close")
            corder = np.argsort(candle_ts, kind="stable")
            candle_ts, candle_close = candle_ts[corder], candle_close[corder]
            at = np.minimum(np.searchsorted(candle_ts, ts_all), candle_ts.size - 1)
            hit = candle_ts[at] == ts_all
            close[hit] = candle_close[at[hit]]
            matched = int(np.count_nonzero(hit))
            if kept is not None:
                # bars whose row was incomplete are counted there, not as missing
                all_ts = _ts_column(table, "ts")
                at_all = np.minimum(np.searchsorted(candle_ts, all_ts), candle_ts.size - 1)
                matched = int(np.count_nonzero(candle_ts[at_all] == all_ts))
        key_array = np.asarray(key_names, dtype=object)[key_codes]
        batch = FeatureBatch(symbol, interval, ts_all, np.ascontiguousarray(values), names,
                             key_array, close)
        return FeatureRead(batch, int(n - rows), int(candle_ts.size - matched))

    async def feature_window_stats(self, symbol: str, interval: str, start: np.datetime64 | None,
                                   end: np.datetime64 | None) -> tuple[int, np.datetime64 | None,
                                                                        np.datetime64 | None]:
        where = ["symbol=$s", "interval=$i"]
        params: dict[str, Any] = {"s": symbol, "i": interval}
        if start is not None:
            where.append("ts >= $a")
            params["a"] = _ts_py(start)
        if end is not None:
            where.append("ts <= $b")
            params["b"] = _ts_py(end)
        with self._guard():
            keys = self._keys_overlap(self._con, symbol, interval, start, end, None)
            counted = "count(DISTINCT ts)" if keys > 1 else "count(*)"
            row = _first(self._con.execute(
                f"SELECT {counted}, min(ts), max(ts) FROM feature_values WHERE {' AND '.join(where)}",
                params).fetchall())
        return int(row[0]), _np_ts(row[1]), _np_ts(row[2])

    # --- candles --------------------------------------------------------------------------
    async def write_candles(self, symbol: str, interval: str, candles: Candles) -> int:
        n = int(candles.ts.shape[0])
        import pyarrow as pa

        table = pa.table({
            "ts": pa.array(np.asarray(candles.ts, dtype=TS_DTYPE)),
            "open": candles.open, "high": candles.high, "low": candles.low,
            "close": candles.close, "volume": candles.volume,
        })

        def work(con: Any) -> int:
            con.register("incoming_candles", table)
            try:
                dup = _first(con.execute(
                    "SELECT ts FROM incoming_candles GROUP BY ts HAVING count(*) > 1 LIMIT 1"
                ).fetchall())
                if dup:
                    raise ValidationError(f"duplicate candles for ts {dup[0].isoformat()}Z",
                                          details={"ts": f"{dup[0].isoformat()}Z"})

                def txn() -> int:
                    con.execute(
                        "DELETE FROM candles WHERE symbol=$s AND interval=$i"
                        " AND ts IN (SELECT ts FROM incoming_candles)",
                        {"s": symbol, "i": interval})
                    con.execute(
                        "INSERT INTO candles SELECT $s, $i, ts, open, high, low, close, volume, $now"
                        " FROM incoming_candles", {"s": symbol, "i": interval, "now": _now()})
                    return n

                return self._transaction(con, txn)
            finally:
                con.unregister("incoming_candles")

        with self._bars.writing((symbol,), interval):
            return await self._bulk(n, work, flush=False)

    async def read_candles(self, symbol: str, interval: str, start: np.datetime64 | None = None,
                           end: np.datetime64 | None = None) -> Candles:
        def work(con: Any) -> Candles:
            table = con.sql(
                "SELECT ts, open, high, low, close, volume FROM candles WHERE symbol=$s"
                " AND interval=$i AND ($a IS NULL OR ts >= $a) AND ($b IS NULL OR ts <= $b)"
                " ORDER BY ts",
                params={"s": symbol, "i": interval, "a": _ts_py(start), "b": _ts_py(end)},
            ).to_arrow_table()
            return Candles(_ts_column(table, "ts"), *(_float_column(table, c) for c in
                                                       ("open", "high", "low", "close", "volume")))

        return await self._bulk(_BULK_ROWS, work)

    async def bars_missing_features(self, interval: str, symbol: str | None = None,
                                    start: np.datetime64 | None = None,
                                    end: np.datetime64 | None = None,
                                    limit: int = 20) -> tuple[int, list[tuple[str, np.datetime64]]]:
        sql = (
            "FROM candles c WHERE c.interval=$i AND ($s IS NULL OR c.symbol=$s)"
            " AND ($a IS NULL OR c.ts >= $a) AND ($b IS NULL OR c.ts <= $b)"
            " AND NOT EXISTS (SELECT 1 FROM feature_values f WHERE f.symbol=c.symbol"
            " AND f.interval=c.interval AND f.ts=c.ts)"
        )
        params = {"i": interval, "s": symbol, "a": _ts_py(start), "b": _ts_py(end)}
        with self._guard():
            count = _first(self._con.execute(f"SELECT count(*) {sql}", params).fetchall())[0]
            rows = self._con.execute(
                f"SELECT c.symbol, c.ts {sql} ORDER BY c.symbol, c.ts LIMIT {int(limit)}", params
            ).fetchall()
        return int(count), [(r[0], np.datetime64(r[1], "us")) for r in rows]

    # --- signal definitions ---------------------------------------------------------------
    _SIGNAL_COLUMNS = ("signal_id, model_name, model_ref, interval, symbols, policy, status,"
                       " feature_key, created_at")

    @staticmethod
    def _definition(row: tuple[Any, ...]) -> SignalDefinition:
        return SignalDefinition(
            signal_id=row[0], model_name=row[1], model_ref=row[2], interval=row[3],
            symbols=tuple(row[4]), policy=Policy.from_json(row[5]), status=row[6],
            feature_key=row[7], created_at=row[8].replace(tzinfo=UTC).isoformat())

    async def create_signal(self, definition: SignalDefinition) -> None:
        with self._guard(), self._lock:
            exists = _first(self._con.execute("SELECT 1 FROM signal_definitions WHERE signal_id=?",
                                       [definition.signal_id]).fetchall())
            if exists:
                raise ValidationError(f"signal {definition.signal_id!r} already exists",
                                      details={"signal_id": definition.signal_id})
            now = _now()
            with self._catalog_change() as con:
                con.execute(
                    "INSERT INTO signal_definitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [definition.signal_id, definition.model_name, definition.model_ref,
                     definition.interval, list(definition.symbols), definition.policy.to_json(),
                     definition.status, definition.feature_key, now, now])

    async def get_signal(self, signal_id: str) -> SignalDefinition | None:
        with self._guard():
            row = _first(self._con.execute(
                f"SELECT {self._SIGNAL_COLUMNS} FROM signal_definitions WHERE signal_id=?",
                [signal_id]).fetchall())
        return self._definition(row) if row else None

    async def list_signals(self) -> list[SignalDefinition]:
        with self._guard():
            rows = self._con.execute(
                f"SELECT {self._SIGNAL_COLUMNS} FROM signal_definitions ORDER BY signal_id"
            ).fetchall()
        return [self._definition(r) for r in rows]

    async def set_signal_status(self, signal_id: str, status: str) -> None:
        with self._catalog_change() as con:
            row = _first(con.execute(
                "UPDATE signal_definitions SET status=?, updated_at=? WHERE signal_id=?"
                " RETURNING signal_id", [status, _now(), signal_id]).fetchall())
            if row is None:
                from ..errors import SignalNotFound

                raise SignalNotFound(f"no signal {signal_id!r}", details={"signal_id": signal_id})

    # --- signal history -------------------------------------------------------------------
    async def write_signals(self, batch: SignalBatch) -> int:
        return (await self.write_signal_batches([batch]))[0]

    async def write_signal_batches(self, batches: Sequence[SignalBatch]) -> list[int]:
        """Every batch is checked first (one invalid batch writes none). When all are small and
        of histories not being bulk-written, they go to the journal as one append with one
        ``fdatasync`` (a stream's write cycle: one sync for every symbol's rows, applied as one
        INSERT behind); durable once synced, applied behind: bars after every stored one (the
        live case) and bars inside history (a replay, a correction) alike, as their positions
        are read from memory (see .positions). Otherwise each is written on its own, in order."""
        live = [batch for batch in batches if len(batch)]
        for batch in live:
            _check_signals(batch)
        journal = self._journal
        if live and journal is not None and all(self._small(batch) for batch in live):
            journal.append_many(live, _now())
            self._journaled(live)
            return [len(batch) for batch in batches]
        return [await self._write_batch(batch) for batch in batches]

    def _small(self, batch: SignalBatch) -> bool:
        """A write of the live path's size, of a history no bulk write is writing."""
        return len(batch) < _BULK_ROWS and history_of(batch) not in self._chunks_writing

    async def _write_batch(self, batch: SignalBatch) -> int:
        """One checked batch on its own: a small one to the journal (or, without one: ":memory:",
        journal=off, inline into the table), a bulk one on a worker cursor once the journal's
        segments are retired."""
        n = len(batch)
        if n == 0:
            return 0
        if self._small(batch):
            journal = self._journal
            if journal is not None:
                journal.append(batch, _now())
                self._journaled([batch])
                return n
            with self._guard():
                return self._write_small(self._con, batch)
        history = history_of(batch)
        self._chunks_writing[history] = self._chunks_writing.get(history, 0) + 1
        try:
            return await self._bulk(n, lambda con: self._write_rows(con, batch, append=False), retire=True)
        finally:
            left = self._chunks_writing.pop(history) - 1
            if left:
                self._chunks_writing[history] = left
            self._newest_signal.pop(history, None)  # committed or not: the next one-row write reads it

    def _journaled(self, batches: Sequence[SignalBatch]) -> None:
        """After an append: the positions follow the rows, and the applier is woken (or, when it
        is starved, the caller applies the journal itself)."""
        for batch in batches:
            self._remember_position(batch)
        journal = self._journal
        assert journal is not None
        if journal.pending_rows >= JOURNAL_MAX_PENDING_ROWS:
            with self._guard(flush=False):
                self._flush_journal()
        else:
            with self._applier_wake:
                self._applier_wake.notify()

    def _write_small(self, con: Any, batch: SignalBatch, *, remember: bool = True,
                     now: datetime | None = None) -> int:
        """A batch of a server's bars (a few rows): one-row statements for one row; else one
        INSERT when every bar is after the newest stored, or DELETE + INSERT in one transaction."""
        if len(batch) == 1:
            return self._write_one(con, batch, remember=remember, now=now)
        history = history_of(batch)
        newest = self._newest(con, history)
        # bars after everything stored are one INSERT, with no DELETE, BEGIN or COMMIT (~7 ms
        # less for 16 rows measured)
        written = self._write_rows(con, batch, append=newest is None or batch.ts.min() > newest,
                                   remember=remember, now=now)
        self._advance(self._newest_signal, history, batch.ts.max())
        return written

    def _write_rows(self, con: Any, batch: SignalBatch, *, append: bool, remember: bool = True,
                    now: datetime | None = None) -> int:
        """The rows of ``batch`` through Arrow: one INSERT ... SELECT (``append``) or, in one
        transaction, a DELETE of their keys and the INSERT."""
        import pyarrow as pa

        n = len(batch)
        columns = _row_columns(batch)
        params: dict[str, Any] = {
            "sid": batch.signal_id, "ver": batch.model_version, "sym": batch.symbol,
            "itv": batch.interval, "name": batch.model_name, "sha": batch.model_sha256,
            "src": batch.source, "shadow": batch.shadow, "now": now or _now(),
            "actions": list(ACTIONS),
        }
        # Most batches carry one feature_key and no flags: send those once, not per row.
        keys, flags = batch.feature_keys, batch.flags
        if keys[0] == keys[-1] and all(k == keys[0] for k in keys):
            params["fkey"], key_sql = keys[0], "$fkey"
        else:
            columns["feature_key"], key_sql = pa.array(np.asarray(keys, dtype=object), pa.string()), "feature_key"
        if not any(flags):
            params["flags"], flags_sql = "", "$flags"
        else:
            columns["flags"], flags_sql = pa.array(np.asarray(flags, dtype=object), pa.string()), "flags"
        table = pa.table(columns)
        key_params = {k: params[k] for k in ("sid", "ver", "sym", "itv")}
        key_params.update(lo=_ts_py(batch.ts.min()), hi=_ts_py(batch.ts.max()))
        insert = ("INSERT INTO signal_history SELECT $sid, $ver, $sym, $itv, ts,"
                  " $actions[action + 1], confidence, raw_output, entry_price, stop_loss,"
                  f" take_profit, recommended_size, $name, $sha, {key_sql}, $src,"
                  f" latency_ms, {flags_sql}, $shadow, $now FROM incoming_signals")
        con.register("incoming_signals", table)
        try:
            if append:  # nothing to replace: one statement, its own transaction
                con.execute(insert, params)
            else:
                self._transaction(con, lambda: self._replace(con, insert, params, key_params, n))
            if remember:
                self._remember_position(batch)
            return n
        finally:
            con.unregister("incoming_signals")

    # --- the signal journal -----------------------------------------------------------------
    def _flush_journal(self, retire: bool = False) -> None:
        """Apply every pending journal record now (on the journal's cursor), in order;
        ``retire``: then close and delete every segment (before a statement that may write
        ``signal_history`` straight: see signal_journal's rules)."""
        journal = self._journal
        if journal is None:
            return
        if not self._apply_lock.acquire(blocking=False):
            # The applier holds it, at idle priority: on a busy core it would finish only when
            # nothing else wants the CPU, and this caller (a request) waits for it. It runs at
            # normal priority until its next cycle (measured at c=16: an apply stretched to
            # 250-340 ms of wall time under SCHED_IDLE).
            tid = self._applier_tid
            if tid and threading.get_native_id() != tid:
                _set_idle_priority(False, tid)
                self._applier_hurried = True
            self._apply_lock.acquire()
        try:
            entries, segments = journal.take(rotate=retire)
            if entries:
                try:
                    self._apply_entries(self._journal_con, entries)
                except BaseException:
                    journal.requeue(entries)  # still on disk: applied again, first, next time
                    raise
            if segments:
                journal.done(segments)
            if entries:
                journal.count_applied(sum(len(batch) for batch, _ in entries))
        finally:
            self._apply_lock.release()

    def _apply_entries(self, con: Any, entries: list[Entry]) -> None:
        """Journal entries into signal_history: per history in append order, each run of batches
        that share their fields (source, model, shadow, created_at's batch) merged into one write.
        Applying an entry twice is harmless: every write is an upsert at its key."""
        per_history: dict[tuple[str, int, str, str], list[Entry]] = {}
        for entry in entries:
            batch = entry[0]
            per_history.setdefault(history_of(batch), []).append(entry)
        # Runs after their history's newest stored bar (the live case) of several histories go
        # in one INSERT: DuckDB's cost is per statement (~2.5 ms with its commit), not per row,
        # and a stream's linger holds a run of every symbol it serves. Their keys are after
        # everything the other runs touch, so writing them first keeps every history's order.
        appends: list[tuple[SignalBatch, datetime]] = []
        others: list[tuple[SignalBatch, datetime]] = []
        for history, group in per_history.items():
            chunked = history in self._chunks_writing
            newest = None if chunked else self._newest(con, history)
            for run in _runs(group):
                batch = run[0][0] if len(run) == 1 else merge_batches([b for b, _ in run])
                lo, hi = batch.ts.min(), batch.ts.max()
                (others if chunked or (newest is not None and lo <= newest) else appends).append((batch, run[-1][1]))
                newest = hi if newest is None or hi > newest else newest
        if len(appends) > 1:
            self._insert_runs(con, appends)
        else:
            others[:0] = appends
        for batch, now in others:
            self._write_small(con, batch, remember=False, now=now)

    def _insert_runs(self, con: Any, runs: list[tuple[SignalBatch, datetime]]) -> None:
        """Rows of several histories, each run after its history's newest stored bar, in one
        INSERT through Arrow (one statement, its own transaction); the newest bars advance."""
        import pyarrow as pa

        tables = []
        for batch, now in runs:
            n = len(batch)

            def repeat(value: Any, n: int = n) -> pa.Array:
                return pa.array([value] * n, pa.string())

            tables.append(pa.table({
                **_row_columns(batch),
                "signal_id": repeat(batch.signal_id),
                "model_version": pa.array(np.full(n, int(batch.model_version), dtype=np.int32)),
                "symbol": repeat(batch.symbol), "interval": repeat(batch.interval),
                "model_name": repeat(batch.model_name), "model_sha256": repeat(batch.model_sha256),
                "feature_key": pa.array([None if k is None else str(k) for k in batch.feature_keys], pa.string()),
                "source": repeat(batch.source),
                "flags": pa.array([str(f or "") for f in batch.flags], pa.string()),
                "shadow": pa.array(np.full(n, bool(batch.shadow))),
                "created_at": pa.array(np.full(n, np.datetime64(now, "us"))),
            }))
        con.register("incoming_signal_runs", pa.concat_tables(tables))
        try:
            con.execute("INSERT INTO signal_history SELECT signal_id, model_version, symbol, interval, ts,"
                        " $actions[action + 1], confidence, raw_output, entry_price, stop_loss, take_profit,"
                        " recommended_size, model_name, model_sha256, feature_key, source, latency_ms, flags,"
                        " shadow, created_at FROM incoming_signal_runs", {"actions": list(ACTIONS)})
        finally:
            con.unregister("incoming_signal_runs")
        for batch, _ in runs:
            self._advance(self._newest_signal, history_of(batch), batch.ts.max())

    def _queued_rows(self) -> int:
        journal = self._journal
        return 0 if journal is None else journal.pending_rows

    def _apply_in_background(self) -> None:
        """The applier thread: a linger after the first pending record, then one apply of all.

        It runs under SCHED_IDLE (Linux): it takes a CPU only when nothing else of normal
        priority wants it, so a request never waits behind an apply for a core (DuckDB drops the
        GIL while a statement runs). A server pinned to one core measured p90 3.6-4.4 ms for new
        bars without it, 2.5-2.9 with it. Starved (past JOURNAL_BOOST_ROWS queued), it takes
        normal priority until it has caught up; past JOURNAL_MAX_PENDING_ROWS the writers apply
        the rows themselves.
        """
        self._applier_tid = threading.get_native_id()
        idle = _set_idle_priority(True)
        while True:
            with self._applier_wake:
                self._applier_wake.wait_for(lambda: self._applier_stop or bool(self._queued_rows()))
                # the linger (longer after failures): appends notify, only close() ends it early
                self._applier_wake.wait_for(lambda: self._applier_stop,
                                            self._journal_linger_s * (1 + min(self._apply_failures, 40)))
                if self._applier_stop:
                    return
            behind = self._queued_rows() >= JOURNAL_BOOST_ROWS
            if behind == idle or (self._applier_hurried and idle):
                self._applier_hurried = False
                idle = _set_idle_priority(not behind)
            try:
                self._flush_journal()
                self._apply_failures = 0
            except Exception:  # retried; the rows stay in the journal and a reader's flush raises
                self._apply_failures += 1
                if self._apply_failures in (1, 10) or self._apply_failures % 100 == 0:
                    log.exception("applying the signal journal failed (%d times in a row); retrying",
                                  self._apply_failures)

    @staticmethod
    def _replace(con: Any, insert: str, params: dict[str, Any], key_params: dict[str, Any], n: int) -> int:
        """The rows of ``incoming_signals`` replace those at their keys (inside a transaction)."""
        con.execute(
            "DELETE FROM signal_history WHERE signal_id=$sid AND model_version=$ver"
            " AND symbol=$sym AND interval=$itv AND ts BETWEEN $lo AND $hi"
            + ("" if n == 1 else " AND ts IN (SELECT ts FROM incoming_signals)"), key_params)
        con.execute(insert, params)
        return n

    def _newest(self, con: Any, history: tuple[str, int, str, str]) -> np.datetime64 | None:
        """The newest stored ts of a history, None when it is empty (cached: this process is the
        file's only writer; not to be asked while a chunk of the history is being written)."""
        if history not in self._newest_signal:
            self._newest_signal[history] = _np_ts(_first(con.execute(
                "SELECT max(ts) FROM signal_history WHERE signal_id=? AND model_version=? AND symbol=?"
                " AND interval=?", list(history)).fetchall())[0])
        return self._newest_signal[history]

    @staticmethod
    def _advance(newest_of: dict[tuple[str, int, str, str], np.datetime64 | None],
                 history: tuple[str, int, str, str], at: np.datetime64) -> None:
        """Move a cached newest ts of a history (``_newest_signal``) to ``at``
        if that is later; a history not cached stays so."""
        if history in newest_of:
            newest = newest_of[history]
            if newest is None or at > newest:
                newest_of[history] = at

    _SIGNAL_INSERT = (
        "INSERT INTO signal_history (signal_id, model_version, symbol, interval, ts, action, confidence,"
        " raw_output, entry_price, stop_loss, take_profit, recommended_size, model_name, model_sha256,"
        " feature_key, source, latency_ms, flags, shadow, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    _SIGNAL_UPDATE = (
        "UPDATE signal_history SET action=?, confidence=?, raw_output=?, entry_price=?, stop_loss=?,"
        " take_profit=?, recommended_size=?, model_name=?, model_sha256=?, feature_key=?, source=?,"
        " latency_ms=?, flags=?, shadow=?, created_at=? WHERE signal_id=? AND model_version=? AND symbol=?"
        " AND interval=? AND ts=? RETURNING 1")

    def _write_one(self, con: Any, batch: SignalBatch, *, remember: bool = True,
                   now: datetime | None = None) -> int:
        """Upsert one signal row (the live path) with parameterised statements, no Arrow: the
        same row, NULLs and NaNs as the chunk path writes; each write is one transaction.

        A bar after the newest stored one of its history (the live case) has no row to replace:
        it is one INSERT. This process is the file's only writer and sees every write (see
        _newest_signal), unless a chunk of the same history is being written on a worker
        thread: then the bar is treated as inside history (UPDATE, else INSERT).
        """

        def level(value: Any) -> float | None:  # NaN levels are stored as NULL (from_pandas)
            v = float(value)
            return None if v != v else v

        key = [batch.signal_id, int(batch.model_version), batch.symbol, batch.interval, _ts_py(batch.ts[0])]
        feature_key = batch.feature_keys[0]
        row = [*key, ACTIONS[int(batch.action[0])], float(batch.confidence[0]),
               np.asarray(batch.raw_output, dtype=np.float64).reshape(1, -1)[0].tolist(),
               level(batch.entry_price[0]), level(batch.stop_loss[0]), level(batch.take_profit[0]),
               level(batch.recommended_size[0]), batch.model_name, batch.model_sha256,
               None if feature_key is None else str(feature_key), batch.source,
               float(batch.latency_ms[0]), str(batch.flags[0] or ""), bool(batch.shadow), now or _now()]
        history = history_of(batch)
        at = np.asarray(batch.ts[:1], dtype=TS_DTYPE)[0]
        append = False
        if history not in self._chunks_writing:
            newest = self._newest(con, history)
            append = newest is None or at > newest
        if append:  # one statement: its own transaction (no BEGIN and COMMIT round trips)
            con.execute(self._SIGNAL_INSERT, row)
        else:
            # Inside history: the row at that key, if any, is replaced by one UPDATE (its own
            # transaction; ~0.8 ms less than DELETE + INSERT in one); none there: one INSERT.
            updated = con.execute(self._SIGNAL_UPDATE, [*row[5:], *key]).fetchall()
            if len(updated) == 0:
                con.execute(self._SIGNAL_INSERT, row)
            elif len(updated) > 1:  # several rows at one key (never written so here): keep one
                con.begin()
                try:
                    con.execute("DELETE FROM signal_history WHERE signal_id=? AND model_version=?"
                                " AND symbol=? AND interval=? AND ts=?", key)
                    con.execute(self._SIGNAL_INSERT, row)
                except BaseException:
                    con.rollback()
                    raise
                con.commit()
        self._advance(self._newest_signal, history, at)
        if remember:
            self._remember_position(batch)
        return 1

    async def read_bar(self, symbol: str, interval: str, names: tuple[str, ...], ts: np.datetime64, *,
                       feature_key: str | None = None,
                       position: tuple[str, int] | None = None) -> tuple[FeatureRead, int]:
        # in process: no round trip to save, so the two reads in turn
        read = await self.read_features(symbol, interval, names, ts=np.array([ts], dtype=TS_DTYPE),
                                        feature_key=feature_key)
        if position is None or len(read.batch) == 0:
            return read, FLAT
        sides = await self.position_sides(position[0], position[1], symbol, interval, read.batch.ts[:1])
        return read, int(sides[0])

    async def position_sides(self, signal_id: str, model_version: int, symbol: str, interval: str,
                             before: np.ndarray) -> np.ndarray:
        before = np.asarray(before, dtype=TS_DTYPE)
        sides = np.full(before.shape[0], FLAT, dtype=np.int8)
        if before.size == 0:
            return sides
        base = ("FROM signal_history WHERE signal_id=$sid AND model_version=$ver AND symbol=$sym"
                " AND interval=$itv AND action <> 'hold' AND NOT shadow")
        params: dict[str, Any] = {"sid": signal_id, "ver": model_version, "sym": symbol,
                                  "itv": interval}
        key = (signal_id, model_version, symbol, interval)
        if key not in self._book:  # its summary first (one aggregate scan): a live bar needs no more
            with self._guard():
                self._latest_position(self._con, key)
        side = self._book.side_after_newest(key, before)
        if side is not None:
            # the live case (a server's grouped bars too), from memory: no SQL, so no wait for
            # the signal journal's apply
            sides[:] = side
            return sides
        if key not in self._chunks_writing:
            # inside history (a replay, a correction): from the history's events, loaded on
            # the first such read (one scan), then kept up to date by every write
            known = self._book.sides_before(key, before)
            if known is None and before.size < _BULK_ROWS and self._load_events(key):
                known = self._book.sides_before(key, before)
            if known is not None:
                return known
        if before.size == 1:
            with self._guard():
                latest = self._latest_position(self._con, (signal_id, model_version, symbol, interval))
                if latest is None or before[0] > latest[0]:
                    # the live case: a bar after everything written so far
                    sides[0] = FLAT if latest is None else latest[1]
                    return sides
                # A bar inside history: look back a bounded span first (zone maps skip the rest
                # of the table), then everything before it.
                params["t"] = _ts_py(before[0])
                params["from"] = _ts_py(before[0] - np.timedelta64(1000 * interval_us(interval), "us"))
                row = _first(self._con.execute(
                    f"SELECT action {base} AND ts < $t AND ts >= $from ORDER BY ts DESC LIMIT 1",
                    params).fetchall())
                if row is None and before[0] > latest[2]:
                    sides[0] = latest[1]  # no event in the span, none after the newest
                    return sides
                if row is None:
                    del params["from"]
                    row = _first(self._con.execute(
                        f"SELECT action {base} AND ts < $t ORDER BY ts DESC LIMIT 1", params).fetchall())
            if row:
                sides[0] = _SIDE_OF_ACTION[row[0]]
            return sides
        import pyarrow as pa

        query = pa.table({"i": np.arange(before.size, dtype=np.int64), "ts": pa.array(before)})

        def work(con: Any) -> list[tuple[int, str | None]]:
            con.register("query_ts", query)
            try:
                rows: list[tuple[int, str | None]] = con.execute(
                    f"SELECT q.i, h.action FROM query_ts q ASOF LEFT JOIN (SELECT ts, action {base}) h"
                    " ON q.ts > h.ts", params).fetchall()
                return rows
            finally:
                con.unregister("query_ts")

        for i, action in await self._bulk(before.size, work):
            if action is not None:
                sides[i] = _SIDE_OF_ACTION[action]
        return sides

    def _latest_position(self, con: Any, key: tuple[str, int, str, str]) -> tuple[np.datetime64, int,
                                                                                 np.datetime64] | None:
        """(newest ts, side after it, ts of the newest non-hold) of one history, kept in the
        position book (see .positions). A miss costs one scan of that history."""
        never = np.datetime64("1677-09-22T00:00:00", "us")
        known = self._book.summary(key)
        if known is None:
            if self._book.known_empty(key):
                return None
            row = _first(con.execute(
                "SELECT max(ts), arg_max(action, ts) FILTER (WHERE action <> 'hold'),"
                " max(ts) FILTER (WHERE action <> 'hold') FROM signal_history"
                " WHERE signal_id=$sid AND model_version=$ver AND symbol=$sym AND interval=$itv"
                " AND NOT shadow", dict(zip(("sid", "ver", "sym", "itv"), key, strict=True))).fetchall())
            if not row or row[0] is None:
                self._book.learn_empty(key)  # this process writes the file: it sees the first row
                return None
            self._book.learn(key, np.datetime64(row[0], "us"), _SIDE_OF_ACTION[row[1]] if row[1] else FLAT,
                             np.datetime64(row[2], "us") if row[2] is not None else None)
            known = self._book.summary(key)
            assert known is not None
        newest, side, last_event = known
        return newest, side, never if last_event is None else last_event

    def _load_events(self, key: tuple[str, int, str, str]) -> bool:
        """Load every non-hold row of a history into the position book (after its pending rows
        are applied); False when the history is empty or too large to keep."""
        with self._guard():
            if self._latest_position(self._con, key) is None:
                return False
            columns = self._con.execute(
                "SELECT ts, (list_position($actions, action) - 1)::TINYINT AS code FROM signal_history"
                " WHERE signal_id=$sid AND model_version=$ver AND symbol=$sym AND interval=$itv"
                " AND action <> 'hold' AND NOT shadow ORDER BY ts",
                {**dict(zip(("sid", "ver", "sym", "itv"), key, strict=True)),
                 "actions": list(ACTIONS)}).fetchnumpy()
        return self._book.load_events(key, np.asarray(columns["ts"], dtype=TS_DTYPE),
                                      np.asarray(columns["code"], dtype=np.int64))

    def _remember_position(self, batch: SignalBatch) -> None:
        """Follow a committed or journaled write in the position book."""
        self._book.remember(batch)

    async def last_signal_ts(self, signal_id: str, symbol: str,
                             interval: str) -> np.datetime64 | None:
        with self._guard():
            row = _first(self._con.execute(
                "SELECT max(ts) FROM signal_history WHERE signal_id=? AND symbol=? AND interval=?"
                " AND NOT shadow", [signal_id, symbol, interval]).fetchall())
        return _np_ts(row[0]) if row else None

    async def read_signals(self, signal_id: str, symbol: str | None = None,
                           interval: str | None = None, start: np.datetime64 | None = None,
                           end: np.datetime64 | None = None,
                           limit: int | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT * FROM signal_history WHERE signal_id=$sid AND ($sym IS NULL OR symbol=$sym)"
            " AND ($itv IS NULL OR interval=$itv) AND ($a IS NULL OR ts >= $a)"
            " AND ($b IS NULL OR ts <= $b) ORDER BY ts, symbol, model_version"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        params = {"sid": signal_id, "sym": symbol, "itv": interval, "a": _ts_py(start),
                  "b": _ts_py(end)}
        with self._guard():
            cursor = self._con.execute(sql, params)
            columns = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        return [dict(zip(columns, r, strict=True)) for r in rows]

    async def signal_action_counts(self, signal_id: str) -> dict[str, int]:
        with self._guard():
            rows = self._con.execute(
                "SELECT action, count(*) FROM signal_history WHERE signal_id=? AND NOT shadow"
                " GROUP BY action", [signal_id]).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    # --- training runs --------------------------------------------------------------------
    _RUN_COLUMNS = ("run_id, model_type, experiment, config_hash, dataset_version, metrics, details,"
                    " status, created_at, completed_at")

    @staticmethod
    def _run(row: tuple[Any, ...]) -> TrainingRun:
        return TrainingRun(
            run_id=row[0], model_type=row[1], experiment=row[2], config_hash=row[3],
            dataset_version=row[4], metrics=json.loads(row[5] or "{}"),
            details=json.loads(row[6] or "{}"), status=row[7],
            created_at=row[8].replace(tzinfo=UTC).isoformat() if row[8] else "",
            completed_at=row[9].replace(tzinfo=UTC).isoformat() if row[9] else None)

    async def save_training_run(self, run: TrainingRun) -> TrainingRun:
        now = _now()
        completed = None
        if run.completed_at:
            completed = datetime.fromisoformat(run.completed_at).astimezone(UTC).replace(tzinfo=None)
        elif run.status != "running":
            completed = now
        with self._guard(), self._lock:
            self._con.execute(
                f"INSERT INTO training_runs ({self._RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id) DO UPDATE SET model_type = excluded.model_type,"
                " experiment = excluded.experiment, config_hash = excluded.config_hash,"
                " dataset_version = excluded.dataset_version, metrics = excluded.metrics,"
                " details = excluded.details, status = excluded.status,"
                " completed_at = coalesce(training_runs.completed_at, excluded.completed_at)",
                [run.run_id, run.model_type, run.experiment, run.config_hash, run.dataset_version,
                 json.dumps(run.metrics, default=str), json.dumps(run.details, default=str),
                 run.status, now, completed])
            row = _first(self._con.execute(
                f"SELECT {self._RUN_COLUMNS} FROM training_runs WHERE run_id = ?", [run.run_id]).fetchall())
        return self._run(row)

    async def get_training_run(self, run_id: str) -> TrainingRun | None:
        with self._guard():
            row = _first(self._con.execute(
                f"SELECT {self._RUN_COLUMNS} FROM training_runs WHERE run_id = ?", [run_id]).fetchall())
        return self._run(row) if row else None

    async def list_training_runs(self, experiment: str | None = None) -> list[TrainingRun]:
        with self._guard():
            rows = self._con.execute(
                f"SELECT {self._RUN_COLUMNS} FROM training_runs WHERE ? IS NULL OR experiment = ?"
                " ORDER BY created_at, run_id", [experiment, experiment]).fetchall()
        return [self._run(r) for r in rows]

    # --- traffic policies -----------------------------------------------------------------
    @staticmethod
    def _policy(row: tuple[Any, ...]) -> TrafficPolicy:
        data = json.loads(row[0])
        data.update(updated_at=row[1].replace(tzinfo=UTC).isoformat(), updated_by=row[2])
        return TrafficPolicy.from_dict(data)

    async def get_traffic_policy(self, signal_id: str) -> TrafficPolicy | None:
        with self._guard():
            row = _first(self._con.execute(
                "SELECT policy, updated_at, updated_by FROM traffic_policies WHERE signal_id=?",
                [signal_id]).fetchall())
        return self._policy(row) if row else None

    async def list_traffic_policies(self) -> list[TrafficPolicy]:
        with self._guard():
            rows = self._con.execute("SELECT policy, updated_at, updated_by FROM traffic_policies"
                                     " ORDER BY signal_id").fetchall()
        return [self._policy(r) for r in rows]

    async def set_traffic_policy(self, policy: TrafficPolicy, *, actor: str,
                                 action: str) -> TrafficPolicy:
        def work(con: Any) -> TrafficPolicy:
            def txn() -> TrafficPolicy:
                now = _now()
                body = {k: v for k, v in policy.to_dict().items() if k not in ("updated_at", "updated_by")}
                old = _first(con.execute(
                    "SELECT policy, updated_at, updated_by FROM traffic_policies WHERE signal_id=?",
                    [policy.signal_id]).fetchall())
                seq = _first(con.execute("SELECT coalesce(max(seq), 0) + 1 FROM rollout_events"
                                         " WHERE signal_id=?", [policy.signal_id]).fetchall())[0]
                con.execute("DELETE FROM traffic_policies WHERE signal_id=?", [policy.signal_id])
                con.execute("INSERT INTO traffic_policies VALUES (?, ?, ?, ?)",
                            [policy.signal_id, json.dumps(body), now, actor])
                previous = self._policy(old).to_dict() if old else None
                stored = TrafficPolicy.from_dict({**body, "updated_at": now.replace(tzinfo=UTC).isoformat(),
                                                  "updated_by": actor})
                con.execute("INSERT INTO rollout_events VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [policy.signal_id, int(seq), now, actor, action,
                             None if previous is None else json.dumps(previous),
                             json.dumps(stored.to_dict())])
                con.execute(_BUMP_CATALOG)
                return stored

            return self._transaction(con, txn)

        with self._lock:
            return await self._bulk(0, work)

    async def rollout_events(self, signal_id: str) -> list[dict[str, Any]]:
        with self._guard():
            rows = self._con.execute(
                "SELECT occurred_at, actor, action, from_policy, to_policy FROM rollout_events"
                " WHERE signal_id=? ORDER BY seq", [signal_id]).fetchall()
        return [{"at": r[0].replace(tzinfo=UTC).isoformat(), "actor": r[1], "action": r[2],
                 "from": json.loads(r[3]) if r[3] else None, "to": json.loads(r[4])} for r in rows]
