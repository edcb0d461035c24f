"""Explanations by native TreeSHAP: base value + contributions == the raw margin, for LightGBM
(binary, multiclass, regression) and XGBoost; the top-k order; other flavors refused with
``explanation_unsupported`` (409)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.config import Settings
from sigserve.domain import Policy, SignalDefinition
from sigserve.engine import Prepared
from sigserve.errors import ExplanationUnsupported
from sigserve.explain import contributions, explain
from tests.fixtures import models

CLASSES = {"binary": ["down", "up"], "multiclass": ["down", "flat", "up"], "regression": None}


async def _prepared(tmp_path: Path, path: Path, task: str, **register: object) -> tuple[Services, Prepared]:
    ctx = Services.open(Settings(home=tmp_path / "home"))
    services = await ctx.__aenter__()
    services._ctx = ctx  # type: ignore[attr-defined]
    card = await services.registry.register(path, name="m", classes=CLASSES[task], task=task, **register)
    await services.store.register_features(list(card.feature_names))
    await services.store.create_signal(SignalDefinition("s", "m", str(card.version), "1h", (),
                                                        Policy(atr_feature=None)))
    return services, await services.engine.prepare("s")


async def _close(services: Services) -> None:
    await services._ctx.__aexit__(None, None, None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("flavor,task", [("lightgbm", "binary"), ("lightgbm", "multiclass"),
                                         ("lightgbm", "regression"), ("xgboost", "binary"),
                                         ("xgboost", "multiclass")])
async def test_contributions_sum_to_the_raw_margin(tmp_path: Path, flavor: str, task: str) -> None:
    path = (models.train_lightgbm(tmp_path, task) if flavor == "lightgbm"
            else models.train_xgboost(tmp_path, task))
    services, prepared = await _prepared(tmp_path, path, task)
    try:
        rows = models.features(n_rows=40)
        values, base, margin = contributions(prepared, services.registry, rows)
        assert values.shape[0] == 40 and values.shape[2] == rows.shape[1]
        np.testing.assert_allclose(base + values.sum(axis=2), margin, rtol=1e-6, atol=1e-6)
        out = explain(prepared, services.registry, rows[:1], top_k=3,
                      output=prepared.runtime.predict(rows[:1]))
        assert len(out["top_features"]) == 3
        magnitudes = [abs(f["contribution"]) for f in out["top_features"]]
        assert magnitudes == sorted(magnitudes, reverse=True)
        k = int(np.argmax(prepared.runtime.predict(rows[:1])[0])) if task == "multiclass" else 0
        assert out["raw_margin"] == pytest.approx(margin[0, k])
        everything = explain(prepared, services.registry, rows[:1], top_k=100)
        total = everything["base_value"] + sum(f["contribution"] for f in everything["top_features"])
        assert total == pytest.approx(everything["raw_margin"], abs=1e-6)
        if task == "binary":  # the margin is the log-odds of the served probability
            p = prepared.runtime.predict(rows[:1])[0, 1]
            assert 1 / (1 + np.exp(-out["raw_margin"])) == pytest.approx(p, rel=1e-6)
    finally:
        await _close(services)


async def test_other_flavors_are_refused(tmp_path: Path) -> None:
    path = models.train_sklearn(tmp_path, "binary")
    services, prepared = await _prepared(tmp_path, path, "binary", trust_pickle=True)
    try:
        with pytest.raises(ExplanationUnsupported) as refused:
            explain(prepared, services.registry, models.features(n_rows=1))
        assert refused.value.code == "explanation_unsupported" and refused.value.http_status == 409
        assert refused.value.details["flavor"] == "sklearn"
    finally:
        await _close(services)
