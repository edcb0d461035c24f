"""Regime-gated ensembles: the blend (weights = regime probabilities, or a meta model), the parts'
own feature columns, registration refusals, sha verification of the spec and lifecycle refusals
of a part, and ``sigserve models ensemble``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.config import Settings
from sigserve.ensemble import EnsembleRuntime, register_ensemble, take_last_parts
from sigserve.errors import ArtifactCorrupt, ModelLifecycleRefused, ValidationError
from tests.fixtures import models

REGIMES = ["bear", "sideways", "bull"]


async def _world(tmp_path: Path) -> tuple[Services, object, dict[str, str]]:
    ctx = Services.open(Settings(home=tmp_path / "home"))
    services = await ctx.__aenter__()
    registry = services.registry
    regime = await registry.register(models.train_lightgbm(tmp_path, "multiclass", n_trees=5, filename="r.txt"),
                                     name="regime", classes=REGIMES)
    meta = await registry.register(models.train_lightgbm(tmp_path, "multiclass", n_trees=9, filename="m.txt"),
                                   name="meta", classes=REGIMES)
    refs = {}
    for label, trees in zip(REGIMES, (3, 10, 25), strict=True):
        path = models.train_lightgbm(tmp_path, "binary", n_trees=trees, filename=f"{label}.txt")
        refs[label] = (await registry.register(path, name=f"spec-{label}", classes=["down", "up"])).ref
    return services, ctx, {"regime": regime.ref, "meta": meta.ref, **refs}


async def test_blend_with_regime_weights_and_with_a_meta_model(tmp_path: Path) -> None:
    services, ctx, refs = await _world(tmp_path)
    try:
        registry = services.registry
        specialists = {label: refs[label] for label in REGIMES}
        rows = models.features(n_rows=30)
        parts = {k: await registry.runtime(await registry.get(*v.split(":")[:1], int(v.split(":")[1])))
                 for k, v in refs.items()}
        for meta in (None, refs["meta"]):
            card = await register_ensemble(registry, "gated", regime=refs["regime"], specialists=specialists,
                                           meta=meta)
            assert card.flavor == "ensemble" and card.classes == ("down", "up")
            runtime = await registry.runtime(card)
            assert isinstance(runtime, EnsembleRuntime)
            out = runtime.predict(rows)
            weights = parts["meta" if meta else "regime"].predict(rows)  # classes in REGIMES order
            expected = sum(weights[:, i : i + 1] * parts[label].predict(rows) for i, label in enumerate(REGIMES))
            np.testing.assert_allclose(out, expected, rtol=1e-12)
            np.testing.assert_allclose(out.sum(axis=1), 1.0)
            one = runtime.predict(rows[:1])
            parts_of_row = take_last_parts(card.ref)
            assert parts_of_row is not None
            regime, strategy = parts_of_row
            probs = parts["regime"].predict(rows[:1])[0]
            assert [regime[k] for k in REGIMES] == pytest.approx(list(probs))
            assert regime["entropy"] == pytest.approx(float(-(probs * np.log(probs)).sum()))
            assert sum(strategy.values()) == pytest.approx(1.0)
            assert one[0] == pytest.approx(out[0])
            assert take_last_parts(card.ref) is None  # taken once
            # the one-row path (Python floats) gives the batch path's bits, row by row
            singles = np.vstack([runtime.predict(rows[i : i + 1]) for i in range(len(rows))])
            np.testing.assert_array_equal(singles, out)
    finally:
        await ctx.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def test_refusals(tmp_path: Path) -> None:
    services, ctx, refs = await _world(tmp_path)
    try:
        registry = services.registry
        full = {label: refs[label] for label in REGIMES}
        for kwargs in ({"specialists": {"bear": refs["bear"], "bull": refs["bull"]}},  # a regime without one
                       {"specialists": {**full, "crash": refs["bear"]}},
                       {"specialists": {**full, "bull": "spec-bull@production"}},  # pinned versions only
                       {"specialists": {**full, "bull": refs["regime"]}},  # another task / classes
                       {"specialists": full, "meta": refs["bear"]}):  # meta classes must be the regimes
            with pytest.raises(ValidationError):
                await register_ensemble(registry, "bad", regime=refs["regime"], **kwargs)  # type: ignore[arg-type]
        card = await register_ensemble(registry, "gated", regime=refs["regime"], specialists=full)
        with pytest.raises(ValidationError):
            await register_ensemble(registry, "nested", regime=refs["regime"],
                                    specialists={**full, "bull": card.ref})
        # a part retired: the ensemble refuses; the spec file tampered with: artifact_corrupt
        await registry.retire("spec-bull", 1)
        with pytest.raises(ModelLifecycleRefused):
            await registry.runtime(card)
        spec = services.settings.home / str(card.artifact_path)
        spec.write_text(json.dumps({**json.loads(spec.read_text()), "meta": refs["meta"]}))
        with pytest.raises(ArtifactCorrupt):
            await registry.runtime(card)
    finally:
        await ctx.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def test_cli_registers_an_ensemble(tmp_path: Path) -> None:
    services, ctx, refs = await _world(tmp_path)
    await ctx.__aexit__(None, None, None)  # type: ignore[attr-defined]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGSERVE_")}
    args = [sys.executable, "-m", "sigserve", "--home", str(tmp_path / "home"), "models", "ensemble", "gated",
            "--regime", refs["regime"], *[a for k in REGIMES for a in ("--specialist", f"{k}={refs[k]}")], "--json"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    card = json.loads(done.stdout)
    assert card["flavor"] == "ensemble" and card["extra"]["ensemble"]["specialists"]["bull"] == refs["bull"]
    bad = subprocess.run([*args[:-4], "--specialist", "bull", "--json"], capture_output=True, text=True, env=env,
                         check=False, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("validation_error:")
    del services
