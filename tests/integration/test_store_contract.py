"""The Store contract: every implementation passes this suite unchanged.

Only Store protocol methods are used here (no SQL), so a new backend joins by adding a factory to
``STORE_FACTORIES`` in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.domain import (
    ACTION_CODE,
    FLAT,
    LONG,
    SHORT,
    ModelCard,
    Policy,
    SignalBatch,
    SignalDefinition,
    Stage,
    Task,
)
from sigserve.errors import SignalNotFound, SigserveError, ValidationError
from sigserve.stores import Candles, Store

from .conftest import REOPENABLE, STORE_FACTORIES

T0 = np.datetime64("2024-01-01T00:00:00", "us")
HOUR = np.timedelta64(3_600_000_000, "us")


def t(i: int) -> np.datetime64:
    return T0 + i * HOUR


def ts_array(*hours: int) -> np.ndarray:
    return np.array([t(i) for i in hours], dtype="datetime64[us]")


def as_ts(value: Any) -> np.datetime64:
    """A timestamp as the store returned it (datetime, aware or naive UTC, or datetime64)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return np.datetime64(value, "us")
    return np.datetime64(value, "us")


# --- builders -----------------------------------------------------------------------------------

def card(name: str = "m", **changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "name": name, "version": 0, "flavor": "lightgbm", "sha256": "ab" * 32,
        "artifact_path": f"artifacts/ab/{'ab' * 32}.txt", "task": Task.BINARY,
        "feature_names": ("f0", "f1", "atr_14"), "classes": ("down", "up"),
        "metrics": {"auc": 0.61}, "extra": {"trained_on": "BTC"},
    }
    fields.update(changes)
    return ModelCard(**fields)


async def write_rows(store: Store, key: str, names: tuple[str, ...], hours: list[int],
                     values: np.ndarray | list[list[float]], *, symbol: str = "BTC",
                     interval: str = "1h") -> int:
    return await store.write_features(
        interval, key, names, np.array([symbol] * len(hours), dtype=object), ts_array(*hours),
        np.asarray(values, dtype=np.float64))


def candles(hours: list[int], close: list[float]) -> Candles:
    c = np.asarray(close, dtype=np.float64)
    return Candles(ts_array(*hours), c - 0.5, c + 1.0, c - 1.0, c, np.full(c.shape, 10.0))


def batch(hours: list[int], actions: list[str], *, confidence: list[float] | None = None,
          signal_id: str = "sig", symbol: str = "BTC", interval: str = "1h", version: int = 1,
          shadow: bool = False, source: str = "historical_replay", price: float = 100.0) -> SignalBatch:
    n = len(hours)
    conf = np.asarray(confidence if confidence is not None else [0.7] * n, dtype=np.float64)
    return SignalBatch(
        signal_id=signal_id, symbol=symbol, interval=interval, model_name="m",
        model_version=version, model_sha256="cd" * 32, source=source, ts=ts_array(*hours),
        action=np.array([ACTION_CODE[a] for a in actions], dtype=np.int8),
        confidence=conf,
        raw_output=np.column_stack([1.0 - conf, conf]),
        entry_price=np.full(n, price),
        stop_loss=np.full(n, price - 2.0),
        take_profit=np.full(n, np.nan),
        recommended_size=np.full(n, 0.5),
        feature_keys=np.array(["fk1"] * n, dtype=object),
        latency_ms=np.full(n, 1.25),
        flags=np.array([""] * n, dtype=object),
        shadow=shadow,
    )


def definition(signal_id: str = "sig", **changes: Any) -> SignalDefinition:
    fields: dict[str, Any] = {
        "signal_id": signal_id, "model_name": "m", "model_ref": "@production", "interval": "1h",
        "symbols": ("BTC", "ETH"), "policy": Policy(threshold=0.6, atr_feature="atr_14"),
        "feature_key": "fk1",
    }
    fields.update(changes)
    return SignalDefinition(**fields)


# --- lifecycle and migrations ------------------------------------------------------------------

async def test_ping_open_store(store: Store) -> None:
    await store.ping()


@pytest.mark.parametrize("factory", [f for name, f in STORE_FACTORIES if name in REOPENABLE],
                         ids=[name for name, _ in STORE_FACTORIES if name in REOPENABLE])
async def test_reopen_applies_migrations_once_and_keeps_data(factory: Any, tmp_path: Path) -> None:
    first = await factory(tmp_path)
    try:
        await first.insert_model(card())
        await first.register_features(["f0"])
        await write_rows(first, "fk1", ("f0",), [0, 1], [[1.0], [2.0]])
        await first.write_signals(batch([0], ["buy"]))
    finally:
        await first.close()
    for reopen in range(2):  # migrations already applied: opening again must neither fail nor reset
        again = await factory(tmp_path)
        try:
            await again.ping()
            assert [c.version for c in await again.list_models("m")] == list(range(1, reopen + 2))
            assert (await again.insert_model(card())).version == reopen + 2
            assert await again.feature_statuses(["f0"]) == {"f0": "registered"}
            read = await again.read_features("BTC", "1h", ("f0",))
            assert read.batch.values[:, 0].tolist() == [1.0, 2.0]
            assert len(await again.read_signals("sig")) == 1
            # A known feature_key keeps its column set across reopen.
            with pytest.raises(ValidationError):
                await write_rows(again, "fk1", ("f1",), [2], [[3.0]])
        finally:
            await again.close()


# --- model registry ----------------------------------------------------------------------------

async def test_insert_model_assigns_versions_per_name(store: Store) -> None:
    inserted = [await store.insert_model(card("m")) for _ in range(3)]
    other = await store.insert_model(card("other", flavor="xgboost"))
    assert [c.version for c in inserted] == [1, 2, 3]
    assert other.version == 1
    assert all(c.stage == Stage.REGISTERED and c.created_at for c in inserted)


async def test_get_and_list_models_round_trip(store: Store) -> None:
    await store.insert_model(card("zeta"))
    await store.insert_model(card("m"))
    await store.insert_model(card("m", task=Task.MULTICLASS, classes=("a", "b", "c"),
                                  feature_names=("x", "y"), metrics={"acc": 0.4},
                                  extra={"k": [1, 2]}, sha256=None, artifact_path=None))
    got = await store.get_model("m", 2)
    assert got is not None
    assert (got.name, got.version, got.flavor, got.task) == ("m", 2, "lightgbm", Task.MULTICLASS)
    assert got.feature_names == ("x", "y")
    assert got.classes == ("a", "b", "c")
    assert got.sha256 is None and got.artifact_path is None
    assert got.metrics == {"acc": 0.4}
    assert got.extra == {"k": [1, 2]}
    first = await store.get_model("m", 1)
    assert first is not None and first.sha256 == "ab" * 32 and first.feature_names == ("f0", "f1", "atr_14")
    assert await store.get_model("m", 3) is None
    assert await store.get_model("nope", 1) is None
    assert [(c.name, c.version) for c in await store.list_models("m")] == [("m", 1), ("m", 2)]
    assert [(c.name, c.version) for c in await store.list_models()] == [("m", 1), ("m", 2), ("zeta", 1)]
    assert await store.list_models("nope") == []


async def stages(store: Store, name: str) -> dict[int, Stage]:
    return {c.version: c.stage for c in await store.list_models(name)}


async def test_set_model_stage_demotes_previous_holder(store: Store) -> None:
    for _ in range(3):
        await store.insert_model(card("m"))
    await store.insert_model(card("other"))
    await store.set_model_stage("other", 1, Stage.PRODUCTION, "ops")
    await store.set_model_stage("m", 1, Stage.PRODUCTION, "alice")
    await store.set_model_stage("m", 2, Stage.STAGING, "alice")
    assert await stages(store, "m") == {1: Stage.PRODUCTION, 2: Stage.STAGING, 3: Stage.REGISTERED}

    await store.set_model_stage("m", 2, Stage.PRODUCTION, "bob")
    assert await stages(store, "m") == {1: Stage.REGISTERED, 2: Stage.PRODUCTION, 3: Stage.REGISTERED}
    await store.set_model_stage("m", 3, Stage.STAGING, "bob")
    assert await stages(store, "m") == {1: Stage.REGISTERED, 2: Stage.PRODUCTION, 3: Stage.STAGING}
    # Another model's holder is untouched.
    assert await stages(store, "other") == {1: Stage.PRODUCTION}

    # Retiring demotes nobody.
    await store.set_model_stage("m", 2, Stage.RETIRED, "carol")
    assert await stages(store, "m") == {1: Stage.REGISTERED, 2: Stage.RETIRED, 3: Stage.STAGING}

    events = await store.model_events("m")
    moves = [(e["version"], e["from"], e["to"], e["actor"]) for e in events]
    assert moves.count((1, None, "registered", "register")) == 1
    assert len([m for m in moves if m[3] == "register"]) == 3
    assert (1, "registered", "production", "alice") in moves
    assert (2, "registered", "staging", "alice") in moves
    assert (1, "production", "registered", "bob") in moves  # the demotion, by the promoter
    assert (2, "staging", "production", "bob") in moves
    assert (3, "registered", "staging", "bob") in moves
    assert (2, "production", "retired", "carol") in moves
    assert len(moves) == 3 + 6
    assert all(e["at"] for e in events)
    assert all(e["version"] == 1 for e in await store.model_events("other"))
    assert await store.model_events("nope") == []


