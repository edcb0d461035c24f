"""Rollouts through the admin HTTP endpoints, on the real app over a copy of the HTTP world.

- start / advance / promote / rollback: the traffic policy, the audit rows (actor = token label),
  the routed version of every answer (the (symbol, trading date) hash rule), rollback effective on
  the very next request;
- shadows: predicted on the same row off the request path, stored with ``shadow = true`` only
  where the served row is stored, never returned;
- refusals: unknown or retired versions, no rollout, no token;
- hot-swap under load: continuous requests while the policy changes 20 times (one of them a
  version whose artifact is corrupt): no failed request, every answer names its version and sha;
- the comparison report over backfilled bars.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from sigserve.app import Services
from sigserve.backfill import BackfillRequest, run_backfill
from sigserve.features.compute import FEATURE_NAMES
from sigserve.routing import bucket
from tests.e2e.http_world import BTC, ETH, MODEL, SIGNAL, World, services_of, serving, settings_for, state_of
from tests.fixtures.models import train_forward_return_lightgbm

CANDIDATE = 3  # a differently trained model, registered by the tests


async def _register_candidate(home: Path, world: World, tmp_path: Path, *, retire: bool = False) -> int:
    path = train_forward_return_lightgbm([world.features[s] for s in (BTC, ETH)],
                                         [world.close[s] for s in (BTC, ETH)], tmp_path / "cand.txt",
                                         feature_names=FEATURE_NAMES, n_trees=8, learning_rate=0.6,
                                         min_data_in_leaf=5, horizon=2)

    async with Services.open(settings_for(home)) as services:
        card = await services.registry.register(path, name=MODEL, classes=["down", "up"])
        if retire:
            await services.registry.retire(MODEL, card.version, actor="test")
        return card.version


def _routed(symbol: str, ts: str, share: float) -> int:
    return CANDIDATE if bucket(symbol, ts[:10]) < share else 1


async def _predict(client: httpx.AsyncClient, world: World, symbol: str, i: int) -> dict[str, Any]:
    r = await client.post("/api/v1/predict", json={
        "symbol": symbol, "timestamp": world.t(i),
        "features": {**world.feature_dict(symbol, i), "close": float(world.close[symbol][i])}})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_shadows_are_gathered_for_the_linger_and_predicted_together(
        home: Path, world: World, tmp_path: Path) -> None:
    assert await _register_candidate(home, world, tmp_path) == CANDIDATE
    async with serving(settings_for(home, server_prepared_ttl_s=60.0, shadow_linger_ms=5_000.0)) as (app, client):
        r = await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE})
        assert r.status_code == 200, r.text
        for i in range(60, 70):
            assert (await _predict(client, world, BTC, i))["metadata"]["model_version"] == 1
        runner = services_of(app).engine.shadow_runner
        await asyncio.sleep(0.2)
        assert runner.stats["predicted"] == 0  # lingering: nothing predicted yet
        await runner.idle()  # flushes at once, without waiting out the linger
        assert runner.stats["predicted"] == 10 and runner.stats["batches"] == 1
        queue = (await client.get(f"/admin/rollouts/{SIGNAL}")).json()["shadow_queue"]
        assert (queue["predicted"], queue["batches"], queue["dropped"]) == (10, 1, 0)
        # the shadow rows of /inference/run are written when their batch is
        r = await client.post("/inference/run", json={"signal_id": SIGNAL, "symbol": BTC,
                                                      "ts": world.t(300), "interval_name": "1h"})
        assert r.status_code == 200, r.text
    # closing the server flushes the lingering job before the store closes: nothing lost
    async with Services.open(settings_for(home)) as services:
        rows = await services.store.read_signals(SIGNAL, BTC)
    assert sorted((r["model_version"], bool(r["shadow"])) for r in rows) == [(1, False), (CANDIDATE, True)]


async def test_shadow_steps_wait_for_a_gap_between_requests(home: Path, world: World, tmp_path: Path) -> None:
    """In the event loop (``shadow_worker="loop"``), while a request is in flight a shadow step
    waits (the edge counts requests), up to one linger from the batch's start; a gap lets the
    steps run at once."""
    assert await _register_candidate(home, world, tmp_path) == CANDIDATE
    async with serving(settings_for(home, server_prepared_ttl_s=60.0, shadow_linger_ms=2_000.0,
                                    shadow_worker="loop")) as (app, client):
        r = await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE})
        assert r.status_code == 200, r.text
        for i in range(60, 66):
            await _predict(client, world, BTC, i)
        requests = state_of(app).requests
        assert requests.busy == 0  # every answered request left the count
        runner = services_of(app).engine.shadow_runner
        requests.enter()  # a request in flight
        flushed = asyncio.get_running_loop().create_task(runner.idle(timeout_s=10.0))
        await asyncio.sleep(0.3)
        assert runner.stats["predicted"] == 0  # the batch started, its steps wait for a gap
        requests.leave()
        await flushed
        assert runner.stats["predicted"] == 6
        # never forever: past one linger from the batch's start the steps run between requests
        runner.linger_s = 0.2
        for i in range(66, 70):
            await _predict(client, world, BTC, i)
        requests.enter()
        try:
            began = time.monotonic()
            await runner.idle(timeout_s=5.0)
            assert runner.stats["predicted"] == 10 and time.monotonic() - began >= 0.15
        finally:
            requests.leave()


async def test_shadows_are_predicted_in_a_worker_process_that_comes_back_when_it_dies(
        home: Path, world: World, tmp_path: Path) -> None:
    """The default runner predicts in a worker process of its own; the server writes the rows. A
    worker that dies fails its jobs (counted); the next job, a second later, starts another."""
    from sigserve.routing.shadow_process import RESTART_AFTER_S, ShadowProcessRunner

    assert await _register_candidate(home, world, tmp_path) == CANDIDATE
    async with serving(settings_for(home, server_prepared_ttl_s=60.0, shadow_linger_ms=5_000.0)) as (app, client):
        assert (await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE})).status_code == 200
        r = await client.post("/inference/run", json={"signal_id": SIGNAL, "symbol": BTC,
                                                      "ts": world.t(300), "interval_name": "1h"})
        assert r.status_code == 200, r.text
        services = services_of(app)
        runner = services.engine.shadow_runner
        assert isinstance(runner, ShadowProcessRunner)
        worker = runner.process
        assert worker is not None and worker.pid != os.getpid() and worker.poll() is None
        await runner.idle()
        assert (runner.stats["predicted"], runner.stats["failed"]) == (1, 0)
        rows = await services.store.read_signals(SIGNAL, BTC)
        assert sorted((r["model_version"], bool(r["shadow"])) for r in rows) == [(1, False), (CANDIDATE, True)]
        # the worker's row is the candidate model's own answer on that bar
        import lightgbm as lgb

        booster = lgb.Booster(model_file=str(tmp_path / "cand.txt"))
        features = world.feature_dict(BTC, 300)
        p_up = float(booster.predict(np.array([[features[n] for n in booster.feature_name()]]))[0])
        shadow_row = next(r for r in rows if r["shadow"])
        assert shadow_row["raw_output"] == pytest.approx([1.0 - p_up, p_up])

        await _predict(client, world, BTC, 301)  # in flight when the worker dies
        worker.kill()
        worker.wait()
        for _ in range(100):  # the server sees the end of the pipe
            if runner.process is None:
                break
            await asyncio.sleep(0.02)
        assert runner.process is None and runner.stats["failed"] == 1
        status = (await client.get(f"/admin/rollouts/{SIGNAL}")).json()["shadow_queue"]
        assert status["failed"] == 1
        # served all along; within the restart delay jobs are dropped (counted), then a new worker
        await asyncio.sleep(RESTART_AFTER_S)
        answer = await _predict(client, world, BTC, 302)
        assert answer["metadata"]["model_version"] == 1
        assert runner.process is not None and runner.process.pid != worker.pid
        await runner.idle()
        assert runner.stats["predicted"] == 2


async def test_a_shadow_version_the_worker_cannot_verify_fails_its_jobs_and_nothing_else(
        home: Path, world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The worker verifies the sha of what it loads, as the server does: an artifact changed on
    disk after the server loaded it is refused there (logged with its code), its shadow jobs fail
    (counted), and the champion is served throughout."""
    from sigserve.routing.shadow_process import RESTART_AFTER_S

    assert await _register_candidate(home, world, tmp_path) == CANDIDATE
    async with serving(settings_for(home, server_prepared_ttl_s=60.0)) as (app, client):
        assert (await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE})).status_code == 200
        await _predict(client, world, BTC, 60)  # the server holds the candidate, verified
        services = services_of(app)
        runner = services.engine.shadow_runner
        await runner.idle()
        assert (runner.stats["predicted"], runner.stats["failed"]) == (1, 0)
        card = await services.registry.get(MODEL, CANDIDATE)
        runner.process.kill()  # the next worker loads the version again, from the disk
        while runner.process is not None:
            await asyncio.sleep(0.02)
        (home / card.artifact_path).write_bytes(b"tampered")
        await asyncio.sleep(RESTART_AFTER_S)
        with caplog.at_level("ERROR", logger="sigserve.shadow"):
            answers = [await _predict(client, world, BTC, i) for i in range(61, 64)]
            await runner.idle()
        assert all(a["metadata"]["model_version"] == 1 for a in answers)
        assert runner.stats["predicted"] == 1 and runner.stats["failed"] == 3
        assert any("artifact_corrupt" in r.getMessage() for r in caplog.records), caplog.records


