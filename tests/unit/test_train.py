"""The training pieces: config refusals, the temporal split (no overlap, labels purged at the cuts),
the loud random split, class weights, metrics against scikit-learn/scipy, and each model type."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.demo.market import generate_ohlcv
from sigserve.domain import Task
from sigserve.errors import ValidationError
from sigserve.labels.targets import classify, forward_logret
from sigserve.train.config import MODEL_TYPES, ModelConfig, parse_config
from sigserve.train.metrics import (
    classification_metrics,
    classification_report,
    regression_metrics,
    roc_auc,
    spearman,
)
from sigserve.train.models import class_weights, fit_model
from sigserve.train.split import random_split, temporal_split

BASE: dict[str, Any] = {"name": "m", "data": {"symbols": ["BTCUSDT"], "interval": "1h"},
                        "features": {"indicators": ["RSI"]}}


# --- config --------------------------------------------------------------------------------------
def test_config_defaults_and_hash() -> None:
    config = parse_config(BASE)
    assert config.model.type == "lightgbm" and config.split.method == "temporal"
    assert config.labels.kind == "forward_return" and config.tracking.mlflow
    assert config.registration.promote == "none"
    assert parse_config(BASE).config_hash == config.config_hash
    assert parse_config({**BASE, "labels": {"horizon": 8}}).config_hash != config.config_hash
    assert parse_config({**BASE, "model": {"type": "RandomForest"}}).model.type == "random_forest"


@pytest.mark.parametrize("change, words", [
    ({"model": {"type": "catboost"}}, "supported are lightgbm, xgboost, random_forest"),
    ({"split": {"train": 0.8, "valid": 0.15, "test": 0.15}}, "sum to 1"),
    ({"labels": {"kind": "annotations"}}, "needs labels.annotations"),
    ({"labels": {"kind": "patterns"}}, "needs labels.patterns"),
    ({"labels": {"kind": "patterns", "patterns": "all", "task": "regression"}}, "regression"),
    ({"data": {"symbols": ["X"], "interval": "7x"}}, "interval"),
    ({"data": {"symbols": [], "interval": "1h"}}, "symbols"),
    ({"surprise": 1}, "surprise"),
])
def test_config_refusals_name_the_problem(change: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_config({**BASE, **change})
    assert words in info.value.message


def test_unknown_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        parse_config({**BASE, "model": {"type": "svm"}})
    for name in MODEL_TYPES:
        assert name in info.value.message


# --- split ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stacked() -> dict[str, np.ndarray]:
    """Three symbols that start on different days, so row order and time disagree."""
    parts = []
    for i, symbol in enumerate(("BTCUSDT", "ETHUSDT", "SOLUSDT")):
        m = generate_ohlcv(symbol, "1h", f"2024-01-0{1 + 3 * i}", 2000)
        y = forward_logret(m["close"], 6)
        ends = np.full(2000, np.iinfo(np.int64).max)
        ends[:-6] = m["ts"][6:].astype(np.int64)
        keep = np.isfinite(y)
        parts.append((m["ts"][keep], ends[keep], y[keep]))
    return {"ts": np.concatenate([p[0] for p in parts]), "ends": np.concatenate([p[1] for p in parts]),
            "y": np.concatenate([p[2] for p in parts])}


def test_temporal_split_has_no_overlap_and_purges_labels_at_the_cuts(stacked: dict[str, np.ndarray]) -> None:
    ts, ends = stacked["ts"], stacked["ends"]
    split = temporal_split(ts, ends, 0.7, 0.15, 0.15)
    train, valid, test = split.train, split.valid, split.test
    assert not (train & valid).any() and not (train & test).any() and not (valid & test).any()
    t = ts.astype(np.int64)
    assert t[train].max() < t[valid].min() <= t[valid].max() < t[test].min()
    # no training label reaches the validation part, no validation label the test part
    assert ends[train].max() < t[valid].min()
    assert ends[valid].max() < t[test].min()
    assert split.cut_valid == ts[valid].min() or ts[valid].min() >= split.cut_valid
    # the purge is the only loss: 6 bars per symbol at each cut, at most
    assert 0 < split.purged <= 2 * 3 * 6
    n = ts.shape[0]
    assert abs(int(train.sum()) / n - 0.7) < 0.02 and abs(int(test.sum()) / n - 0.15) < 0.02
    no_valid = temporal_split(ts, ends, 0.8, 0.0, 0.2)
    assert not no_valid.valid.any() and (no_valid.train | no_valid.test).sum() > 0.99 * n - 20


def test_random_split_warns_loudly(stacked: dict[str, np.ndarray]) -> None:
    n = stacked["ts"].shape[0]
    with pytest.warns(UserWarning, match="random"):
        split = random_split(n, 0.7, 0.15, 0.15)
    assert int(split.train.sum() + split.valid.sum() + split.test.sum()) == n
    assert not (split.train & split.test).any()


# --- weights and metrics -------------------------------------------------------------------------
def test_balanced_class_weights() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2], dtype=float)
    w = class_weights(y, 3)
    per_class = [w[y == c].sum() for c in range(3)]
    np.testing.assert_allclose(per_class, [4.0, 4.0, 4.0])  # every class weighs n / k


def test_classification_metrics_match_scikit_learn() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    proba = rng.dirichlet([1, 1, 1], 400)
    proba[np.arange(400), y] += rng.random(400) * 0.6
    classes = ("down", "flat", "up")
    m = classification_metrics(y, proba, classes)
    pred = proba.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred)
    for i, c in enumerate(classes):
        assert m["per_class"][c] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    report = classification_report(m, classes)
    assert "f1_macro" in report and "confusion matrix" in report
    binary = classification_metrics(y[y < 2], proba[y < 2, 1], ("down", "up"))
    assert binary["auc"] == pytest.approx(skm.roc_auc_score(y[y < 2], proba[y < 2, 1]))


def test_regression_metrics() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    y = rng.normal(size=500)
    f = 0.3 * y + rng.normal(size=500)
    f[:10] = f[10]  # ties
    m = regression_metrics(y, f)
    assert m["rmse"] == pytest.approx(float(np.sqrt(np.mean((f - y) ** 2))))
    assert m["ic_spearman"] == pytest.approx(stats.spearmanr(f, y).statistic)
    assert m["hit_rate"] == pytest.approx(float(np.mean(np.sign(f) == np.sign(y))))
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


# --- models --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    m = generate_ohlcv("BTCUSDT", "1h", "2024-01-01", 1500)
    rng = np.random.default_rng(0)
    x = np.column_stack([np.log(m["close"] / np.roll(m["close"], 1)), rng.normal(size=1500),
                         np.log(m["volume"])])[1:]
    y_ret = forward_logret(m["close"], 1)[1:]
    keep = np.isfinite(y_ret)
    x, y_ret = x[keep], y_ret[keep]
    codes3, names3 = classify(y_ret, "threshold", 0.002)
    codes2, names2 = classify(y_ret, "sign")
    return {"x": x, "y3": codes3, "c3": names3, "y2": codes2, "c2": names2, "yr": y_ret,
            "names": ("ret", "noise", "logvol")}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("task", [Task.BINARY, Task.MULTICLASS, Task.REGRESSION])
def test_every_model_type_fits_saves_and_registers_natively(model_type: str, task: Task, data: dict[str, Any],
                                                            tmp_path: Path) -> None:
    if model_type == "xgboost":
        pytest.importorskip("xgboost")
    if model_type == "random_forest":
        pytest.importorskip("sklearn")
    from sigserve.registry.flavors import inspect_model

    x = data["x"]
    y, classes = {Task.BINARY: (data["y2"], data["c2"]), Task.MULTICLASS: (data["y3"], data["c3"]),
                  Task.REGRESSION: (data["yr"], ())}[task]
    config = ModelConfig(type=model_type, params={"n_estimators": 20}, early_stopping_rounds=5)
    fitted = fit_model(config, task, classes, data["names"], x[:1000], y[:1000], x[1000:1200], y[1000:1200],
                       tmp_path)
    out = fitted.predict(x[1200:])
    if task is Task.MULTICLASS:
        assert out.shape == (x.shape[0] - 1200, 3)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    else:
        assert out.shape == (x.shape[0] - 1200,)
    assert fitted.importance.shape == (3,)
    info = inspect_model(fitted.path, trust_pickle=False)
    assert info.flavor in ("lightgbm", "xgboost", "sklearn")


def test_roc_auc_matches_pairwise_counting() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300).astype(float)
    score = np.round(rng.random(300) + 0.3 * y, 1)  # rounded: many ties
    pos, neg = score[y == 1], score[y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    assert roc_auc(y, score) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    assert roc_auc(np.array([0.0, 1.0]), np.array([0.1, 0.9])) == 1.0
    assert np.isnan(roc_auc(np.ones(4), np.arange(4.0)))