async def test_set_model_stage_unknown_version_changes_nothing(store: Store) -> None:
    await store.insert_model(card("m"))
    await store.set_model_stage("m", 1, Stage.PRODUCTION, "alice")
    before = await store.model_events("m")
    with pytest.raises(SigserveError):
        await store.set_model_stage("m", 7, Stage.PRODUCTION, "bob")
    assert await stages(store, "m") == {1: Stage.PRODUCTION}
    assert await store.model_events("m") == before


async def test_update_model_extra(store: Store) -> None:
    await store.insert_model(card("m"))
    await store.insert_model(card("m"))
    await store.update_model_extra("m", 2, "lleaves", {"compiled": "cache/x.so", "n": 3})
    updated = await store.get_model("m", 2)
    untouched = await store.get_model("m", 1)
    assert updated is not None and untouched is not None
    assert updated.runtime == "lleaves"
    assert updated.extra == {"compiled": "cache/x.so", "n": 3}
    assert updated.metrics == {"auc": 0.61}
    assert untouched.runtime is None and untouched.extra == {"trained_on": "BTC"}
    await store.update_model_extra("m", 2, None, {})
    reset = await store.get_model("m", 2)
    assert reset is not None and reset.runtime is None and reset.extra == {}


# --- feature registry --------------------------------------------------------------------------

async def test_feature_registry(store: Store) -> None:
    assert await store.register_features(["a", "b"]) == ["a", "b"]
    assert await store.register_features(["b", "c", "c", "a"]) == ["c"]
    assert await store.register_features([]) == []
    assert await store.feature_statuses(["a", "c", "zzz"]) == {"a": "registered", "c": "registered"}
    assert await store.feature_statuses([]) == {}

    await store.set_feature_status("a", "deprecated")
    assert await store.feature_statuses(["a", "b"]) == {"a": "deprecated", "b": "registered"}
    assert await store.register_features(["a", "d"]) == ["d"]  # a known name keeps its status
    assert await store.feature_statuses(["a"]) == {"a": "deprecated"}

    listed = await store.list_features()
    assert [(f["name"], f["status"]) for f in listed] == [
        ("a", "deprecated"), ("b", "registered"), ("c", "registered"), ("d", "registered")]
    assert all(f["created_at"] for f in listed)

    await store.set_feature_status("a", "registered")
    assert await store.feature_statuses(["a"]) == {"a": "registered"}


async def test_feature_status_refusals(store: Store) -> None:
    await store.register_features(["a"])
    with pytest.raises(ValidationError) as info:
        await store.set_feature_status("nope", "deprecated")
    assert info.value.code == "validation_error"
    assert await store.feature_statuses(["nope"]) == {}
    with pytest.raises(ValidationError):
        await store.set_feature_status("a", "bogus")
    assert await store.feature_statuses(["a"]) == {"a": "registered"}


# --- feature values ----------------------------------------------------------------------------

NAMES = ("a", "b", "c")


def grid(hours: list[int], scale: float = 1.0) -> np.ndarray:
    """Row i, column j holds scale * (100 * hour + j): every cell tells where it came from."""
    return np.array([[scale * (100 * h + j) for j in range(3)] for h in hours],
                    dtype=np.float64).reshape(-1, 3)


async def test_write_features_upsert_is_idempotent(store: Store) -> None:
    assert await write_rows(store, "k", NAMES, [0, 1, 2], grid([0, 1, 2])) == 3
    await write_rows(store, "k", NAMES, [0, 1, 2], grid([0, 1, 2]))
    await write_rows(store, "k", NAMES, [1, 2, 3], grid([1, 2, 3], scale=-1.0))
    pinned = await store.read_features("BTC", "1h", NAMES, feature_key="k")
    assert pinned.batch.ts.tolist() == ts_array(0, 1, 2, 3).tolist()  # one row per key
    np.testing.assert_array_equal(pinned.batch.values, np.vstack([grid([0]), grid([1, 2, 3], -1.0)]))
    latest = await store.read_features("BTC", "1h", NAMES)
    np.testing.assert_array_equal(latest.batch.values, pinned.batch.values)
    assert await store.feature_window_stats("BTC", "1h", None, None) == (4, t(0), t(3))