async def test_rollout_stages_routing_shadows_and_audit(home: Path, world: World, tmp_path: Path) -> None:
    assert await _register_candidate(home, world, tmp_path) == CANDIDATE
    async with serving(settings_for(home, server_prepared_ttl_s=60.0)) as (app, client):
        services = services_of(app)
        r = await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE},
                              headers={"X-Sigserve-Actor": "alice"})
        assert r.status_code == 200, r.text
        assert r.json()["to"]["stage"] == "shadow" and r.json()["to"]["share"] == 0.0
        # shadow stage: every answer is the champion's; the candidate is predicted off-path
        bars = range(60, 400, 7)
        for i in bars:
            answer = await _predict(client, world, BTC, i)
            assert answer["metadata"]["model_version"] == 1
        runner = services.engine.shadow_runner
        await runner.idle()
        assert runner.stats["predicted"] == len(bars) and runner.stats["dropped"] == 0
        # nothing stored by /api/v1/predict (shadows are stored only with the served row)
        assert await services.store.read_signals(SIGNAL) == []
        # /inference/run stores the champion's row and, in the background, the shadow's
        for i in (300, 301):
            r = await client.post("/inference/run", json={"signal_id": SIGNAL, "symbol": BTC,
                                                          "ts": world.t(i), "interval_name": "1h"})
            assert r.status_code == 200 and r.json()["model_version"] == 1
        await runner.idle()
        rows = await services.store.read_signals(SIGNAL, BTC)
        assert sorted((r["model_version"], bool(r["shadow"])) for r in rows) == [
            (1, False), (1, False), (CANDIDATE, True), (CANDIDATE, True)]
        status = (await client.get(f"/admin/rollouts/{SIGNAL}")).json()
        assert status["live_shadow_comparison"][0]["shadow_version"] == CANDIDATE
        assert status["live_shadow_comparison"][0]["bars"] == len(bars) + 2

        # canary 10%, 50%, 100%: each (symbol, date) goes where the hash says
        for share in (0.1, 0.5, 1.0):
            r = await client.post(f"/admin/rollouts/{SIGNAL}/advance", json={})
            assert r.status_code == 200 and r.json()["to"]["share"] == share
            seen = set()
            for symbol in (BTC, ETH):
                for i in range(60, 340, 5):
                    answer = await _predict(client, world, symbol, i)
                    expected = _routed(symbol, world.t(i), share)
                    assert answer["metadata"]["model_version"] == expected
                    seen.add(expected)
            if share == 0.5:
                assert seen == {1, CANDIDATE}
        r = await client.post(f"/admin/rollouts/{SIGNAL}/advance", json={})
        assert r.status_code == 422 and r.json()["error_code"] == "validation_error"

        # rollback: the very next request is the champion's
        r = await client.post(f"/admin/rollouts/{SIGNAL}/rollback")
        assert r.status_code == 200 and r.json()["to"]["challenger"] is None
        assert (await _predict(client, world, BTC, 200))["metadata"]["model_version"] == 1

        # promote needs a challenger; start again at 50% and promote
        r = await client.post(f"/admin/rollouts/{SIGNAL}/promote")
        assert r.status_code == 422
        r = await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE, "share": 0.5})
        assert r.status_code == 200 and r.json()["to"]["stage"] == "canary"
        r = await client.post(f"/admin/rollouts/{SIGNAL}/promote")
        assert r.status_code == 200 and r.json()["to"]["champion"] == CANDIDATE
        for i in (100, 200, 300):
            assert (await _predict(client, world, ETH, i))["metadata"]["model_version"] == CANDIDATE

        status = (await client.get(f"/admin/rollouts/{SIGNAL}")).json()
        events = status["events"]
        assert [e["action"] for e in events] == ["start", "advance", "advance", "advance", "rollback",
                                                 "start", "promote"]
        assert events[0]["actor"] == "token:default (alice)"
        assert all(e["actor"].startswith("token:default") for e in events)
        assert events[4]["from"]["share"] == 1.0 and events[4]["to"]["share"] == 0.0
        assert events[-1]["from"]["champion"] == 1 and events[-1]["to"]["champion"] == CANDIDATE
        listed = (await client.get("/admin/rollouts")).json()["rollouts"]
        assert [p["signal_id"] for p in listed] == [SIGNAL]
        # the Prometheus counters of the shadow runner
        text = (await client.get("/metrics")).text
        assert "sigserve_shadow_predictions_total" in text and "sigserve_shadow_dropped_total" in text


