"""``/api/v1/predict`` extras on the real app: risk checks (403 risk_rejected with the checks),
TreeSHAP explanations (inline and stored features), a regime-gated ensemble (regime probabilities
with entropy, strategy weights, the blend, lifecycle refusals of a part), and trading_decision
events on the audit bus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.bus.memory import MemoryBus
from sigserve.domain import Policy, SignalDefinition
from sigserve.ensemble import register_ensemble
from sigserve.features.compute import FEATURE_NAMES
from tests.e2e.http_world import BTC, ETH, MODEL, World, services_of, serving, settings_for
from tests.fixtures.models import train_forward_return_lightgbm


def _inline(world: World, symbol: str, i: int, **extra: Any) -> dict[str, Any]:
    return {"symbol": symbol, "timestamp": world.t(i),
            "features": {**world.feature_dict(symbol, i), "close": float(world.close[symbol][i])}, **extra}


async def _first_trade(client: Any, world: World) -> int:
    for i in range(60, 400):
        r = await client.post("/api/v1/predict", json=_inline(world, BTC, i))
        if r.json()["action"] != "HOLD":
            return i
    raise AssertionError("no trade in the world")


async def test_risk_checks_refuse_with_the_checks(home: Path, world: World) -> None:
    async with serving(settings_for(home, risk_max_position_units=1e-9, risk_min_confidence=0.99)) as (_, client):
        i = await _first_trade(client, world)
        r = await client.post("/api/v1/predict", json=_inline(world, BTC, i, risk_check=True))
        assert r.status_code == 403, r.text
        body = r.json()
        assert body["error_code"] == "risk_rejected"
        assert body["details"]["checks"]["max_position"] == "fail"
        assert body["details"]["checks"]["min_confidence"] == "fail"
        assert body["details"]["checks"]["levels"] == "pass" and body["details"]["approved"] is False
        # without risk_check the same decision is answered
        assert (await client.post("/api/v1/predict", json=_inline(world, BTC, i))).status_code == 200
    async with serving(settings_for(home)) as (_, client):
        i = await _first_trade(client, world)
        ok = (await client.post("/api/v1/predict", json=_inline(world, BTC, i, risk_check=True))).json()
        assert ok["risk_validation"]["approved"] is True
        assert set(ok["risk_validation"]["checks"]) == {"max_position", "max_concentration",
                                                        "max_signals_per_window", "min_confidence", "levels"}


async def test_explanations_inline_and_stored(home: Path, world: World) -> None:
    async with serving(settings_for(home)) as (app, client):
        plain = (await client.post("/api/v1/predict", json=_inline(world, BTC, 250))).json()
        assert "explanation" not in plain["metadata"]
        inline = (await client.post("/api/v1/predict", json=_inline(world, BTC, 250, explain=True,
                                                                     explain_top_k=4))).json()
        stored = (await client.post("/api/v1/predict", json={"symbol": BTC, "timestamp": world.t(250),
                                                             "explain": True})).json()
        for answer in (inline, stored):
            out = answer["metadata"]["explanation"]
            assert out["method"] == "lightgbm TreeSHAP" and out["explained"] == "up"
            assert out["latency_ms"] > 0 and out["top_features"][0]["feature"] in FEATURE_NAMES
            p_up = 1 / (1 + np.exp(-out["raw_margin"]))
            assert p_up == pytest.approx(max(answer["confidence"], 1 - answer["confidence"]), rel=1e-6) or \
                p_up == pytest.approx(1 - answer["confidence"], rel=1e-6) or p_up == pytest.approx(answer["confidence"])
        assert len(inline["metadata"]["explanation"]["top_features"]) == 4
        assert inline["metadata"]["explanation"]["raw_margin"] == pytest.approx(
            stored["metadata"]["explanation"]["raw_margin"])
        text = (await client.get("/metrics")).text
        assert 'stage="explain"' in text
        del app


def _train_regime(world: World, path: Path) -> Path:
    import lightgbm

    x = np.vstack([world.features[s][60:] for s in (BTC, ETH)])
    x = x[np.isfinite(x).all(axis=1)]
    ret = x[:, FEATURE_NAMES.index("ret_12")]
    y = np.digitize(ret, np.quantile(ret, [1 / 3, 2 / 3])).astype(float)  # bear, sideways, bull
    params = {"objective": "multiclass", "num_class": 3, "num_leaves": 7, "learning_rate": 0.3,
              "min_data_in_leaf": 10, "num_threads": 1, "seed": 1, "deterministic": True, "verbose": -1}
    lightgbm.train(params, lightgbm.Dataset(x, y, feature_name=list(FEATURE_NAMES), params={"verbose": -1}),
                   num_boost_round=10).save_model(str(path))
    return path


async def test_regime_gated_ensemble(home: Path, world: World, tmp_path: Path) -> None:
    regime_path = _train_regime(world, tmp_path / "regime.txt")
    other = train_forward_return_lightgbm([world.features[s] for s in (BTC, ETH)],
                                          [world.close[s] for s in (BTC, ETH)], tmp_path / "b.txt",
                                          feature_names=FEATURE_NAMES, n_trees=8, learning_rate=0.6,
                                          min_data_in_leaf=5, horizon=2)
    async with Services.open(settings_for(home)) as services:
        registry = services.registry
        regime = await registry.register(regime_path, name="regime", classes=["bear", "sideways", "bull"])
        alt = await registry.register(other, name="revert", classes=["down", "up"])
        card = await register_ensemble(registry, "gated", regime=regime.ref,
                                       specialists={"bull": f"{MODEL}:1", "bear": alt.ref, "sideways": f"{MODEL}:2"})
        assert card.flavor == "ensemble" and card.classes == ("down", "up")
        await services.store.create_signal(SignalDefinition("gated-1h", "gated", str(card.version), "1h",
                                                            (), Policy(threshold=0.52, atr_feature="atr_14")))
    async with serving(settings_for(home)) as (app, client):
        services = services_of(app)
        body = _inline(world, BTC, 300, signal_id="gated-1h")
        answer = (await client.post("/api/v1/predict", json=body)).json()
        regimes = answer["regime_probabilities"]
        assert set(regimes) == {"bull", "bear", "sideways", "entropy"}
        probs = np.array([regimes[k] for k in ("bull", "bear", "sideways")])
        assert probs.sum() == pytest.approx(1.0)
        assert regimes["entropy"] == pytest.approx(float(-(probs * np.log(probs)).sum()))
        weights = answer["strategy_weights"]
        assert sorted(weights) == ["bear:revert", "bull:trend", "sideways:trend"]
        for label, name in (("bull", "trend"), ("bear", "revert"), ("sideways", "trend")):
            assert weights[f"{label}:{name}"] == pytest.approx(regimes[label])  # weights = regime probs
        # the blend, recomputed from the parts
        row = np.array([[world.feature_dict(BTC, 300)[n] for n in FEATURE_NAMES]])
        parts = [await services.registry.runtime(await services.registry.get(*ref))
                 for ref in ((MODEL, 1), ("revert", 1), (MODEL, 2))]
        blend = sum(w * rt.predict(row)[0, 1] for w, rt in zip(probs, parts, strict=True))
        assert max(blend, 1 - blend) == pytest.approx(answer["confidence"])
        # a plain signal's answer has no regime fields, even right after an ensemble's
        plain = (await client.post("/api/v1/predict", json=_inline(world, BTC, 300))).json()
        assert plain["regime_probabilities"] is None and plain["strategy_weights"] is None
        # explanations are refused for an ensemble; a retired part refuses the ensemble
        r = await client.post("/api/v1/predict", json={**body, "explain": True})
        assert (r.status_code, r.json()["error_code"]) == (409, "explanation_unsupported")
        await services.registry.retire("revert", 1, actor="test")
        r = await client.post("/api/v1/predict", json=body)
        assert (r.status_code, r.json()["error_code"]) == (409, "model_lifecycle_refused")


async def test_trading_decision_events_reach_the_audit_bus(home: Path, world: World) -> None:
    bus = MemoryBus()
    await bus.connect()
    got: list[dict[str, Any]] = []

    async def handler(msg: Any) -> None:
        got.append(json.loads(msg.data))

    await bus.subscribe("audit.trading_decision.>", handler)
    async with serving(settings_for(home, audit_bus="memory://")) as (app, client):
        from sigserve.api.routes import _inference  # noqa: F401  (the publisher lives on the route)

        answers = []
        for i in (200, 201, 202):
            r = await client.post("/api/v1/predict", json=_inline(world, BTC, i, risk_check=True, explain=True))
            answers.append(r.json())
            if i == 200:  # the publisher connects on the first event: hand it this test's bus
                publisher = _publisher(app)
                publisher.bus = bus
        await asyncio.wait_for(publisher.queue.join(), 5)
    await asyncio.sleep(0.05)
    assert [g["decision_id"] for g in got] == [a["decision_id"] for a in answers]
    event = got[-1]
    assert event["event"] == "trading_decision" and event["symbol"] == BTC
    assert event["risk_checks"]["approved"] is True and len(event["top_features"]) == 5
    assert {"action", "quantity", "confidence", "regime_probs", "strategy_weights"} <= set(event)


def _publisher(app: Any) -> Any:
    for spec in app.table.routes:
        if spec.path == "/api/v1/predict":
            cells = spec.endpoint.__closure__ or ()
            for cell in cells:
                extras = cell.cell_contents
                if type(extras).__name__ == "Extras":
                    return extras.publisher
    raise AssertionError("no publisher")