async def test_read_at_ts_returns_only_that_ts(store: Store) -> None:
    await write_rows(store, "k", NAMES, [0, 1, 2, 3, 4], grid([0, 1, 2, 3, 4]))
    one = await store.read_features("BTC", "1h", NAMES, ts=ts_array(2))
    assert one.batch.ts.tolist() == [t(2)]
    np.testing.assert_array_equal(one.batch.values, grid([2]))
    missing = await store.read_features("BTC", "1h", NAMES, ts=np.array([t(2) + HOUR // 2]))
    assert len(missing.batch) == 0 and missing.incomplete == 0
    assert missing.batch.values.shape == (0, 3)
    after = await store.read_features("BTC", "1h", NAMES, ts=ts_array(9))
    assert len(after.batch) == 0
    several = await store.read_features("BTC", "1h", NAMES, ts=ts_array(3, 1, 7, 3))
    assert several.batch.ts.tolist() == [t(1), t(3)]
    np.testing.assert_array_equal(several.batch.values, grid([1, 3]))
    other_symbol = await store.read_features("ETH", "1h", NAMES, ts=ts_array(2))
    assert len(other_symbol.batch) == 0
    nothing = await store.read_features("BTC", "1h", NAMES, ts=np.array([], dtype="datetime64[us]"))
    assert len(nothing.batch) == 0 and nothing.batch.values.shape == (0, 3)


async def test_pinned_key_versus_newest_created_at(store: Store) -> None:
    # The older key sorts last alphabetically, so only created_at can make the newer one win.
    await write_rows(store, "zz-old", NAMES, [0, 1], grid([0, 1]))
    await asyncio.sleep(0.01)
    await write_rows(store, "aa-new", NAMES, [0], grid([0], scale=-1.0))

    latest = await store.read_features("BTC", "1h", NAMES)
    assert latest.batch.ts.tolist() == [t(0), t(1)]
    assert latest.batch.feature_keys.tolist() == ["aa-new", "zz-old"]
    np.testing.assert_array_equal(latest.batch.values, np.vstack([grid([0], -1.0), grid([1])]))

    at0 = await store.read_features("BTC", "1h", NAMES, ts=ts_array(0))
    assert at0.batch.feature_keys.tolist() == ["aa-new"]
    np.testing.assert_array_equal(at0.batch.values, grid([0], -1.0))

    pinned_old = await store.read_features("BTC", "1h", NAMES, feature_key="zz-old")
    assert pinned_old.batch.feature_keys.tolist() == ["zz-old", "zz-old"]
    np.testing.assert_array_equal(pinned_old.batch.values, grid([0, 1]))
    pinned_old_at0 = await store.read_features("BTC", "1h", NAMES, ts=ts_array(0), feature_key="zz-old")
    np.testing.assert_array_equal(pinned_old_at0.batch.values, grid([0]))

    pinned_new = await store.read_features("BTC", "1h", NAMES, feature_key="aa-new")
    assert pinned_new.batch.ts.tolist() == [t(0)]
    unknown = await store.read_features("BTC", "1h", NAMES, feature_key="never-written")
    assert len(unknown.batch) == 0


async def test_columns_follow_requested_names(store: Store) -> None:
    await write_rows(store, "k1", NAMES, [0, 1], grid([0, 1]))
    # Same features stored in another order under another key, at other bars.
    await write_rows(store, "k2", ("c", "a", "b"), [2], grid([2])[:, [2, 0, 1]])
    subset = await store.read_features("BTC", "1h", ("c", "a"), ts=ts_array(0))
    assert subset.batch.names == ("c", "a")
    np.testing.assert_array_equal(subset.batch.values, grid([0])[:, [2, 0]])

    mixed = await store.read_features("BTC", "1h", ("b", "c", "a"))
    assert mixed.batch.ts.tolist() == [t(0), t(1), t(2)]
    assert mixed.batch.feature_keys.tolist() == ["k1", "k1", "k2"]
    np.testing.assert_array_equal(mixed.batch.values, grid([0, 1, 2])[:, [1, 2, 0]])
    assert mixed.incomplete == 0

    only_k2 = await store.read_features("BTC", "1h", NAMES, feature_key="k2")
    np.testing.assert_array_equal(only_k2.batch.values, grid([2]))
    single = await store.read_features("BTC", "1h", ("b",), start=t(1), end=t(2))
    np.testing.assert_array_equal(single.batch.values, grid([1, 2])[:, [1]])


async def test_rows_lacking_a_requested_name_are_incomplete(store: Store) -> None:
    await write_rows(store, "full", ("a", "b"), [0, 2], [[0.0, 1.0], [2.0, 3.0]])
    await write_rows(store, "partial", ("a",), [1, 3, 4], [[10.0], [30.0], [40.0]])
    both = await store.read_features("BTC", "1h", ("a", "b"))
    assert both.batch.ts.tolist() == [t(0), t(2)]
    assert both.incomplete == 3
    np.testing.assert_array_equal(both.batch.values, [[0.0, 1.0], [2.0, 3.0]])
    assert len(both.batch.close) == 2 and len(both.batch.feature_keys) == 2

    only_a = await store.read_features("BTC", "1h", ("a",))
    assert only_a.incomplete == 0
    assert only_a.batch.values[:, 0].tolist() == [0.0, 10.0, 2.0, 30.0, 40.0]

    none = await store.read_features("BTC", "1h", ("a", "b"), feature_key="partial")
    assert len(none.batch) == 0 and none.incomplete == 3
    assert none.batch.values.shape == (0, 2)
    unknown = await store.read_features("BTC", "1h", ("zzz",), ts=ts_array(0))
    assert len(unknown.batch) == 0 and unknown.incomplete == 1


async def test_nan_feature_values_round_trip(store: Store) -> None:
    await write_rows(store, "k", ("a", "b"), [0, 1], [[math.nan, 1.0], [2.0, math.nan]])
    read = await store.read_features("BTC", "1h", ("b", "a"))
    assert read.incomplete == 0
    np.testing.assert_array_equal(read.batch.values, [[1.0, math.nan], [math.nan, 2.0]])


async def test_duplicate_symbol_ts_in_batch_writes_nothing(store: Store) -> None:
    with pytest.raises(ValidationError) as info:
        await store.write_features("1h", "k", ("a",), np.array(["BTC", "ETH", "BTC"], dtype=object),
                                   ts_array(0, 0, 0), np.array([[1.0], [2.0], [3.0]]))
    assert info.value.code == "validation_error"
    for symbol in ("BTC", "ETH"):
        read = await store.read_features(symbol, "1h", ("a",))
        assert len(read.batch) == 0 and read.incomplete == 0
    assert await store.feature_window_stats("ETH", "1h", None, None) == (0, None, None)
    # The key was not claimed either: another column set may still use it.
    await write_rows(store, "k", ("x", "y"), [0], [[5.0, 6.0]])
    # The same ts for different symbols is fine.
    await store.write_features("1h", "k2", ("a",), np.array(["BTC", "ETH"], dtype=object),
                               ts_array(0, 0), np.array([[1.0], [2.0]]))
    assert (await store.read_features("ETH", "1h", ("a",))).batch.values.tolist() == [[2.0]]


async def test_feature_key_names_never_change(store: Store) -> None:
    await write_rows(store, "k", ("a", "b"), [0], [[1.0, 2.0]])
    for names in (("a", "c"), ("b", "a"), ("a",), ("a", "b", "c")):
        with pytest.raises(ValidationError) as info:
            await write_rows(store, "k", names, [0, 5], np.full((2, len(names)), 9.0))
        assert info.value.code == "validation_error"
    read = await store.read_features("BTC", "1h", ("a", "b"), feature_key="k")
    assert read.batch.ts.tolist() == [t(0)]
    assert read.batch.values.tolist() == [[1.0, 2.0]]
    # The original column set still writes.
    await write_rows(store, "k", ("a", "b"), [1], [[3.0, 4.0]])
    assert len((await store.read_features("BTC", "1h", ("a", "b"), feature_key="k")).batch) == 2


async def test_feature_matrix_shape_mismatch_refused(store: Store) -> None:
    with pytest.raises(ValidationError):
        await write_rows(store, "k", ("a", "b"), [0, 1], [[1.0], [2.0]])
    assert len((await store.read_features("BTC", "1h", ("a",))).batch) == 0


async def test_window_reads_and_isolation(store: Store) -> None:
    await write_rows(store, "k", NAMES, [0, 1, 2, 3, 4, 5], grid([0, 1, 2, 3, 4, 5]))
    await write_rows(store, "k", NAMES, [2, 3], grid([2, 3], scale=7.0), symbol="ETH")
    await write_rows(store, "k4", NAMES, [0, 4], grid([0, 4], scale=3.0), interval="4h")

    async def hours(**kwargs: Any) -> list[int]:
        read = await store.read_features("BTC", "1h", NAMES, **kwargs)
        np.testing.assert_array_equal(read.batch.values, grid([int((x - T0) // HOUR) for x in read.batch.ts]))
        assert read.batch.symbol == "BTC" and read.batch.interval == "1h"
        return [int((x - T0) // HOUR) for x in read.batch.ts]

    assert await hours() == [0, 1, 2, 3, 4, 5]
    assert await hours(start=t(1), end=t(3)) == [1, 2, 3]  # inclusive on both ends
    assert await hours(start=t(1) + HOUR // 2, end=t(3) - 1) == [2]
    assert await hours(start=t(4)) == [4, 5]
    assert await hours(end=t(1)) == [0, 1]
    assert await hours(start=t(9)) == []
    eth = await store.read_features("ETH", "1h", NAMES)
    np.testing.assert_array_equal(eth.batch.values, grid([2, 3], scale=7.0))
    four = await store.read_features("BTC", "4h", NAMES, start=t(0), end=t(4))
    np.testing.assert_array_equal(four.batch.values, grid([0, 4], scale=3.0))


async def test_close_price_joined_from_candles(store: Store) -> None:
    await write_rows(store, "k", NAMES, [0, 1, 2], grid([0, 1, 2]))
    await store.write_candles("BTC", "1h", candles([0, 1], [100.0, 101.0]))
    await store.write_candles("BTC", "4h", candles([2], [555.0]))
    await store.write_candles("ETH", "1h", candles([2], [777.0]))
    read = await store.read_features("BTC", "1h", NAMES)
    assert read.batch.close[:2].tolist() == [100.0, 101.0]
    assert math.isnan(read.batch.close[2])
    at = await store.read_features("BTC", "1h", NAMES, ts=ts_array(1), feature_key="k")
    assert at.batch.close.tolist() == [101.0]


async def test_missing_counts_candle_bars_without_feature_rows(store: Store) -> None:
    await store.write_candles("BTC", "1h", candles([0, 1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0, 5.0]))
    await store.write_candles("ETH", "1h", candles([5, 6], [1.0, 2.0]))
    await write_rows(store, "full", ("a", "b"), [1, 2, 7], [[1.0, 1.0], [2.0, 2.0], [7.0, 7.0]])
    await write_rows(store, "partial", ("a",), [3], [[3.0]])

    window = await store.read_features("BTC", "1h", ("a", "b"))
    assert window.batch.ts.tolist() == [t(1), t(2), t(7)]  # a row without a candle is still read
    assert window.batch.close[:2].tolist() == [2.0, 3.0] and math.isnan(window.batch.close[2])
    assert (window.incomplete, window.missing) == (1, 2)  # t3 incomplete; t0 and t4 have no row
    narrow = await store.read_features("BTC", "1h", ("a", "b"), start=t(1), end=t(3))
    assert (narrow.incomplete, narrow.missing) == (1, 0)
    listed = await store.read_features("BTC", "1h", ("a", "b"), ts=ts_array(0, 2, 6))
    assert listed.batch.ts.tolist() == [t(2)]
    assert (listed.incomplete, listed.missing) == (0, 1)  # t6 has neither a candle nor a row
    one = await store.read_features("BTC", "1h", ("a",), ts=ts_array(4))
    assert (len(one.batch), one.incomplete, one.missing) == (0, 0, 1)
    pinned = await store.read_features("BTC", "1h", ("a",), feature_key="partial")
    assert pinned.batch.ts.tolist() == [t(3)] and pinned.missing == 4
    none = await store.read_features("ETH", "1h", ("a",))
    assert (len(none.batch), none.missing) == (0, 2)


async def test_one_bar_read_equals_that_bar_of_a_listed_read(store: Store) -> None:
    # One bar may take a path of its own (the live read); its answer is that of a list read.
    await store.write_candles("BTC", "1h", candles([0, 1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    await write_rows(store, "full", ("a", "b"), [1, 2, 3, 6], [[1.0, math.nan], [2.0, 2.5], [3.0, 3.5],
                                                               [6.0, 6.5]])
    await write_rows(store, "partial", ("a",), [4], [[4.0]])
    await asyncio.sleep(0.01)
    await write_rows(store, "newer", ("b", "a"), [2, 5], [[-2.5, -2.0], [-5.5, -5.0]])
    far = t(1000)  # no row and no candle: adds nothing to a listed read
    for hour in range(8):
        for names in (("a", "b"), ("b",), ()):
            for key in (None, "full", "partial", "newer"):
                one = await store.read_features("BTC", "1h", names, ts=ts_array(hour), feature_key=key)
                listed = await store.read_features("BTC", "1h", names, ts=np.array([t(hour), far]),
                                                   feature_key=key)
                case = (hour, names, key)
                assert (one.incomplete, one.missing) == (listed.incomplete, listed.missing), case
                assert one.batch.ts.tolist() == listed.batch.ts.tolist(), case
                assert one.batch.names == listed.batch.names == names, case
                assert one.batch.values.shape == listed.batch.values.shape == (len(listed.batch), len(names))
                np.testing.assert_array_equal(one.batch.values, listed.batch.values)
                np.testing.assert_array_equal(one.batch.close, listed.batch.close)
                assert one.batch.feature_keys.tolist() == listed.batch.feature_keys.tolist(), case
    newest = await store.read_features("BTC", "1h", ("a", "b"), ts=ts_array(2))
    assert newest.batch.feature_keys.tolist() == ["newer"] and newest.batch.values.tolist() == [[-2.0, -2.5]]
    assert newest.batch.close.tolist() == [3.0]


async def test_read_bar_is_the_bar_and_the_position_before_it(store: Store) -> None:
    # read_bar (the live path's one call) answers what its two reads answer, on every store.
    await store.write_candles("BTC", "1h", candles([0, 1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    await write_rows(store, "full", ("a", "b"), [1, 2, 3, 6], [[1.0, math.nan], [2.0, 2.5], [3.0, 3.5],
                                                               [6.0, 6.5]])
    await write_rows(store, "partial", ("a",), [4], [[4.0]])
    # sig v1: t0 buy, t1 hold, t2 sell; a v2 shadow buy at t1; another signal's buy at t2
    await store.write_signals(batch([0, 1, 2], ["buy", "hold", "sell"]))
    await store.write_signals(batch([1], ["buy"], version=2, shadow=True))
    await store.write_signals(batch([2], ["buy"], signal_id="other"))
    positions: list[tuple[str, int] | None] = [None, ("sig", 1), ("sig", 2), ("other", 1), ("none", 1)]
    for hour in range(8):
        for names in (("a", "b"), ("a",)):
            for key in (None, "full", "partial"):
                for position in positions:
                    case = (hour, names, key, position)
                    read, side = await store.read_bar("BTC", "1h", names, t(hour), feature_key=key,
                                                      position=position)
                    alone = await store.read_features("BTC", "1h", names, ts=ts_array(hour), feature_key=key)
                    assert (read.incomplete, read.missing) == (alone.incomplete, alone.missing), case
                    assert read.batch.ts.tolist() == alone.batch.ts.tolist(), case
                    np.testing.assert_array_equal(read.batch.values, alone.batch.values)
                    np.testing.assert_array_equal(read.batch.close, alone.batch.close)
                    assert read.batch.feature_keys.tolist() == alone.batch.feature_keys.tolist(), case
                    expected = FLAT
                    if position is not None and len(alone.batch):
                        expected = int((await store.position_sides(*position, "BTC", "1h", ts_array(hour)))[0])
                    assert side == expected, case
    # the answers themselves, not only agreement: short after t2's sell, long between t0 and t2
    assert (await store.read_bar("BTC", "1h", ("a",), t(3), position=("sig", 1)))[1] == SHORT
    assert (await store.read_bar("BTC", "1h", ("a",), t(2), position=("sig", 1)))[1] == LONG
    assert (await store.read_bar("BTC", "1h", ("a",), t(3), position=("other", 1)))[1] == LONG
    assert (await store.read_bar("BTC", "1h", ("a",), t(3), position=("sig", 2)))[1] == FLAT  # shadows: never
    assert (await store.read_bar("BTC", "1h", ("a",), t(5), position=("sig", 1)))[1] == FLAT  # no row at t5


async def test_feature_window_stats(store: Store) -> None:
    assert await store.feature_window_stats("BTC", "1h", None, None) == (0, None, None)
    await write_rows(store, "k1", ("a",), [1, 2, 3], [[1.0], [2.0], [3.0]])
    await write_rows(store, "k2", ("a",), [2, 3, 5], [[1.0], [2.0], [3.0]])
    await write_rows(store, "k1", ("a",), [0, 9], [[1.0], [2.0]], symbol="ETH")
    count, first, last = await store.feature_window_stats("BTC", "1h", None, None)
    assert (count, first, last) == (4, t(1), t(5))  # distinct bars, not rows
    assert isinstance(first, np.datetime64) and first.dtype == np.dtype("datetime64[us]")
    assert await store.feature_window_stats("BTC", "1h", t(2), t(3)) == (2, t(2), t(3))
    assert await store.feature_window_stats("BTC", "1h", t(4), None) == (1, t(5), t(5))
    assert await store.feature_window_stats("BTC", "1h", None, t(1)) == (1, t(1), t(1))
    assert await store.feature_window_stats("BTC", "1h", t(6), t(8)) == (0, None, None)
    assert await store.feature_window_stats("BTC", "4h", None, None) == (0, None, None)


async def test_newest_feature_ts(store: Store) -> None:
    assert await store.newest_feature_ts("BTC", "1h") is None
    await write_rows(store, "k1", ("a",), [1, 2, 3], [[1.0], [2.0], [3.0]])
    assert await store.newest_feature_ts("BTC", "1h") == t(3)
    await write_rows(store, "k2", ("a",), [2, 5], [[1.0], [2.0]])  # another key, newer
    newest = await store.newest_feature_ts("BTC", "1h")
    assert newest == t(5) and isinstance(newest, np.datetime64)
    assert newest.dtype == np.dtype("datetime64[us]")
    await write_rows(store, "k1", ("a",), [0, 9], [[1.0], [2.0]], symbol="ETH")
    await write_rows(store, "k1", ("a",), [1, 3], [[5.0], [6.0]])  # an upsert of older bars
    assert await store.newest_feature_ts("BTC", "1h") == t(5)
    assert await store.newest_feature_ts("ETH", "1h") == t(9)
    assert await store.newest_feature_ts("BTC", "4h") is None
    # it agrees with the window stats' last bar
    assert (await store.feature_window_stats("BTC", "1h", None, None))[2] == t(5)


async def test_bulk_feature_round_trip(store: Store) -> None:
    """Large batches may take another code path (worker thread, COPY): same results."""
    n = 6_000
    ts = T0 + np.arange(n) * HOUR
    values = np.column_stack([np.arange(n, dtype=np.float64), -np.arange(n, dtype=np.float64)])
    symbols = np.array(["BTC"] * n, dtype=object)
    await store.write_features("1h", "k", ("a", "b"), symbols, ts, values)
    await store.write_features("1h", "k", ("a", "b"), symbols, ts, values + 0.5)
    await store.write_candles("BTC", "1h", Candles(ts, *(np.full(n, 50.0) for _ in range(4)), np.ones(n)))
    read = await store.read_features("BTC", "1h", ("b", "a"))
    assert read.batch.ts.tolist() == ts.tolist()
    np.testing.assert_array_equal(read.batch.values, (values + 0.5)[:, ::-1])
    assert (read.batch.close == 50.0).all()
    query = ts[::-1][: n - 1]
    at = await store.read_features("BTC", "1h", ("a",), ts=query)
    assert at.batch.ts.tolist() == np.sort(query).tolist()
    np.testing.assert_array_equal(at.batch.values[:, 0], np.arange(1, n) + 0.5)
    assert await store.feature_window_stats("BTC", "1h", None, None) == (n, ts[0], ts[-1])
    got = await store.read_candles("BTC", "1h")
    assert got.ts.shape == (n,)


# --- candles -----------------------------------------------------------------------------------

def candle_rows(c: Candles) -> list[tuple[Any, ...]]:
    return list(zip(c.ts.tolist(), c.open.tolist(), c.high.tolist(), c.low.tolist(), c.close.tolist(),
                    c.volume.tolist(), strict=True))


async def test_candles_write_read_upsert(store: Store) -> None:
    empty = await store.read_candles("BTC", "1h")
    assert empty.ts.shape == (0,) and empty.ts.dtype == np.dtype("datetime64[us]")
    assert await store.write_candles("BTC", "1h", candles([0, 1, 2], [100.0, 101.0, 102.0])) == 3
    await store.write_candles("BTC", "1h", candles([0, 1, 2], [100.0, 101.0, 102.0]))
    await store.write_candles("BTC", "1h", candles([2, 3], [202.0, 203.0]))
    await store.write_candles("ETH", "1h", candles([1], [9.0]))
    await store.write_candles("BTC", "4h", candles([0], [8.0]))
    got = await store.read_candles("BTC", "1h")
    assert candle_rows(got) == candle_rows(candles([0, 1, 2, 3], [100.0, 101.0, 202.0, 203.0]))
    assert got.ts.dtype == np.dtype("datetime64[us]") and got.close.dtype == np.float64
    window = await store.read_candles("BTC", "1h", start=t(1), end=t(2))
    assert window.ts.tolist() == [t(1), t(2)]
    assert (await store.read_candles("BTC", "1h", start=t(3))).close.tolist() == [203.0]
    assert (await store.read_candles("BTC", "1h", end=t(0))).close.tolist() == [100.0]
    assert (await store.read_candles("ETH", "1h")).close.tolist() == [9.0]


async def test_candles_nan_volume_and_duplicate_refusal(store: Store) -> None:
    c = candles([0, 1], [10.0, 11.0])
    await store.write_candles("BTC", "1h", Candles(c.ts, c.open, c.high, c.low, c.close,
                                                   np.array([np.nan, 3.0])))
    got = await store.read_candles("BTC", "1h")
    assert math.isnan(got.volume[0]) and got.volume[1] == 3.0
    with pytest.raises(ValidationError):
        await store.write_candles("BTC", "1h", candles([2, 3, 2], [1.0, 2.0, 3.0]))
    assert (await store.read_candles("BTC", "1h")).ts.tolist() == [t(0), t(1)]


async def test_bars_missing_features(store: Store) -> None:
    await store.write_candles("BTC", "1h", candles([0, 1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0, 5.0]))
    await store.write_candles("ETH", "1h", candles([0, 1], [1.0, 2.0]))
    await store.write_candles("BTC", "4h", candles([0], [1.0]))
    await write_rows(store, "k", ("a",), [1, 3], [[1.0], [2.0]])
    await write_rows(store, "k", ("a",), [0], [[1.0]], interval="4h")
    await write_rows(store, "k", ("a",), [0], [[1.0]], symbol="SOL")  # features without a candle

    count, rows = await store.bars_missing_features("1h")
    assert count == 5
    assert rows == [("BTC", t(0)), ("BTC", t(2)), ("BTC", t(4)), ("ETH", t(0)), ("ETH", t(1))]
    count, rows = await store.bars_missing_features("1h", limit=2)
    assert count == 5 and rows == [("BTC", t(0)), ("BTC", t(2))]
    assert await store.bars_missing_features("1h", symbol="ETH") == (2, [("ETH", t(0)), ("ETH", t(1))])
    assert await store.bars_missing_features("1h", "BTC", t(2), t(3)) == (1, [("BTC", t(2))])
    assert await store.bars_missing_features("1h", start=t(1)) == (3, [("BTC", t(2)), ("BTC", t(4)),
                                                                        ("ETH", t(1))])
    assert await store.bars_missing_features("4h") == (0, [])
    await write_rows(store, "other", ("z",), [0, 2, 4], [[1.0], [2.0], [3.0]])
    assert (await store.bars_missing_features("1h", symbol="BTC"))[0] == 0


# --- signal definitions ------------------------------------------------------------------------

async def test_signal_definitions(store: Store) -> None:
    await store.create_signal(definition("sig-b"))
    await store.create_signal(definition("sig-a", model_ref="3", symbols=(), feature_key=None,
                                         policy=Policy(class_actions={"up": "buy", "down": "sell"})))
    got = await store.get_signal("sig-b")
    assert got is not None
    assert (got.signal_id, got.model_name, got.model_ref, got.interval) == ("sig-b", "m", "@production", "1h")
    assert got.symbols == ("BTC", "ETH")
    assert got.policy == Policy(threshold=0.6, atr_feature="atr_14")
    assert got.status == "active" and got.active and got.feature_key == "fk1" and got.created_at
    other = await store.get_signal("sig-a")
    assert other is not None
    assert other.symbols == () and other.feature_key is None and other.model_ref == "3"
    assert other.policy.class_actions == {"up": "buy", "down": "sell"}
    assert await store.get_signal("nope") is None
    assert [d.signal_id for d in await store.list_signals()] == ["sig-a", "sig-b"]


async def test_duplicate_signal_refused_and_status(store: Store) -> None:
    await store.create_signal(definition("sig"))
    with pytest.raises(ValidationError) as info:
        await store.create_signal(definition("sig", model_name="other", interval="4h"))
    assert info.value.code == "validation_error"
    kept = await store.get_signal("sig")
    assert kept is not None and kept.model_name == "m" and kept.interval == "1h"
    assert len(await store.list_signals()) == 1

    await store.set_signal_status("sig", "retired")
    retired = await store.get_signal("sig")
    assert retired is not None and retired.status == "retired" and not retired.active
    await store.set_signal_status("sig", "active")
    assert (await store.get_signal("sig")).active  # type: ignore[union-attr]
    with pytest.raises(ValidationError):
        await store.set_signal_status("sig", "paused")
    assert (await store.get_signal("sig")).status == "active"  # type: ignore[union-attr]
    with pytest.raises(SignalNotFound) as missing:
        await store.set_signal_status("nope", "retired")
    assert missing.value.code == "signal_not_found"


# --- signal history ----------------------------------------------------------------------------

def by_ts(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {as_ts(r["ts"]): r for r in rows}


async def test_write_signals_round_trip_and_upsert(store: Store) -> None:
    assert await store.write_signals(batch([0, 1, 2], ["buy", "hold", "sell"],
                                           confidence=[0.9, 0.5, 0.8])) == 3
    rows = await store.read_signals("sig")
    assert [as_ts(r["ts"]) for r in rows] == [t(0), t(1), t(2)]
    first = rows[0]
    assert first["signal_id"] == "sig" and first["symbol"] == "BTC" and first["interval"] == "1h"
    assert first["action"] == "buy" and first["confidence"] == pytest.approx(0.9)
    assert first["model_name"] == "m" and first["model_version"] == 1
    assert first["model_sha256"] == "cd" * 32 and first["source"] == "historical_replay"
    assert list(first["raw_output"]) == pytest.approx([0.1, 0.9])
    assert first["entry_price"] == 100.0 and first["stop_loss"] == 98.0
    assert first["take_profit"] is None or math.isnan(first["take_profit"])
    assert first["recommended_size"] == 0.5 and first["feature_key"] == "fk1"
    assert first["latency_ms"] == 1.25 and first["flags"] == "" and first["shadow"] is False

    # Same key again: one row per key, values replaced.
    await store.write_signals(batch([1, 2], ["sell", "close_short"], confidence=[0.6, 0.65], price=200.0,
                                    source="stream"))
    rows = by_ts(await store.read_signals("sig"))
    assert len(rows) == 3
    assert [rows[t(i)]["action"] for i in range(3)] == ["buy", "sell", "close_short"]
    assert rows[t(1)]["confidence"] == pytest.approx(0.6)
    assert rows[t(2)]["entry_price"] == 200.0 and rows[t(2)]["source"] == "stream"
    assert rows[t(0)]["entry_price"] == 100.0

    # Another model version at the same ts is another key.
    await store.write_signals(batch([1], ["buy"], version=2))
    rows_all = await store.read_signals("sig")
    assert len(rows_all) == 4
    assert sorted((as_ts(r["ts"]), r["model_version"]) for r in rows_all if as_ts(r["ts"]) == t(1)) == [
        (t(1), 1), (t(1), 2)]
    assert await store.write_signals(batch([], [])) == 0
    assert len(await store.read_signals("sig")) == 4


async def test_write_signals_per_row_keys_and_flags(store: Store) -> None:
    mixed = batch([0, 1, 2], ["buy", "hold", "sell"])
    mixed.feature_keys = np.array(["fk1", "fk2", "fk1"], dtype=object)
    mixed.flags = np.array(["", "stale_features", "risk:max_leverage"], dtype=object)
    await store.write_signals(mixed)
    rows = await store.read_signals("sig")
    assert [(r["feature_key"], r["flags"]) for r in rows] == [
        ("fk1", ""), ("fk2", "stale_features"), ("fk1", "risk:max_leverage")]


async def test_one_row_write_stores_what_a_chunk_stores(store: Store) -> None:
    # One row may take a path of its own (the live upsert); it stores the chunk's row.
    chunk = batch([0, 1, 2], ["buy", "hold", "close_long"], confidence=[0.9, 0.5, 0.75])
    chunk.entry_price[1] = math.nan
    chunk.recommended_size[2] = math.nan
    chunk.latency_ms[:] = [0.5, math.nan, 2.0]
    chunk.flags = np.array(["", "levels_invalid", ""], dtype=object)
    await store.write_signals(chunk)
    for i in range(3):
        one = batch([i], ["hold"], signal_id="one")
        for name in ("action", "confidence", "raw_output", "entry_price", "stop_loss", "take_profit",
                     "recommended_size", "feature_keys", "latency_ms", "flags"):
            setattr(one, name, getattr(chunk, name)[i:i + 1])
        assert await store.write_signals(one) == 1
    assert_same_rows(await store.read_signals("sig"), await store.read_signals("one"))


def assert_same_rows(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> None:
    """Every column but the signal id and the write time agree (a NaN with a NaN)."""
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        for name, value in a.items():
            if name in ("signal_id", "created_at"):
                continue
            other = b[name]
            if isinstance(value, float) and math.isnan(value):
                assert isinstance(other, float) and math.isnan(other), name
            elif name == "raw_output":
                assert list(other) == list(value), name
            else:
                assert other == value, (name, value, other)


@pytest.mark.parametrize("part_rows", [500, 16, 3], ids=["parts-of-500", "parts-of-16", "parts-of-3"])
async def test_small_and_bulk_writes_store_the_same_rows(store: Store, part_rows: int) -> None:
    # A store may write a few rows (a stream's write cycle) one way and a bulk chunk another;
    # both store the same rows, replacements included.
    n = 2_500 if part_rows >= 500 else 200
    rng = np.random.default_rng(7)
    chunk = batch(list(range(n)), [["buy", "hold", "sell", "close_long", "close_short"][i % 5] for i in range(n)],
                  confidence=rng.uniform(0.0, 1.0, n).tolist())
    chunk.entry_price[::7] = math.nan
    chunk.take_profit[::2] = 101.5
    chunk.latency_ms[::11] = math.nan
    chunk.feature_keys = np.array([None if i % 13 == 0 else f"fk{i % 3}" for i in range(n)], dtype=object)
    chunk.flags = np.array(["levels_invalid" if i % 17 == 0 else "" for i in range(n)], dtype=object)
    for signal_id in ("bulk", "small"):
        await store.write_signals(batch([0, 5], ["sell", "sell"], signal_id=signal_id, price=7.0))  # replaced
    await store.write_signals(replace(chunk, signal_id="bulk"))
    small = replace(chunk, signal_id="small")
    for lo in range(0, n, part_rows):  # several histories per call
        part = small.take(np.arange(lo, min(n, lo + part_rows)))
        eth = replace(part, symbol="ETH", raw_output=np.column_stack([part.raw_output, part.confidence]))
        assert await store.write_signal_batches([part, eth]) == [len(part), len(part)]
    bulk_rows = await store.read_signals("bulk")
    assert len(bulk_rows) == n
    assert_same_rows(bulk_rows, await store.read_signals("small", symbol="BTC"))
    eth_rows = await store.read_signals("small", symbol="ETH")
    assert [list(r["raw_output"]) for r in eth_rows] == [
        [*list(r["raw_output"]), r["confidence"]] for r in bulk_rows]


@pytest.mark.parametrize("width", [0, 1, 3])
async def test_raw_outputs_of_any_width_store_alike_in_small_and_bulk_writes(store: Store, width: int) -> None:
    # A regressor's one output, a classifier's three, or none: the few rows of a write cycle and
    # a bulk chunk keep each row's raw output whole and in order.
    n = 300
    chunk = batch(list(range(n)), ["buy", "hold", "sell"] * (n // 3))
    chunk.raw_output = np.arange(n * width, dtype=np.float64).reshape(n, width) / 7.0
    await store.write_signals(replace(chunk, signal_id="bulk"))
    for lo in range(0, n, 20):
        part = replace(chunk, signal_id="small").take(np.arange(lo, lo + 20))
        await store.write_signal_batches([part, replace(part, signal_id="small2")])
    bulk = await store.read_signals("bulk")
    assert [list(r["raw_output"]) for r in bulk] == chunk.raw_output.tolist()
    assert_same_rows(bulk, await store.read_signals("small"))
    assert_same_rows(bulk, await store.read_signals("small2"))


async def test_one_call_for_many_histories_stores_what_a_call_each_stores(store: Store) -> None:
    # A stream's write cycle: many symbols' batches in one call, one-row ones among chunks, a
    # shadow version's, and a history met twice (its later rows win); a bad batch refuses all.
    specs: list[tuple[str, list[int], list[str], list[float], bool, int]] = []
    kinds = ["buy", "hold", "sell", "close_long", "close_short"]
    for k in range(12):
        hours = [0] if k % 3 == 0 else [0, 1, 2]
        specs.append((f"S{k}", hours, [kinds[(k + i) % 5] for i in range(len(hours))],
                      [round(0.05 + 0.09 * ((7 * k + 3 * i) % 10), 2) for i in range(len(hours))], False, 1))
    specs.append(("S1", [1, 3], ["close_short", "buy"], [0.61, 0.62], False, 1))  # S1 again
    specs.append(("S2", [0, 1], ["sell", "hold"], [0.3, 0.4], True, 2))  # a shadow version

    def make(signal_id: str, spec: tuple[str, list[int], list[str], list[float], bool, int]) -> SignalBatch:
        symbol, hours, actions, confidence, shadow, version = spec
        one = batch(hours, actions, confidence=confidence, signal_id=signal_id, symbol=symbol,
                    shadow=shadow, version=version, source="stream", price=10.0 + len(symbol) + hours[0])
        one.entry_price[-1] = math.nan
        one.feature_keys = np.array([None if (h + len(symbol)) % 2 else f"fk{h}" for h in hours], dtype=object)
        one.flags = np.array(["levels_invalid" if h == 2 else "" for h in hours], dtype=object)
        return one

    together = [make("together", spec) for spec in specs]
    assert await store.write_signal_batches(together) == [len(b) for b in together]
    for spec in specs:
        await store.write_signals(make("apart", spec))
    rows = await store.read_signals("together")
    assert len(rows) == 4 * 1 + 8 * 3 + 1 + 2  # 12 symbols' bars, S1's hour 3, S2's shadow rows
    assert_same_rows(rows, await store.read_signals("apart"))
    s1 = {as_ts(r["ts"]): r for r in rows if r["symbol"] == "S1"}
    assert s1[t(1)]["action"] == "close_short" and s1[t(1)]["confidence"] == pytest.approx(0.61)
    assert [r["model_version"] for r in rows if r["symbol"] == "S2" and r["shadow"]] == [2, 2]

    again = [make("together", spec) for spec in specs]
    again[7].confidence[1] = 1.5
    for one in again:
        one.action[:] = ACTION_CODE["hold"]
    with pytest.raises(ValidationError):
        await store.write_signal_batches(again)
    assert await store.read_signals("together") == rows  # nothing written


async def test_one_row_upsert_replaces_and_refuses_whole(store: Store) -> None:
    await store.write_signals(batch([0, 1, 2], ["buy", "hold", "sell"]))
    await store.write_signals(batch([1], ["sell"], confidence=[0.66], price=300.0, source="stream"))
    rows = by_ts(await store.read_signals("sig"))
    assert len(rows) == 3
    assert rows[t(1)]["action"] == "sell" and rows[t(1)]["confidence"] == pytest.approx(0.66)
    assert rows[t(1)]["entry_price"] == 300.0 and rows[t(1)]["source"] == "stream"
    await store.write_signals(batch([1], ["sell"], confidence=[0.66], price=300.0, source="stream"))
    assert len(await store.read_signals("sig")) == 3  # the same row again: still one per key
    await store.write_signals(batch([9], ["buy"]))  # a new bar after the newest: an append
    await store.write_signals(batch([9], ["close_long"]))
    rows = by_ts(await store.read_signals("sig"))
    assert len(rows) == 4 and rows[t(9)]["action"] == "close_long"
    before = await store.read_signals("sig")
    for bad in (1.5, math.nan):
        with pytest.raises(ValidationError):
            await store.write_signals(batch([1], ["buy"], confidence=[bad]))
        with pytest.raises(ValidationError):
            await store.write_signals(batch([10], ["buy"], confidence=[bad]))
    assert await store.read_signals("sig") == before


async def test_one_row_writes_among_chunks_and_shadows_keep_one_row_per_key(store: Store) -> None:
    # Appends after the newest bar, re-writes inside history, chunks and shadows in any order:
    # every (signal, version, symbol, interval, ts) holds one row, the last one written.
    steps: list[tuple[list[int], list[str], bool]] = [
        ([0], ["buy"], False), ([1], ["hold"], False), ([1], ["sell"], False),  # append, append, re-write
        ([20], ["hold"], False), ([9], ["buy"], False), ([9], ["sell"], True),  # a gap inside history
        ([2, 3, 4], ["buy", "hold", "sell"], False),  # a chunk after the newest
        ([5], ["buy"], True), ([5], ["close_long"], False),  # a shadow row, then the served one at its ts
        ([4], ["hold"], False), ([6], ["buy"], False),  # inside the chunk's bars, then an append
        ([6, 7], ["sell", "buy"], False), ([7], ["close_long"], False), ([8], ["sell"], True),
    ]
    expected: dict[Any, tuple[str, bool]] = {}
    for hours, actions, shadow in steps:
        await store.write_signals(batch(hours, actions, shadow=shadow))
        expected.update({t(h): (a, shadow) for h, a in zip(hours, actions, strict=True)})
        rows = await store.read_signals("sig")
        assert len(rows) == len(expected), (hours, actions)
        assert {as_ts(r["ts"]): (r["action"], r["shadow"]) for r in rows} == expected
    await store.write_signals(batch([3], ["buy"], version=2))  # another version: another history
    assert len(await store.read_signals("sig")) == len(expected) + 1


@pytest.mark.parametrize("bad", [1.5, math.nan, -0.1], ids=["above-one", "nan", "negative"])
async def test_write_signals_batch_is_atomic(store: Store, bad: float) -> None:
    await store.write_signals(batch([0, 1], ["buy", "sell"], confidence=[0.9, 0.8]))
    before = await store.read_signals("sig")
    with pytest.raises(SigserveError):
        await store.write_signals(batch([0, 1, 5, 6], ["sell", "buy", "buy", "buy"],
                                        confidence=[0.6, 0.6, 0.6, bad]))
    after = await store.read_signals("sig")
    assert after == before
    assert [r["action"] for r in after] == ["buy", "sell"]
    assert await store.signal_action_counts("sig") == {"buy": 1, "sell": 1}
    # The store still works after the refused batch.
    await store.write_signals(batch([5], ["hold"]))
    assert len(await store.read_signals("sig")) == 3


async def test_write_signal_batches_writes_every_history_in_order(store: Store) -> None:
    await store.write_signals(batch([0], ["sell"], symbol="ETH"))  # an existing row to replace
    counts = await store.write_signal_batches([
        batch([0, 1, 2], ["buy", "hold", "sell"]),
        batch([0], ["buy"], symbol="ETH"),
        batch([], []),
        batch([2], ["close_short"], source="stream"),  # the same bar again, later: it wins
        batch([1], ["sell"], version=2),
        batch([3, 4], ["buy", "hold"], shadow=True, version=3),
    ])
    assert counts == [3, 1, 0, 1, 1, 2]
    rows = await store.read_signals("sig")
    got = {(r["symbol"], r["model_version"], as_ts(r["ts"])): (r["action"], r["source"], r["shadow"])
           for r in rows}
    assert got == {
        ("BTC", 1, t(0)): ("buy", "historical_replay", False),
        ("BTC", 1, t(1)): ("hold", "historical_replay", False),
        ("BTC", 1, t(2)): ("close_short", "stream", False),
        ("ETH", 1, t(0)): ("buy", "historical_replay", False),
        ("BTC", 2, t(1)): ("sell", "historical_replay", False),
        ("BTC", 3, t(3)): ("buy", "historical_replay", True),
        ("BTC", 3, t(4)): ("hold", "historical_replay", True),
    }
    sides = await store.position_sides("sig", 1, "BTC", "1h", ts_array(1, 2, 3))
    assert sides.tolist() == [LONG, LONG, FLAT]  # the buy at t0, then the close_short at t2
    assert (await store.position_sides("sig", 1, "ETH", "1h", ts_array(1))).tolist() == [LONG]
    assert await store.write_signal_batches([]) == []


async def test_write_signal_batches_with_an_invalid_batch_writes_none(store: Store) -> None:
    await store.write_signals(batch([0], ["buy"]))
    before = await store.read_signals("sig")
    with pytest.raises(SigserveError):
        await store.write_signal_batches([
            batch([1, 2], ["sell", "hold"]),
            batch([5], ["buy"], symbol="ETH"),
            batch([6], ["buy"], confidence=[1.5]),
        ])
    assert await store.read_signals("sig") == before
    assert await store.write_signal_batches([batch([1], ["sell"]), batch([5], ["buy"], symbol="ETH")]) == [1, 1]
    assert len(await store.read_signals("sig")) == 3


async def test_position_sides(store: Store) -> None:
    # t0 buy, t1 hold, t2 sell, t3 close_short, t5 buy, t6 close_long; a shadow sell at t4.
    await store.write_signals(batch([0, 1, 2, 3, 5, 6],
                                    ["buy", "hold", "sell", "close_short", "buy", "close_long"]))
    await store.write_signals(batch([4], ["sell"], version=2, shadow=True))
    await store.write_signals(batch([0, 1], ["sell", "hold"], symbol="ETH"))
    await store.write_signals(batch([3], ["sell"], signal_id="other"))
    await store.write_signals(batch([3], ["sell"], interval="4h"))

    query = ts_array(0, 1, 2, 3, 4, 5, 6, 7)
    expected = [FLAT, LONG, LONG, SHORT, FLAT, FLAT, LONG, FLAT]
    sides = await store.position_sides("sig", 1, "BTC", "1h", query)
    assert sides.tolist() == expected
    assert np.issubdtype(sides.dtype, np.integer)
    for ts, side in zip(query, expected, strict=True):  # one-ts queries agree with the vector
        assert (await store.position_sides("sig", 1, "BTC", "1h", np.array([ts]))).tolist() == [side]
    # Strictly before: a query between bars sees the bar before it.
    assert (await store.position_sides("sig", 1, "BTC", "1h", np.array([t(2) + 1]))).tolist() == [SHORT]
    unsorted = await store.position_sides("sig", 1, "BTC", "1h", ts_array(7, 0, 3, 3, 1))
    assert unsorted.tolist() == [FLAT, FLAT, SHORT, SHORT, LONG]
    assert (await store.position_sides("sig", 1, "ETH", "1h", ts_array(1, 2))).tolist() == [SHORT, SHORT]
    assert (await store.position_sides("sig", 1, "SOL", "1h", ts_array(1, 2))).tolist() == [FLAT, FLAT]
    assert (await store.position_sides("sig", 1, "BTC", "1h", np.array([], dtype="datetime64[us]"))).shape == (0,)


async def test_position_sides_bulk(store: Store) -> None:
    await store.write_signals(batch([10, 20], ["buy", "sell"]))
    query = T0 + np.arange(6_000) * HOUR
    sides = await store.position_sides("sig", 1, "BTC", "1h", query)
    expected = np.full(6_000, FLAT)
    expected[11:21] = LONG
    expected[21:] = SHORT
    np.testing.assert_array_equal(sides, expected)


async def test_last_signal_ts(store: Store) -> None:
    assert await store.last_signal_ts("sig", "BTC", "1h") is None
    await store.write_signals(batch([0, 3, 1], ["buy", "hold", "sell"]))
    await store.write_signals(batch([9], ["sell"], version=2, shadow=True))
    await store.write_signals(batch([7], ["sell"], symbol="ETH"))
    await store.write_signals(batch([8], ["sell"], interval="4h"))
    last = await store.last_signal_ts("sig", "BTC", "1h")
    assert last == t(3)
    assert isinstance(last, np.datetime64)
    assert await store.last_signal_ts("sig", "ETH", "1h") == t(7)
    assert await store.last_signal_ts("other", "BTC", "1h") is None


async def test_read_signals_filters(store: Store) -> None:
    await store.write_signals(batch([0, 1, 2, 3], ["buy", "hold", "sell", "hold"]))
    await store.write_signals(batch([1, 2], ["sell", "buy"], symbol="ETH"))
    await store.write_signals(batch([2], ["buy"], interval="4h"))
    await store.write_signals(batch([2], ["buy"], signal_id="other"))
    await store.write_signals(batch([3], ["buy"], version=2, shadow=True))

    def keys(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(as_ts(r["ts"]), r["symbol"], r["interval"], r["model_version"]) for r in rows]

    everything = await store.read_signals("sig")
    assert len(everything) == 8
    assert [as_ts(r["ts"]) for r in everything] == sorted(as_ts(r["ts"]) for r in everything)
    assert {r["signal_id"] for r in everything} == {"sig"}
    assert keys(await store.read_signals("sig", symbol="ETH")) == [(t(1), "ETH", "1h", 1), (t(2), "ETH", "1h", 1)]
    assert keys(await store.read_signals("sig", "BTC", "4h")) == [(t(2), "BTC", "4h", 1)]
    btc = await store.read_signals("sig", "BTC", "1h", start=t(1), end=t(3))
    assert keys(btc) == [(t(1), "BTC", "1h", 1), (t(2), "BTC", "1h", 1), (t(3), "BTC", "1h", 1),
                         (t(3), "BTC", "1h", 2)]
    shadow_rows = [r for r in btc if r["shadow"]]
    assert len(shadow_rows) == 1 and shadow_rows[0]["model_version"] == 2
    assert keys(await store.read_signals("sig", "BTC", "1h", start=t(3))) == [(t(3), "BTC", "1h", 1),
                                                                             (t(3), "BTC", "1h", 2)]
    assert keys(await store.read_signals("sig", "BTC", "1h", end=t(0))) == [(t(0), "BTC", "1h", 1)]
    limited = await store.read_signals("sig", "BTC", "1h", limit=2)
    assert keys(limited) == [(t(0), "BTC", "1h", 1), (t(1), "BTC", "1h", 1)]
    assert await store.read_signals("nope") == []


async def test_signal_action_counts(store: Store) -> None:
    assert await store.signal_action_counts("sig") == {}
    await store.write_signals(batch([0, 1, 2, 3, 4], ["buy", "hold", "hold", "sell", "close_long"]))
    await store.write_signals(batch([0], ["buy"], symbol="ETH"))
    await store.write_signals(batch([5, 6], ["sell", "sell"], version=2, shadow=True))
    await store.write_signals(batch([0], ["close_short"], signal_id="other"))
    assert await store.signal_action_counts("sig") == {"buy": 2, "hold": 2, "sell": 1, "close_long": 1}
    await store.write_signals(batch([1, 2], ["buy", "buy"]))  # upsert changes the counts
    assert await store.signal_action_counts("sig") == {"buy": 4, "sell": 1, "close_long": 1}
    assert await store.signal_action_counts("other") == {"close_short": 1}


async def test_duplicate_ts_in_signal_batch_writes_nothing(store: Store) -> None:
    await store.write_signals(batch([0], ["buy"]))
    with pytest.raises(ValidationError) as info:
        await store.write_signals(batch([0, 1, 1], ["sell", "buy", "sell"]))
    assert info.value.code == "validation_error"
    rows = await store.read_signals("sig")
    assert [(as_ts(r["ts"]), r["action"]) for r in rows] == [(t(0), "buy")]


async def test_schema_version_is_the_newest_migration(store: Store) -> None:
    version = await store.schema_version()
    assert version >= 1
    assert await store.schema_version() == version  # reading it changes nothing


# --- training runs ------------------------------------------------------------------------------

async def test_catalog_version_moves_with_every_change_a_resolution_reads(store: Store) -> None:
    """Servers keep a resolved signal while the catalog version stays: every change that a
    resolution reads must move it, and data writes must not (they would re-resolve every TTL)."""
    from sigserve.domain import TrafficPolicy

    seen = [await store.catalog_version()]

    async def moved(what: str) -> None:
        now = await store.catalog_version()
        assert now not in seen, f"{what} did not move the catalog version"
        seen.append(now)

    async def stayed(what: str) -> None:
        assert await store.catalog_version() == seen[-1], f"{what} moved the catalog version"

    stored = await store.insert_model(card())
    await moved("insert_model")
    await store.set_model_stage("m", stored.version, Stage.PRODUCTION, "cli:test")
    await moved("set_model_stage")
    await store.update_model_extra("m", stored.version, "lleaves", {"compiled_path": "x.so"})
    await moved("update_model_extra")
    assert await store.register_features(["f0", "f1", "atr_14"])
    await moved("register_features")
    assert await store.register_features(["f0"]) == []
    await stayed("register_features of known names")
    await store.set_feature_status("f1", "deprecated")
    await moved("set_feature_status")
    await store.create_signal(definition())
    await moved("create_signal")
    await store.set_signal_status("sig", "retired")
    await moved("set_signal_status")
    await store.set_traffic_policy(TrafficPolicy("sig", champion=1), actor="cli:test", action="start")
    await moved("set_traffic_policy")
    # refusals change nothing, and move nothing
    with pytest.raises(ValidationError):
        await store.set_feature_status("nope", "deprecated")
    with pytest.raises(SignalNotFound):
        await store.set_signal_status("nope", "retired")
    with pytest.raises(ValidationError):
        await store.create_signal(definition())
    await stayed("a refused change")
    # data: features, candles, signals
    await write_rows(store, "fk1", ("f0", "f1", "atr_14"), [0, 1], grid([0, 1]))
    await store.write_candles("BTC", "1h", candles([0, 1], [100.0, 101.0]))
    await store.write_signals(batch([0], ["buy"]))
    await store.write_signals(batch([1, 2], ["hold", "sell"]))
    await stayed("data writes")


async def test_training_runs_round_trip_and_upsert(store: Store) -> None:
    from sigserve.domain import TrainingRun

    started = await store.save_training_run(TrainingRun(
        "run-1", "lightgbm", "exp-a", "c" * 64, "d" * 64, details={"symbols": ["BTC"]}))
    assert started.status == "running" and started.completed_at is None
    assert started.created_at and started.metrics == {}
    done = await store.save_training_run(TrainingRun(
        "run-1", "lightgbm", "exp-a", "c" * 64, "d" * 64, status="completed",
        metrics={"accuracy": 0.61, "per_class": {"up": {"f1": 0.6}}},
        details={"model": "m:1", "mlflow_run_id": "abc"}))
    assert done.status == "completed" and done.completed_at is not None
    assert done.created_at == started.created_at  # the first save's, kept
    assert done.metrics == {"accuracy": 0.61, "per_class": {"up": {"f1": 0.6}}}
    assert done.details == {"model": "m:1", "mlflow_run_id": "abc"}
    assert await store.get_training_run("run-1") == done
    assert await store.get_training_run("nope") is None
    # completed_at is kept by a later save that does not give one
    again = await store.save_training_run(TrainingRun("run-1", "lightgbm", "exp-a", "c" * 64, "d" * 64,
                                                      status="completed"))
    assert again.completed_at == done.completed_at


async def test_training_runs_listing_and_failed_runs(store: Store) -> None:
    from sigserve.domain import TrainingRun

    for run_id, experiment in (("r1", "a"), ("r2", "b"), ("r3", "a")):
        await store.save_training_run(TrainingRun(run_id, "xgboost", experiment, "h", "v"))
        await asyncio.sleep(0.002)
    failed = await store.save_training_run(TrainingRun(
        "r2", "xgboost", "b", "h", "v", status="failed", details={"error": "validation_error: x"}))
    assert failed.status == "failed" and failed.completed_at is not None
    assert [r.run_id for r in await store.list_training_runs()] == ["r1", "r2", "r3"]
    assert [r.run_id for r in await store.list_training_runs("a")] == ["r1", "r3"]
    assert await store.list_training_runs("none") == []
    with pytest.raises(ValidationError):
        TrainingRun("r4", "lightgbm", "a", "h", "v", status="done")


# --- traffic policies (rollouts) ----------------------------------------------------------------

async def test_traffic_policy_round_trip_and_audit(store: Store) -> None:
    from sigserve.domain import TrafficPolicy

    assert await store.get_traffic_policy("sig-a") is None
    assert await store.rollout_events("sig-a") == []
    first = await store.set_traffic_policy(
        TrafficPolicy("sig-a", champion=1, challenger=2, share=0.0, shadows=(3,), stage="shadow"),
        actor="cli:alice", action="start")
    assert (first.champion, first.challenger, first.share, first.shadows, first.stage) == (1, 2, 0.0, (3,), "shadow")
    assert first.updated_by == "cli:alice" and first.updated_at
    assert await store.get_traffic_policy("sig-a") == first
    second = await store.set_traffic_policy(
        TrafficPolicy("sig-a", champion=1, challenger=2, share=0.1, shadows=(3,), stage="canary"),
        actor="token:ops", action="advance")
    assert await store.get_traffic_policy("sig-a") == second
    await store.set_traffic_policy(TrafficPolicy("sig-b", champion=4), actor="cli:bob", action="start")
    assert [p.signal_id for p in await store.list_traffic_policies()] == ["sig-a", "sig-b"]
    events = await store.rollout_events("sig-a")
    assert [e["action"] for e in events] == ["start", "advance"]
    assert [e["actor"] for e in events] == ["cli:alice", "token:ops"]
    assert events[0]["from"] is None
    assert events[0]["to"]["challenger"] == 2 and events[0]["to"]["share"] == 0.0
    assert events[1]["from"]["share"] == 0.0 and events[1]["to"]["share"] == 0.1
    assert events[1]["to"]["shadows"] == [3] and events[1]["at"] >= events[0]["at"]
    assert [e["action"] for e in await store.rollout_events("sig-b")] == ["start"]


async def test_traffic_policy_refuses_invalid_values() -> None:
    from sigserve.domain import TrafficPolicy

    for bad in ({"share": 1.5, "challenger": 2}, {"challenger": 1}, {"share": 0.2},
                {"stage": "launch"}, {"champion": 0}):
        with pytest.raises(ValidationError):
            TrafficPolicy("s", **{"champion": 1, **bad})  # type: ignore[arg-type]