async def test_rollout_refusals_change_nothing(home: Path, world: World, tmp_path: Path) -> None:
    retired = await _register_candidate(home, world, tmp_path, retire=True)
    async with serving(settings_for(home)) as (_, client):
        cases = [
            (f"/admin/rollouts/{SIGNAL}/start", {"version": 99}, 404, "model_not_found"),
            (f"/admin/rollouts/{SIGNAL}/start", {"version": retired}, 409, "model_lifecycle_refused"),
            (f"/admin/rollouts/{SIGNAL}/start", {"version": 1}, 422, "validation_error"),
            (f"/admin/rollouts/{SIGNAL}/start", {"version": 2, "share": 2}, 422, "validation_error"),
            ("/admin/rollouts/nope/start", {"version": 2}, 404, "signal_not_found"),
            (f"/admin/rollouts/{SIGNAL}/advance", {}, 422, "validation_error"),
        ]
        for path, body, status, code in cases:
            r = await client.post(path, json=body)
            assert (r.status_code, r.json()["error_code"]) == (status, code), (path, body, r.text)
        assert (await client.get(f"/admin/rollouts/{SIGNAL}")).json()["policy"] is None
        assert (await client.get("/admin/rollouts/nope")).status_code == 404
        r = await client.post(f"/admin/rollouts/{SIGNAL}/rollback", headers={"Authorization": "Bearer x"})
        assert (r.status_code, r.json()["error_code"]) == (401, "unauthorized")


