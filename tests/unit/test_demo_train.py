"""The demo model: temporal split on a common ts cut-off, purged labels, a loadable model."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from sigserve.demo.market import generate_ohlcv
from sigserve.demo.train import DemoTrainResult, roc_auc, train_demo_model
from sigserve.errors import ValidationError
from sigserve.features.compute import FEATURE_NAMES, WARMUP_BARS, compute_features

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
BARS = 3000
HOUR = np.timedelta64(1, "h")


@pytest.fixture(scope="module")
def dataset() -> dict[str, np.ndarray]:
    parts = []
    for i, symbol in enumerate(SYMBOLS):
        # Symbols start at different times, so row position and time disagree on purpose.
        data = generate_ohlcv(symbol, "1h", start=f"2023-01-0{1 + 2 * i}", bars=BARS)
        values, _ = compute_features(data)
        parts.append((values, data["close"], data["ts"], np.full(BARS, i)))
    return {
        "features": np.concatenate([p[0] for p in parts]),
        "close": np.concatenate([p[1] for p in parts]),
        "ts": np.concatenate([p[2] for p in parts]),
        "group": np.concatenate([p[3] for p in parts]),
    }


@pytest.fixture(scope="module")
def trained(dataset: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
            ) -> DemoTrainResult:
    out = tmp_path_factory.mktemp("model") / "nested" / "demo.txt"
    return train_demo_model(dataset["features"], FEATURE_NAMES, dataset["close"], dataset["ts"],
                            out, horizon=4, n_trees=40)


def test_split_is_temporal_ordered_and_purged(trained: DemoTrainResult,
                                              dataset: dict[str, np.ndarray]) -> None:
    r = trained
    assert r.train_start <= r.train_end < r.valid_end < r.test_start <= r.test_end
    # The last training label (train_end + horizon) ends before validation; same for validation.
    assert r.train_end + 4 * HOUR < r.valid_end
    assert r.valid_end + 4 * HOUR < r.test_start
    m = r.metrics
    usable = int(np.isfinite(dataset["features"]).all(axis=1).sum()) - 4 * len(SYMBOLS)
    assert m["n_train"] + m["n_valid"] + m["n_test"] + m["n_purged"] == usable
    assert m["n_train"] > m["n_valid"] > 0 and m["n_test"] > 0
    # The cut-offs are timestamps shared by every symbol: each one has test rows.
    ts, group = dataset["ts"], dataset["group"]
    for g in range(len(SYMBOLS)):
        assert np.any((group == g) & (ts >= r.test_start))
        assert np.any((group == g) & (ts <= r.train_end))
    # Roughly 70/15/15 of the rows.
    total = m["n_train"] + m["n_valid"] + m["n_test"]
    assert 0.6 < m["n_train"] / total < 0.8
    assert 0.1 < m["n_test"] / total < 0.2


def test_metrics(trained: DemoTrainResult) -> None:
    m = trained.metrics
    for key in ("auc", "accuracy", "n_train", "n_valid", "n_test", "horizon"):
        assert key in m
    assert 0.0 <= m["auc"] <= 1.0
    assert 0.0 <= m["accuracy"] <= 1.0
    assert m["horizon"] == 4
    assert trained.classes == ("down", "up")
    assert trained.feature_names == FEATURE_NAMES


def test_model_file_loads_with_its_feature_names(trained: DemoTrainResult,
                                                 dataset: dict[str, np.ndarray]) -> None:
    import lightgbm as lgb

    assert trained.model_path.is_file()
    booster = lgb.Booster(model_file=str(trained.model_path))
    assert tuple(booster.feature_name()) == FEATURE_NAMES
    assert booster.num_trees() == trained.best_iteration >= 1
    p = booster.predict(dataset["features"][WARMUP_BARS:WARMUP_BARS + 100])
    assert p.shape == (100,)
    assert np.all((p >= 0) & (p <= 1))


def test_training_is_deterministic(dataset: dict[str, np.ndarray], trained: DemoTrainResult,
                                   tmp_path: Path) -> None:
    again = train_demo_model(dataset["features"], FEATURE_NAMES, dataset["close"], dataset["ts"],
                             tmp_path / "again.txt", horizon=4, n_trees=40)
    assert again.model_path.read_text() == trained.model_path.read_text()
    assert again.metrics == trained.metrics


def test_labels_do_not_cross_symbols(dataset: dict[str, np.ndarray], tmp_path: Path) -> None:
    def rows_used(result: DemoTrainResult) -> int:
        m = result.metrics
        return int(m["n_train"] + m["n_valid"] + m["n_test"] + m["n_purged"])

    # Overlapping symbols: ts goes back at each new symbol, which ends the previous one's labels.
    with_groups = train_demo_model(dataset["features"], FEATURE_NAMES, dataset["close"],
                                   dataset["ts"], tmp_path / "g.txt", horizon=4, n_trees=5,
                                   groups=dataset["group"])
    plain = train_demo_model(dataset["features"], FEATURE_NAMES, dataset["close"], dataset["ts"],
                             tmp_path / "p.txt", horizon=4, n_trees=5)
    assert with_groups.metrics == plain.metrics
    # Back-to-back symbols (B starts after A ends): only ``groups`` can tell them apart.
    parts = []
    for symbol, start in (("A", "2023-01-01"), ("B", "2023-06-01")):
        data = generate_ohlcv(symbol, start=start, bars=1500)
        parts.append((compute_features(data)[0], data["close"], data["ts"]))
    x, c, ts = (np.concatenate([p[k] for p in parts]) for k in range(3))
    group = np.repeat([0, 1], 1500)
    finite = int(np.isfinite(x).all(axis=1).sum())
    joined = train_demo_model(x, FEATURE_NAMES, c, ts, tmp_path / "j.txt", n_trees=5)
    split = train_demo_model(x, FEATURE_NAMES, c, ts, tmp_path / "s.txt", n_trees=5, groups=group)
    assert rows_used(joined) == finite - 4
    assert rows_used(split) == finite - 8


def test_bad_inputs_are_validation_errors(dataset: dict[str, np.ndarray], tmp_path: Path) -> None:
    x, c, ts = dataset["features"], dataset["close"], dataset["ts"]
    with pytest.raises(ValidationError):
        train_demo_model(x[:, :5], FEATURE_NAMES, c, ts, tmp_path / "a.txt")
    with pytest.raises(ValidationError):
        train_demo_model(x, FEATURE_NAMES, c[:-1], ts, tmp_path / "a.txt")
    with pytest.raises(ValidationError):
        train_demo_model(x, FEATURE_NAMES, c, ts, tmp_path / "a.txt", valid_fraction=0.6,
                         test_fraction=0.5)
    with pytest.raises(ValidationError):
        train_demo_model(x[:30], FEATURE_NAMES, c[:30], ts[:30], tmp_path / "a.txt")
    assert not (tmp_path / "a.txt").exists()


def test_roc_auc_matches_pairwise_counting() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300).astype(float)
    score = np.round(rng.random(300) + 0.3 * y, 1)  # rounded: many ties
    pos, neg = score[y == 1], score[y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    assert roc_auc(y, score) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    assert roc_auc(np.array([0.0, 1.0]), np.array([0.1, 0.9])) == 1.0
    assert np.isnan(roc_auc(np.ones(4), np.arange(4.0)))
