"""The HTTP service end to end, in process: the real app with its lifespan over a real DuckDB home
and a real LightGBM model (see http_world.py), driven through httpx's ASGI transport.

Every endpoint, every error code of DESIGN.md reachable over HTTP (plus route_not_found and
method_not_allowed), the envelope on every error, X-Request-ID, auth on every route, deadlines with
and without the hold fallback, and the engine parity between the endpoints.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from sigserve.api.app import SigserveApp
from sigserve.engine import DEADLINE_FLAG, Engine
from sigserve.errors import ERROR_CODES
from sigserve.features.compute import FEATURE_NAMES, WARMUP_BARS
from sigserve.stores.bar_cache import BLOCK_BARS
from sigserve.timeutil import format_ts, interval_us
from tests.e2e.http_world import (
    AUTH,
    BARS,
    BTC,
    ETH,
    ETH_FEATURE_BARS,
    INTERVAL,
    KEY,
    MODEL,
    PINNED,
    SIGNAL,
    TOKEN,
    World,
    services_of,
    serving,
    settings_for,
)

pytestmark = pytest.mark.e2e

ENVELOPE_KEYS = {"error_code", "message", "details", "request_id"}
HTTP_ONLY_CODES = {"route_not_found": 404, "method_not_allowed": 405}
PUBLIC = {"/healthz", "/readyz"}
SEEN_CODES: set[str] = set()


def refused(response: httpx.Response, code: str) -> dict[str, Any]:
    """Assert the envelope of a refusal with ``code`` and its HTTP status; return the body."""
    status = ERROR_CODES[code].http_status if code in ERROR_CODES else HTTP_ONLY_CODES[code]
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == ENVELOPE_KEYS, body
    assert body["error_code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], dict)
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    SEEN_CODES.add(code)
    return dict(body)


def run_body(world: World, i: int, symbol: str = BTC, signal: str = SIGNAL,
             **extra: Any) -> dict[str, Any]:
    return {"signal_id": signal, "symbol": symbol, "ts": world.t(i), "interval_name": INTERVAL,
            "source": "stream", **extra}


async def history(app: SigserveApp, signal: str = SIGNAL, symbol: str = BTC) -> list[dict[str, Any]]:
    return await services_of(app).store.read_signals(signal, symbol, INTERVAL)


# --- health ---------------------------------------------------------------------------------------
async def test_health_and_readiness(home: Path) -> None:
    async with serving(settings_for(home), headers={}) as (_, client):
        r = await client.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        r = await client.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {"status": "ready", "checks": {"store": "ok", "artifacts": "ok"}}


async def test_readyz_is_503_when_the_artifact_dir_is_gone(home: Path) -> None:
    async with serving(settings_for(home)) as (_, client):
        (home / "artifacts").rename(home / "artifacts.moved")
        body = refused(await client.get("/readyz"), "store_unavailable")
        assert body["details"]["checks"]["store"] == "ok"
        assert body["details"]["checks"]["artifacts"] != "ok"


async def test_store_unavailable_when_the_store_is_closed_under_the_app(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        await services_of(app).store.close()
        body = refused(await client.get("/readyz"), "store_unavailable")
        assert body["details"]["checks"]["store"] != "ok"
        refused(await client.post("/inference/run", json=run_body(world, 200)), "store_unavailable")
        refused(await client.post("/api/v1/predict", json={"symbol": BTC}), "store_unavailable")
        refused(await client.get("/models"), "store_unavailable")
        assert (await client.get("/healthz")).status_code == 200  # the process is still up


# --- /inference/run -------------------------------------------------------------------------------
async def test_inference_run_stores_the_signal_row(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        r = await client.post("/inference/run", json=run_body(world, 300))
        assert r.status_code == 200, r.text
        row = r.json()
        assert row["ts"] == world.t(300)
        assert (row["signal_id"], row["symbol"], row["interval"]) == (SIGNAL, BTC, INTERVAL)
        assert row["action"] in ("hold", "buy", "sell", "close_long", "close_short")
        assert 0.0 <= row["confidence"] <= 1.0
        assert len(row["raw_output"]) == 2
        assert (row["model_name"], row["model_version"], row["model_sha256"]) == (MODEL, 1, world.sha256)
        assert (row["feature_key"], row["source"], row["flags"]) == (KEY, "stream", "")
        stored = await history(app)
        assert len(stored) == 1
        assert stored[0]["confidence"] == row["confidence"] and stored[0]["action"] == row["action"]
        # the same bar again is an upsert
        assert (await client.post("/inference/run", json=run_body(world, 300))).status_code == 200
        assert len(await history(app)) == 1


async def test_run_equals_the_backfill_row_bit_for_bit(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        r = await client.post("/inference/backfill", json={
            "signal_id": SIGNAL, "symbol": BTC, "interval_name": INTERVAL,
            "start": world.t(0), "end": world.t(BARS - 1)})
        assert r.status_code == 200, r.text
        rows = {row["ts"]: row for row in await history(app)}
        actions = {row["action"] for row in rows.values()}
        assert len(actions) >= 3, actions  # a model that says something
        for i in (WARMUP_BARS, 150, 251, BARS - 1):
            stored = rows[np.datetime64(world.ts[i], "us").astype(object)]
            got = (await client.post("/inference/run", json=run_body(
                world, i, source="historical_replay"))).json()
            for field in ("action", "confidence", "raw_output", "entry_price", "stop_loss",
                          "take_profit", "recommended_size", "model_sha256", "feature_key"):
                assert got[field] == stored[field], (i, field)


async def test_concurrent_runs_are_served_together_and_equal_the_backfill(home: Path, world: World) -> None:
    first, n = 250, 16
    async with serving(settings_for(home, server_prepared_ttl_s=60.0)) as (app, client):
        batcher = services_of(app).engine.bar_batcher
        assert batcher is not None  # on by default (SIGSERVE_GROUP_BARS)
        answers = await asyncio.gather(*(client.post("/inference/run", json=run_body(
            world, i, source="historical_replay")) for i in range(first + n - 1, first - 1, -1)))
        assert [r.status_code for r in answers] == [200] * n, [r.text for r in answers]
        assert batcher.stats.together == n and batcher.stats.groups >= 1
        metrics = (await client.get("/metrics")).text
        served_together = re.search(r"^sigserve_bar_group_requests_sum (\S+)$", metrics, re.M)
        assert served_together is not None and float(served_together.group(1)) == n
        served = {r.json()["ts"]: r.json() for r in answers}
        stored = await history(app)
        assert len(stored) == n
        # the backfill of the same bars (positions carried through them) writes the same rows
        r = await client.post("/inference/backfill", json={
            "signal_id": SIGNAL, "symbol": BTC, "interval_name": INTERVAL,
            "start": world.t(first), "end": world.t(first + n - 1)})
        assert r.json()["rows_written"] == n
        fields = ("action", "confidence", "raw_output", "entry_price", "stop_loss", "take_profit",
                  "recommended_size", "model_version", "feature_key", "flags")
        for row in await history(app):
            got = served[format_ts(row["ts"])]
            assert {f: got[f] for f in fields} == {f: row[f] for f in fields}


def metric(text: str, sample: str) -> float:
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert found is not None, sample
    return float(found.group(1))


async def test_the_bar_cache_is_on_metrics(home: Path, world: World) -> None:
    span = BLOCK_BARS * interval_us(INTERVAL)
    block = np.asarray(world.ts, dtype="datetime64[us]").astype(np.int64) // span
    # two bars of one block that startup's warm-up bar did not read
    i = next(j for j in range(WARMUP_BARS, BARS - 1)
             if block[j] == block[j + 1] and block[j] != block[BARS - 1])
    async with serving(settings_for(home)) as (_, client):
        before = (await client.get("/metrics")).text
        hits = metric(before, 'sigserve_bar_cache_blocks_total{result="hit"}')
        misses = metric(before, 'sigserve_bar_cache_blocks_total{result="miss"}')
        for j in (i, i + 1):
            r = await client.post("/inference/run", json=run_body(world, j, source="historical_replay"))
            assert r.status_code == 200, r.text
        after = (await client.get("/metrics")).text
        assert metric(after, 'sigserve_bar_cache_blocks_total{result="miss"}') == misses + 1
        assert metric(after, 'sigserve_bar_cache_blocks_total{result="hit"}') == hits + 1
        assert metric(after, "sigserve_bar_cache_held_blocks") >= 1


async def test_the_position_book_is_on_metrics(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        for i in range(WARMUP_BARS, WARMUP_BARS + 40):  # the live path: no rows loaded
            r = await client.post("/inference/run", json=run_body(world, i))
            assert r.status_code == 200, r.text
        before = (await client.get("/metrics")).text
        # a bar inside its history (a replay): the history's non-hold rows are loaded, once
        r = await client.post("/inference/run", json=run_body(world, WARMUP_BARS + 20,
                                                                source="historical_replay"))
        assert r.status_code == 200, r.text
        after = (await client.get("/metrics")).text
        events = sum(1 for row in await history(app) if row["action"] != "hold" and not row["shadow"])
        assert metric(before, "sigserve_position_book_rows") == 0
        assert metric(after, "sigserve_position_book_rows") == events > 0


async def test_the_signal_journal_is_on_metrics(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        stored = [np.datetime64(r["ts"].replace(tzinfo=None), "us") for r in await history(app)]
        ts = np.asarray(world.ts, dtype="datetime64[us]")
        i = int(np.searchsorted(ts, max(stored), side="right")) if stored else WARMUP_BARS
        assert i < BARS - 1, "the world has no bar after its stored signals"
        before = (await client.get("/metrics")).text
        appended = metric(before, 'sigserve_signal_journal_rows_total{state="appended"}')
        r = await client.post("/inference/run", json=run_body(world, i))  # a new bar: journaled
        assert r.status_code == 200, r.text
        after = (await client.get("/metrics")).text
        assert metric(after, 'sigserve_signal_journal_rows_total{state="appended"}') == appended + 1
        bar = np.datetime64(r.json()["ts"].rstrip("Z"), "us")
        # a reader sees it: the pending rows are applied first
        assert [row["action"] for row in await history(app)
                if np.datetime64(row["ts"].replace(tzinfo=None), "us") == bar] == [r.json()["action"]]
        applied = (await client.get("/metrics")).text
        assert metric(applied, "sigserve_signal_journal_unapplied_rows") == 0
        assert metric(applied, 'sigserve_signal_journal_rows_total{state="applied"}') >= appended + 1
        assert metric(applied, "sigserve_signal_journal_apply_failures") == 0


async def test_grouping_is_a_setting(home: Path, world: World) -> None:
    async with serving(settings_for(home, group_bars=False)) as (app, client):
        assert services_of(app).engine.bar_batcher is None
        answers = await asyncio.gather(*(client.post("/inference/run", json=run_body(world, i))
                                         for i in range(260, 264)))
        assert [r.status_code for r in answers] == [200] * 4
        assert "sigserve_bar_group_requests_count 0.0" in (await client.get("/metrics")).text
    async with serving(settings_for(home, group_linger_ms=2.0)) as (app, _):
        engine = services_of(app).engine
        assert engine.bar_batcher is not None and engine.bar_batcher.linger_s == pytest.approx(0.002)
    assert engine.bar_batcher is None  # stopped and detached on shutdown


@pytest.mark.parametrize("body, field", [
    ({"symbol": BTC, "ts": "2024-01-05T00:00Z", "interval_name": INTERVAL}, "signal_id"),
    ({"signal_id": SIGNAL, "symbol": BTC, "ts": "yesterday", "interval_name": INTERVAL}, "ts"),
    ({"signal_id": SIGNAL, "symbol": BTC, "ts": "2024-01-05T00:00Z", "interval_name": "7x"}, "interval"),
    ({"signal_id": SIGNAL, "symbol": BTC, "ts": "2024-01-05T00:00Z", "interval_name": "4h"}, "runs on"),
    ({"signal_id": SIGNAL, "symbol": "DOGEUSDT", "ts": "2024-01-05T00:00Z", "interval_name": INTERVAL}, "symbol"),
    ({"signal_id": SIGNAL, "symbol": BTC, "ts": "2024-01-05T00:00Z", "interval_name": INTERVAL,
      "source": "live"}, "source"),
    ({"signal_id": SIGNAL, "symbol": BTC, "ts": "2024-01-05T00:00Z", "interval_name": INTERVAL,
      "interval": "1h"}, "interval"),
    ({"signal_id": SIGNAL, "symbol": BTC, "ts": 1e30, "interval_name": INTERVAL}, "ts"),
    ({"signal_id": SIGNAL, "symbol": BTC, "ts": "3024-01-05T00:00Z", "interval_name": INTERVAL}, "range"),
    ({"signal_id": SIGNAL, "symbol": BTC, "ts": True, "interval_name": INTERVAL}, "ts"),
])
async def test_run_validation_errors(home: Path, body: dict[str, Any], field: str) -> None:
    async with serving(settings_for(home)) as (_, client):
        refused_body = refused(await client.post("/inference/run", json=body), "validation_error")
        assert field in refused_body["message"] + str(refused_body["details"])


async def test_malformed_json_is_a_validation_error(home: Path) -> None:
    async with serving(settings_for(home)) as (_, client):
        for content in (b"{not json", b"", b"[]", b"null"):
            r = await client.post("/inference/run", content=content,
                                  headers={**AUTH, "content-type": "application/json"})
            body = refused(r, "validation_error")
            assert body["details"]["errors"], body


async def test_refusals_of_the_pipeline(home: Path, world: World) -> None:
    """signal_not_found, signal_retired, model_lifecycle_refused, feature_not_registered,
    feature_value_missing, model_artifact_missing and artifact_corrupt, each over HTTP."""
    async with serving(settings_for(home)) as (app, client):
        services = services_of(app)
        run = client.post

        refused(await run("/inference/run", json=run_body(world, 200, signal="nope")), "signal_not_found")

        # no feature row: warm-up bars, and ETH's tail (candles only)
        body = refused(await run("/inference/run", json=run_body(world, 3)), "feature_value_missing")
        assert body["details"]["ts"] == world.t(3)
        refused(await run("/inference/run", json=run_body(world, ETH_FEATURE_BARS + 5, symbol=ETH)),
                "feature_value_missing")

        await services.store.set_feature_status("rsi_14", "deprecated")
        body = refused(await run("/inference/run", json=run_body(world, 200)), "feature_not_registered")
        assert body["details"]["features"] == {"rsi_14": "deprecated"}
        await services.store.set_feature_status("rsi_14", "registered")
        assert (await run("/inference/run", json=run_body(world, 200))).status_code == 200

        # the pinned version retired: its signal is refused, the production one still serves
        await services.registry.retire(MODEL, 2)
        refused(await run("/inference/run", json=run_body(world, 200, signal=PINNED)),
                "model_lifecycle_refused")
        assert (await run("/inference/run", json=run_body(world, 201))).status_code == 200

        await services.store.set_signal_status(PINNED, "retired")
        refused(await run("/inference/run", json=run_body(world, 200, signal=PINNED)), "signal_retired")

        # the artifact's bytes changed on disk: never loaded
        artifact = next((home / "artifacts").rglob(f"{world.sha256}*"))
        original = artifact.read_bytes()
        artifact.write_bytes(original.replace(b"tree", b"TREE", 1))
        services.registry.forget()
        body = refused(await run("/inference/run", json=run_body(world, 200)), "artifact_corrupt")
        assert world.sha256 in body["message"] + str(body["details"])

        artifact.unlink()
        services.registry.forget()
        refused(await run("/inference/run", json=run_body(world, 200)), "model_artifact_missing")
        artifact.write_bytes(original)
        services.registry.forget()
        assert (await run("/inference/run", json=run_body(world, 202))).status_code == 200


async def test_internal_error_carries_the_request_id_and_no_traceback(
        home: Path, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals /etc/passwd")

    async with serving(settings_for(home)) as (_, client):
        monkeypatch.setattr(Engine, "predict_bar", broken)
        r = await client.post("/inference/run", json=run_body(world, 200),
                              headers={**AUTH, "X-Request-ID": "req-500"})
        body = refused(r, "internal_error")
        assert body["request_id"] == "req-500"
        assert body["details"] == {"request_id": "req-500"}
        assert "secret" not in r.text and "RuntimeError" not in r.text
        monkeypatch.setattr(Engine, "predict_inline", broken)
        r = await client.post("/api/v1/predict", json={"symbol": BTC, "features": {"a": 1.0}})
        assert refused(r, "internal_error")["details"]["request_id"] == r.headers["x-request-id"]


# --- deadlines ------------------------------------------------------------------------------------
async def test_deadline_exceeded_writes_nothing(home: Path, world: World) -> None:
    async with serving(settings_for(home, deadline_ms=0.001)) as (app, client):
        body = refused(await client.post("/inference/run", json=run_body(world, 200)), "deadline_exceeded")
        assert body["details"]["budget_ms"] == 0.001
        assert await history(app) == []
        refused(await client.post("/api/v1/predict", json={"symbol": BTC}), "deadline_exceeded")
        refused(await client.post("/api/v1/predict", json={
            "symbol": BTC, "features": world.feature_dict(BTC, 200)}), "deadline_exceeded")


async def test_deadline_fallback_stores_a_flagged_hold(home: Path, world: World) -> None:
    async with serving(settings_for(home, deadline_ms=0.001, fallback_to_hold=True)) as (app, client):
        r = await client.post("/inference/run", json=run_body(world, 200))
        assert r.status_code == 200, r.text
        row = r.json()
        assert (row["action"], row["confidence"], row["flags"]) == ("hold", 0.0, DEADLINE_FLAG)
        assert row["entry_price"] is None and row["recommended_size"] is None
        stored = await history(app)
        assert [(s["action"], s["flags"]) for s in stored] == [("hold", DEADLINE_FLAG)]
        r = await client.post("/api/v1/predict", json={"symbol": BTC, "features": world.feature_dict(BTC, 200)})
        assert r.status_code == 200
        assert (r.json()["action"], r.json()["metadata"]["flags"]) == ("HOLD", DEADLINE_FLAG)
    # with a budget that holds, the same bar gets its real signal and the row loses the flag
    async with serving(settings_for(home)) as (app, client):
        row = (await client.post("/inference/run", json=run_body(world, 200))).json()
        assert row["flags"] == "" and len(await history(app)) == 1


# --- /inference/backfill --------------------------------------------------------------------------
async def test_backfill_modes_and_reruns(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        window = {"signal_id": SIGNAL, "symbol": ETH, "interval_name": INTERVAL,
                  "start": world.t(100), "end": world.t(BARS - 1)}
        first = (await client.post("/inference/backfill", json=window)).json()
        assert first["rows_written"] == ETH_FEATURE_BARS - 100
        assert first["rows_skipped_missing_features"] == BARS - ETH_FEATURE_BARS
        assert first["chunks"] == 3  # chunks of 100 bars
        assert sum(first["actions"].values()) == first["rows_written"]
        again = (await client.post("/inference/backfill", json=window)).json()
        assert {k: again[k] for k in ("rows_written", "actions")} == {k: first[k] for k in ("rows_written", "actions")}
        assert len(await history(app, symbol=ETH)) == ETH_FEATURE_BARS - 100

        last = (await client.post("/inference/backfill", json={
            "signal_id": SIGNAL, "symbol": BTC, "interval_name": INTERVAL, "mode": "last"})).json()
        assert last["rows_written"] == BARS - WARMUP_BARS
        listed = (await client.post("/inference/backfill", json={
            "signal_id": SIGNAL, "symbol": ETH, "interval_name": INTERVAL, "mode": "ts-list",
            "ts": [world.t(50), world.t(ETH_FEATURE_BARS + 1)]})).json()
        assert (listed["rows_written"], listed["rows_skipped_missing_features"]) == (1, 1)


async def test_backfill_refusals(home: Path, world: World) -> None:
    async with serving(settings_for(home, max_backfill_rows=50)) as (_, client):
        base = {"signal_id": SIGNAL, "symbol": BTC, "interval_name": INTERVAL}
        body = refused(await client.post("/inference/backfill", json={
            **base, "start": world.t(0), "end": world.t(BARS - 1)}), "backfill_window_too_large")
        assert body["details"] == {"rows": BARS - WARMUP_BARS, "max_rows": 50}
        body = refused(await client.post("/inference/backfill", json={
            **base, "start": world.t(300), "end": world.t(200)}), "validation_error")
        assert "before start" in body["message"]
        refused(await client.post("/inference/backfill", json={**base, "start": world.t(1)}),
                "validation_error")
        refused(await client.post("/inference/backfill", json={**base, "mode": "ts-list"}),
                "validation_error")
        refused(await client.post("/inference/backfill", json={**base, "mode": "sideways"}),
                "validation_error")
        refused(await client.post("/inference/backfill", json={
            **base, "signal_id": "nope", "start": world.t(0), "end": world.t(10)}), "signal_not_found")


async def test_backfill_runs_off_the_event_loop(home: Path, world: World,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """While a backfill chunk is computed (slowed to 0.5 s here), other requests are answered."""
    original = Engine.compute

    def slow_compute(self: Engine, prepared: Any, features: Any, *args: Any, **kwargs: Any) -> Any:
        if len(features) >= self.thread_rows:
            time.sleep(0.5)
        return original(self, prepared, features, *args, **kwargs)

    monkeypatch.setattr(Engine, "compute", slow_compute)
    monkeypatch.setattr(Engine, "thread_rows", 50)
    async with serving(settings_for(home, backfill_chunk_rows=1000)) as (_, client):
        backfill = asyncio.create_task(client.post("/inference/backfill", json={
            "signal_id": SIGNAL, "symbol": BTC, "interval_name": INTERVAL,
            "start": world.t(0), "end": world.t(BARS - 1)}))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        assert (await client.get("/healthz")).status_code == 200
        assert time.perf_counter() - started < 0.3
        assert not backfill.done()
        assert (await backfill).json()["rows_written"] == BARS - WARMUP_BARS


# --- /api/v1/predict ------------------------------------------------------------------------------
PREDICT_KEYS = {"decision_id", "symbol", "action", "confidence", "recommended_quantity",
                "regime_probabilities", "strategy_weights", "risk_validation", "metadata"}


async def test_predict_inline_reads_and_writes_nothing(home: Path, world: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(settings_for(home)) as (app, client):
        services = services_of(app)
        stored = (await client.post("/inference/run", json=run_body(world, 250))).json()

        async def no_reads(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("an inline prediction read the store")

        monkeypatch.setattr(services.store, "read_features", no_reads)
        monkeypatch.setattr(services.store, "write_signals", no_reads)
        monkeypatch.setattr(services.store, "position_sides", no_reads)
        features = {**world.feature_dict(BTC, 250), "close": float(world.close[BTC][250]),
                    "unused_extra": 1.5}
        r = await client.post("/api/v1/predict", json={
            "symbol": BTC, "timestamp": world.t(250), "features": features, "risk_check": True})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert set(answer) == PREDICT_KEYS
        assert uuid.UUID(answer["decision_id"]).version == 4
        assert answer["symbol"] == BTC
        assert (answer["regime_probabilities"], answer["strategy_weights"]) == (None, None)  # one model
        assert answer["risk_validation"]["approved"] is True  # risk_check: true, no limits set
        meta = answer["metadata"]
        assert meta["timestamp"] == world.t(250)
        assert (meta["model_version"], meta["model_name"], meta["signal_id"]) == (1, MODEL, SIGNAL)
        assert meta["inline_features"] is True and meta["latency_ms"] > 0
        # the same model output as the stored row; the API action is the same whatever the position
        assert answer["confidence"] == stored["confidence"]
        mapped = {"buy": "BUY", "close_short": "BUY", "sell": "SELL", "close_long": "SELL", "hold": "HOLD"}
        assert answer["action"] == mapped[stored["action"]]
        if answer["action"] != "HOLD":
            assert answer["recommended_quantity"] is not None
            assert meta["levels"]["entry_price"] == float(world.close[BTC][250])


async def test_predict_inline_without_close_has_no_levels(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (_, client):
        for i in range(WARMUP_BARS, BARS):
            answer = (await client.post("/api/v1/predict", json={
                "symbol": BTC, "features": world.feature_dict(BTC, i)})).json()
            if answer["action"] != "HOLD":
                assert answer["recommended_quantity"] is None
                assert answer["metadata"]["flags"] == "levels_need_close"
                return
        pytest.fail("no buy or sell in the whole history")


async def test_predict_from_the_store(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        at = (await client.post("/api/v1/predict", json={"symbol": BTC, "timestamp": world.t(222)})).json()
        assert at["metadata"]["timestamp"] == world.t(222)
        assert at["metadata"]["inline_features"] is False
        newest = (await client.post("/api/v1/predict", json={"symbol": ETH})).json()
        assert newest["metadata"]["timestamp"] == world.t(ETH_FEATURE_BARS - 1)
        pinned = (await client.post("/api/v1/predict", json={"symbol": "ANYUSDT", "signal_id": PINNED}))
        refused(pinned, "feature_value_missing")
        assert await history(app) == [] and await history(app, symbol=ETH) == []


async def test_predict_refusals(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (_, client):
        features = world.feature_dict(BTC, 200)
        partial = {k: v for k, v in features.items() if k not in ("rsi_14", "atr_14")}
        body = refused(await client.post("/api/v1/predict", json={"symbol": BTC, "features": partial}),
                       "feature_value_missing")
        assert sorted(body["details"]["missing"]) == ["atr_14", "rsi_14"]
        for bad in ("1.5", [1.0], {"x": 1}, True):
            r = await client.post("/api/v1/predict", json={"symbol": BTC, "features": {**features, "rsi_14": bad}})
            body = refused(r, "validation_error")
            assert any("rsi_14" in e["loc"] for e in body["details"]["errors"]), body
        refused(await client.post("/api/v1/predict", json={"symbol": BTC, "strategy_override": {"a": 1}}),
                "validation_error")
        refused(await client.post("/api/v1/predict", json={"symbol": BTC, "signal_id": "nope"}),
                "signal_not_found")
        refused(await client.post("/api/v1/predict", json={"symbol": "DOGEUSDT", "features": features}),
                "validation_error")
        refused(await client.post("/api/v1/predict", json={"features": features}), "validation_error")


async def test_default_signal_is_the_only_active_one(home: Path, world: World) -> None:
    async with serving(settings_for(home, default_signal=None)) as (app, client):
        body = refused(await client.get("/model/info"), "signal_not_found")
        assert body["details"]["active_signals"] == sorted([SIGNAL, PINNED])
        refused(await client.post("/api/v1/predict", json={"symbol": BTC}), "signal_not_found")
        await services_of(app).store.set_signal_status(PINNED, "retired")
        assert (await client.get("/model/info")).json()["signal_id"] == SIGNAL
        assert (await client.post("/api/v1/predict", json={"symbol": BTC})).status_code == 200


async def test_other_active_signals_are_warmed_up_in_the_background(home: Path, world: World,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(settings_for(home, server_prepared_ttl_s=60.0)) as (app, client):
        engine = services_of(app).engine
        for _ in range(500):  # the startup task resolves the other active signal, no request asked
            if PINNED in engine._prepared:
                break
            await asyncio.sleep(0.01)
        assert PINNED in engine._prepared
        assert engine._prepared[PINNED][1].card.version == 2
        store = services_of(app).store
        reads: list[str] = []
        real = store.get_signal

        async def counted(signal_id: str) -> Any:
            reads.append(signal_id)
            return await real(signal_id)

        monkeypatch.setattr(store, "get_signal", counted)
        r = await client.post("/inference/run", json=run_body(world, 200, signal=PINNED))
        assert r.status_code == 200, r.text
        assert reads == []  # the first request for it read no definition: it was warm


# --- models ---------------------------------------------------------------------------------------
async def test_models_endpoints(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        listed = (await client.get("/models")).json()["models"]
        assert [(m["name"], m["latest"], m["production"], m["staging"]) for m in listed] == [(MODEL, 2, 1, None)]
        assert [(v["version"], v["stage"], v["servable"]) for v in listed[0]["versions"]] == [
            (1, "production", True), (2, "registered", True)]

        shown = (await client.get(f"/models/{MODEL}")).json()
        assert shown["card"]["version"] == 1 and shown["card"]["sha256"] == world.sha256
        assert shown["card"]["feature_names"] == list(FEATURE_NAMES)
        assert [v["version"] for v in shown["versions"]] == [1, 2]
        assert any(e["to"] == "production" for e in shown["events"])
        refused(await client.get("/models/nope"), "model_not_found")

        info = (await client.get("/model/info")).json()
        assert info["signal_id"] == SIGNAL and info["model"]["version"] == 1
        assert info["runtime"] == "lightgbm" and info["read_features"] == list(FEATURE_NAMES)
        assert info["policy"]["atr_feature"] == "atr_14"

        labels = (await client.get("/model/labels")).json()
        assert [(lab["name"], lab["action"]) for lab in labels["labels"]] == [("down", "SELL"), ("up", "BUY")]
        assert all(re.fullmatch(r"#[0-9a-f]{6}", lab["color"]) for lab in labels["labels"])
        assert set(labels["actions"]) == {"BUY", "SELL", "HOLD"}

        # the alias's holder retired: the default signal's model refuses, with its code
        await services_of(app).registry.retire(MODEL, 1)
        refused(await client.get("/model/info"), "model_lifecycle_refused")
        refused(await client.get("/model/labels"), "model_lifecycle_refused")


async def test_model_not_found_for_a_signal_whose_model_is_gone(home: Path, world: World) -> None:
    from sigserve.domain import Policy, SignalDefinition

    async with serving(settings_for(home, default_signal="ghost")) as (app, client):
        await services_of(app).store.create_signal(SignalDefinition(
            "ghost", "no-such-model", "@production", INTERVAL, (), Policy()))
        refused(await client.get("/model/info"), "model_not_found")
        refused(await client.post("/inference/run", json=run_body(world, 200, signal="ghost")),
                "model_not_found")


# --- metrics --------------------------------------------------------------------------------------
async def test_metrics(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (_, client):
        await client.post("/inference/run", json=run_body(world, 210))
        await client.post("/api/v1/predict", json={"symbol": BTC, "features": world.feature_dict(BTC, 210)})
        await client.post("/inference/run", json=run_body(world, 210, signal="nope"))
        text = (await client.get("/metrics")).text
        # one bar: its row and the position before it are one read (feature_read)
        assert not re.search(r'sigserve_stage_duration_seconds_count{stage="position_read"} [1-9]', text)
        r = await client.post("/inference/backfill", json={  # a window reads positions on their own
            "signal_id": SIGNAL, "symbol": BTC, "interval_name": INTERVAL, "start": world.t(200),
            "end": world.t(220)})
        assert r.status_code == 200, r.text
        await client.get("/models/nope")
        await client.get("/nowhere")
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        for needle in (
            'sigserve_http_request_duration_seconds_count{method="POST",route="/inference/run",status="200"} 1.0',
            'sigserve_http_request_duration_seconds_count{method="GET",route="/models/{name}",status="404"} 1.0',
            'sigserve_http_request_duration_seconds_count{method="GET",route="unmatched",status="404"} 1.0',
            'sigserve_errors_total{error_code="signal_not_found"} 1.0',
            'sigserve_errors_total{error_code="model_not_found"} 1.0',
            'sigserve_errors_total{error_code="route_not_found"} 1.0',
        ):
            assert needle in text, needle
        for stage in ("feature_read", "position_read", "predict", "policy", "write"):
            assert re.search(rf'sigserve_stage_duration_seconds_count{{stage="{stage}"}} [1-9]', text), stage
        assert re.search(r'sigserve_signals_total\{action="[a-z_]+",endpoint="run"\} 1\.0', text)
        assert re.search(r'sigserve_signals_total\{action="[a-z_]+",endpoint="predict"\} 1\.0', text)


# --- request ids, routing errors, docs -------------------------------------------------------------
async def test_request_id_is_echoed_or_generated(home: Path) -> None:
    async with serving(settings_for(home)) as (_, client):
        r = await client.get("/healthz", headers={"X-Request-ID": "trade-42.a:b"})
        assert r.headers["x-request-id"] == "trade-42.a:b"
        generated = {(await client.get("/healthz")).headers["x-request-id"] for _ in range(3)}
        assert len(generated) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", g) for g in generated)
        for unsafe in ("has spaces", "x" * 200, "semi;colon"):
            echoed = (await client.get("/healthz", headers={"X-Request-ID": unsafe})).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", echoed)
        body = refused(await client.get("/models/nope", headers={"X-Request-ID": "rid-7"}), "model_not_found")
        assert body["request_id"] == "rid-7"


async def test_unknown_route_and_wrong_method(home: Path) -> None:
    async with serving(settings_for(home)) as (_, client):
        refused(await client.get("/inference/nothing"), "route_not_found")
        r = await client.get("/inference/run")
        body = refused(r, "method_not_allowed")
        assert body["details"]["allow"] == ["POST"] and r.headers["allow"] == "POST"
        refused(await client.delete("/models"), "method_not_allowed")


async def test_openapi_and_docs(home: Path) -> None:
    async with serving(settings_for(home)) as (_, client):
        schema = (await client.get("/openapi.json")).json()
        paths = schema["paths"]
        for path in ("/healthz", "/readyz", "/inference/run", "/inference/backfill", "/api/v1/predict",
                     "/models", "/models/{name}", "/model/info", "/model/labels", "/metrics"):
            assert path in paths, path
        assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
        assert schema["security"] == [{"bearer": []}]
        assert paths["/healthz"]["get"]["security"] == []
        assert "PredictRequest" in str(paths["/api/v1/predict"]["post"]["requestBody"])
        assert "ErrorEnvelope" in str(paths["/inference/run"]["post"]["responses"]["422"])
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "swagger-ui" in docs.text and "/api/v1/predict" in docs.text


# --- auth -----------------------------------------------------------------------------------------
def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_no_route_but_the_public_ones_answers_without_the_token(home: Path, world: World) -> None:
    async with serving(settings_for(home), headers={}) as (app, client):
        checked = 0
        for route in app.routes:
            assert isinstance(route, APIRoute | Route), route
            path = _concrete(route.path)
            for method in sorted(route.methods or ()):
                for headers in ({}, {"Authorization": "Bearer wrong-token"},
                                {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
                                {"Authorization": f"Bearer {TOKEN}x"}):
                    r = await client.request(method, path, headers=headers, json={})
                    if path in PUBLIC:
                        assert r.status_code == 200, (method, path, r.status_code)
                        continue
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.headers["www-authenticate"].startswith("Bearer")
                    if method != "HEAD":  # a HEAD answer has no body
                        assert refused(r, "unauthorized")["details"] == {}
                    checked += 1
                # the right token passes the gate (whatever the route then answers)
                r = await client.request(method, path, headers=AUTH, json={})
                assert r.status_code != 401, (method, path)
        assert checked >= 5 * 10
        # an unknown path gets 401, not 404, without the token: routes are not discoverable
        refused(await client.get("/secret-admin"), "unauthorized")


async def test_rows_of_another_feature_spec_are_refused(home: Path, world: World) -> None:
    """A model whose card records a feature spec (``sigserve train``) is never served rows that
    another spec computed: 409 feature_spec_mismatch."""
    async with serving(settings_for(home)) as (app, client):
        services = services_of(app)
        card = await services.store.get_model(MODEL, 2)
        assert card is not None
        spec_key = "spec-0123456789abcdef"
        await services.store.update_model_extra(MODEL, 2, card.runtime, {
            **card.extra, "feature_spec_hash": "0123456789abcdef" + "0" * 48, "feature_key": spec_key})
        body = refused(await client.post("/inference/run", json=run_body(world, 200, signal=PINNED)),
                       "feature_spec_mismatch")
        assert body["details"]["expected"] == spec_key and body["details"]["found"] == [KEY]


# --- the whole table --------------------------------------------------------------------------------
async def test_risk_rejected_and_explanation_unsupported(home: Path, world: World, tmp_path: Path) -> None:
    """403 risk_rejected carries the checks; 409 explanation_unsupported for a flavor without
    native TreeSHAP (a scikit-learn model), while the same request without ``explain`` answers."""
    from sigserve.domain import Policy, SignalDefinition, Stage
    from tests.fixtures.models import train_sklearn

    features = {**world.feature_dict(BTC, 300), "close": float(world.close[BTC][300])}
    async with serving(settings_for(home, risk_min_confidence=0.999)) as (app, client):
        body = refused(await client.post("/api/v1/predict", json={
            "symbol": BTC, "features": features, "risk_check": True}), "risk_rejected")
        assert body["details"]["checks"]["min_confidence"] == "fail"
        services = services_of(app)
        path = train_sklearn(tmp_path, feature_names=list(FEATURE_NAMES), n_features=len(FEATURE_NAMES))
        card = await services.registry.register(path, name="forest", classes=["down", "up"])
        await services.registry.promote("forest", card.version, Stage.PRODUCTION, actor="test")
        await services.store.create_signal(SignalDefinition("forest-1h", "forest", "@production", INTERVAL,
                                                            (), Policy(threshold=0.52)))
        request = {"symbol": BTC, "signal_id": "forest-1h", "features": features}
        assert (await client.post("/api/v1/predict", json=request)).status_code == 200
        refused(await client.post("/api/v1/predict", json={**request, "explain": True}),
                "explanation_unsupported")


def test_every_error_code_was_reached_over_http() -> None:
    """Runs last in this module (pytest keeps file order): every code of DESIGN.md's table, and the
    two HTTP-only ones, came back from the server above."""
    expected = set(ERROR_CODES) | set(HTTP_ONLY_CODES)
    if not SEEN_CODES:
        pytest.skip("run with the rest of the module")
    assert expected - SEEN_CODES == set()