async def test_hot_swap_under_load(home: Path, world: World, tmp_path: Path) -> None:
    """Requests run continuously while the policy changes 20 times; one change names a version
    whose artifact was corrupted: it is refused with artifact_corrupt and the old one serves."""
    await _register_candidate(home, world, tmp_path)
    corrupt = await _register_candidate(home, world, tmp_path)  # version 4: the same bytes as 3
    async with serving(settings_for(home, server_prepared_ttl_s=60.0)) as (app, client):
        services = services_of(app)
        shas = {v: (await services.registry.get(MODEL, v)).sha256 for v in (1, CANDIDATE)}
        stop = asyncio.Event()
        answers: list[tuple[int, str]] = []
        failures: list[str] = []

        async def load() -> None:
            i = 60
            while not stop.is_set():
                r = await client.post("/api/v1/predict", json={
                    "symbol": BTC, "timestamp": world.t(i), "features": world.feature_dict(BTC, i)})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    meta = r.json()["metadata"]
                    answers.append((meta["model_version"], meta["model_sha256"]))
                i = 60 + (i + 1) % 300
                await asyncio.sleep(0)  # the in-process transport may never suspend otherwise

        workers = [asyncio.create_task(load()) for _ in range(4)]
        steps = ["start", "advance", "advance", "advance", "rollback"] * 4
        swap_ms = []
        refused = None
        for n, step in enumerate(steps):
            if n == 10:  # corrupt the candidate's artifact bytes under a new version: refused
                card = await services.registry.get(MODEL, corrupt)
                services.registry.forget(card.sha256)
                path = services.settings.home / str(card.artifact_path)
                original = path.read_bytes()
                path.write_bytes(original + b"\n")
                r = await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": corrupt})
                refused = r.json()["error_code"]
                path.write_bytes(original)
            body = {"version": CANDIDATE} if step == "start" else {}
            began = time.perf_counter()
            r = await client.post(f"/admin/rollouts/{SIGNAL}/{step}", json=body)
            swap_ms.append((time.perf_counter() - began) * 1000)
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*workers)
        assert refused == "artifact_corrupt"
        assert failures == []
        assert len(answers) > 100
        versions = {v for v, _ in answers}
        assert versions <= {1, CANDIDATE} and CANDIDATE in versions
        assert all(sha == shas[v] for v, sha in answers)  # every answer names what produced it
        assert len(steps) == 20 and max(swap_ms) < 1000


async def test_backfill_routes_like_live_and_report(home: Path, world: World, tmp_path: Path) -> None:
    await _register_candidate(home, world, tmp_path)
    async with serving(settings_for(home)) as (app, client):
        services = services_of(app)
        r = await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE, "share": 0.5})
        assert r.status_code == 200
        report = await run_backfill(services.engine, BackfillRequest(
            SIGNAL, BTC, "1h", "window", world.ts[60], world.ts[399]),
            max_rows=100_000, chunk_rows=100)
        rows = await services.store.read_signals(SIGNAL, BTC)
        served = {(r["ts"], r["model_version"]) for r in rows if not r["shadow"]}
        shadows = {(r["ts"], r["model_version"]) for r in rows if r["shadow"]}
        assert report.rows_written == len(served) == 340
        assert sum(report.actions.values()) == 340
        for ts, version in served:
            stamp = np.datetime64(ts, "us")
            assert version == _routed(BTC, str(stamp), 0.5)
            assert (ts, 1 if version == CANDIDATE else CANDIDATE) in shadows
        assert {v for _, v in served} == {1, CANDIDATE}
        # a live bar equals its backfilled row (same version, same output)
        for i in (150, 390):
            live = (await client.post("/inference/run", json={
                "signal_id": SIGNAL, "symbol": BTC, "ts": world.t(i), "interval_name": "1h",
                "source": "historical_replay"})).json()
            stored = next(r for r in rows if np.datetime64(r["ts"], "us") == np.datetime64(world.t(i)[:-1])
                          and not r["shadow"])
            assert live["model_version"] == stored["model_version"]
            assert live["raw_output"] == list(stored["raw_output"])
        r = await client.get(f"/admin/rollouts/{SIGNAL}/report", params={"horizon": 2})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["versions"] == [1, CANDIDATE] and out["bars"] == 340
        comparison = out["comparisons"][0]
        assert comparison["common_bars"] == 340 and 0.0 <= comparison["agreement_rate"] <= 1.0
        for version in ("1", str(CANDIDATE)):
            stats = out["per_version"][version]
            assert stats["bars"] == 340 and stats["outcomes"]["bars_with_outcome"] > 0
            assert 0.0 <= stats["outcomes"]["hit_rate"] <= 1.0
        assert (await client.get(f"/admin/rollouts/{SIGNAL}/report", params={"horizon": "x"})).status_code == 422


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_bucket_share_is_close_to_the_share(share: float) -> None:
    days = [str(np.datetime64("2024-01-01") + np.timedelta64(d, "D")) for d in range(2000)]
    taken = sum(bucket("BTCUSDT", d) < share for d in days) / len(days)
    assert abs(taken - share) < 0.04


async def test_a_version_reading_other_features_is_shadowed_on_its_own_columns(
        home: Path, world: World, tmp_path: Path) -> None:
    names = tuple(reversed(FEATURE_NAMES[:9]))  # another order, fewer features
    matrices = [world.features[s][:, [FEATURE_NAMES.index(n) for n in names]] for s in (BTC, ETH)]
    path = train_forward_return_lightgbm(matrices, [world.close[s] for s in (BTC, ETH)], tmp_path / "sub.txt",
                                         feature_names=names, n_trees=6, learning_rate=0.5, min_data_in_leaf=5)
    async with Services.open(settings_for(home)) as services:
        version = (await services.registry.register(path, name=MODEL, classes=["down", "up"])).version
    async with serving(settings_for(home)) as (app, client):
        services = services_of(app)
        assert (await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": version})).status_code == 200
        for i in (200, 201):
            r = await client.post("/inference/run", json={"signal_id": SIGNAL, "symbol": BTC, "ts": world.t(i),
                                                          "interval_name": "1h"})
            assert r.status_code == 200 and r.json()["model_version"] == 1
        await services.engine.shadow_runner.idle()
        runtime = await services.registry.runtime(await services.registry.get(MODEL, version))
        shadows = [r for r in await services.store.read_signals(SIGNAL, BTC) if r["shadow"]]
        assert [r["model_version"] for r in shadows] == [version, version]
        for row, i in zip(shadows, (200, 201), strict=True):
            own = np.array([[world.feature_dict(BTC, i)[n] for n in names]])
            assert list(row["raw_output"]) == list(runtime.predict(own)[0])
        # backfill: the candidate at 100% reads its own columns from the store
        await client.post(f"/admin/rollouts/{SIGNAL}/advance", json={"share": 1.0})
        r = await client.post("/inference/backfill", json={"signal_id": SIGNAL, "symbol": BTC, "interval_name": "1h",
                                                           "start": world.t(300), "end": world.t(309)})
        assert r.status_code == 200 and r.json()["rows_written"] == 10
        served = [r for r in await services.store.read_signals(SIGNAL, BTC, start=np.datetime64(world.t(300)[:-1]))
                  if not r["shadow"]]
        assert {r["model_version"] for r in served} == {version}
        own = np.array([[world.feature_dict(BTC, 300)[n] for n in names]])
        assert list(served[0]["raw_output"]) == list(runtime.predict(own)[0])


async def test_a_challenger_retired_during_a_rollout_leaves_the_champion_serving(
        home: Path, world: World, tmp_path: Path) -> None:
    await _register_candidate(home, world, tmp_path)
    async with serving(settings_for(home)) as (app, client):  # prepared TTL 0: every call resolves
        services = services_of(app)
        r = await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE, "share": 1.0})
        assert r.status_code == 200
        assert (await _predict(client, world, BTC, 200))["metadata"]["model_version"] == CANDIDATE
        await services.registry.retire(MODEL, CANDIDATE, actor="test")
        for i in (200, 201, 202):  # never the retired version, never a refusal
            assert (await _predict(client, world, BTC, i))["metadata"]["model_version"] == 1
        # a change naming the retired version is refused, and changes nothing
        await client.post(f"/admin/rollouts/{SIGNAL}/rollback")
        r = await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE})
        assert (r.status_code, r.json()["error_code"]) == (409, "model_lifecycle_refused")
        assert (await client.get(f"/admin/rollouts/{SIGNAL}")).json()["policy"]["challenger"] is None


async def test_a_full_shadow_queue_drops_and_counts(home: Path, world: World, tmp_path: Path) -> None:
    await _register_candidate(home, world, tmp_path)
    async with serving(settings_for(home, shadow_queue_size=2)) as (app, client):
        services = services_of(app)
        assert (await client.post(f"/admin/rollouts/{SIGNAL}/start", json={"version": CANDIDATE})).status_code == 200
        answers = await asyncio.gather(*(_predict(client, world, BTC, i) for i in range(100, 140)))
        assert all(a["metadata"]["model_version"] == 1 for a in answers)  # served, whatever the queue
        runner = services.engine.shadow_runner
        await runner.idle()
        assert runner.stats["dropped"] > 0
        assert runner.stats["dropped"] + runner.stats["predicted"] == 40
        text = (await client.get("/metrics")).text
        dropped = next(line for line in text.splitlines() if line.startswith("sigserve_shadow_dropped_total"))
        assert float(dropped.split()[-1]) == runner.stats["dropped"]
