"""``sigserve train`` end to end on real-shaped candles: features in the store under the spec's key,
the labelled dataset, the temporal split, LightGBM with class weights, metrics, plots, MLflow
tracking (file store) and its model registry, the registered card, the training_runs row, the
signal it defines, and a backfill of that signal through the engine. Span labels (annotations
merged with candlestick patterns, BIO) train and register a multiclass model. A failing run is
recorded as failed, and each stage stops where asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.backfill import BackfillRequest, run_backfill
from sigserve.config import Settings
from sigserve.demo.market import generate_ohlcv, write_csv
from sigserve.domain import Stage, Task
from sigserve.errors import ValidationError
from sigserve.features.spec import FeatureSpec
from sigserve.stores.base import Candles
from sigserve.train.config import parse_config
from sigserve.train.run import class_actions_for, run_pipeline

pytestmark = pytest.mark.e2e
pytest.importorskip("talib")
pytest.importorskip("mlflow")

SYMBOLS = ("BTCUSDT", "ETHUSDT")
BARS = 1500
FEATURES = {"indicators": [{"name": "RSI", "timeperiod": 14}, {"name": "ATR", "timeperiod": 14},
                           {"name": "EMA", "timeperiod": 20}, "MACD", {"name": "ROC", "timeperiod": 4}],
            "candles": ["body_size", "body_direction", "upper_wick", "lower_wick", "range", "gap"]}


def pipeline(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "trend", "data": {"symbols": list(SYMBOLS), "interval": "1h"}, "features": FEATURES,
        "labels": {"kind": "forward_return", "horizon": 4, "classification": "sign"},
        "model": {"type": "lightgbm", "params": {"n_estimators": 60}},
        "tracking": {"experiment": "test", "register_model": True},
        "register": {"promote": "production", "signal": {"id": "trend-1h", "threshold": 0.52}},
    }
    config.update(changes)
    return config


async def _candles(services: Services) -> dict[str, dict[str, np.ndarray]]:
    markets = {}
    for symbol in SYMBOLS:
        m = generate_ohlcv(symbol, "1h", "2024-01-01", BARS)
        await services.store.write_candles(symbol, "1h", Candles(m["ts"], m["open"], m["high"], m["low"],
                                                                  m["close"], m["volume"]))
        markets[symbol] = m
    return markets


async def test_train_registers_tracks_and_serves(services: Services) -> None:
    markets = await _candles(services)
    config = parse_config(pipeline())
    summary = await run_pipeline(services, config)
    spec = FeatureSpec.from_dict(FEATURES)
    assert summary["status"] == "completed" and summary["model"] == "trend:1"
    assert summary["feature_key"] == spec.feature_key
    assert summary["features"]["rows_written"] == 2 * (BARS - spec.warmup)
    assert summary["dataset"]["rows"] == 2 * (BARS - spec.warmup - 4)
    assert summary["dataset"]["classes"] == ["down", "up"]

    # files of the run
    run_dir = Path(summary["run_dir"])
    for name in ("model.txt", "pipeline.yaml", "metrics.json", "classification_report.txt",
                 "confusion_matrix.png", "feature_importance.png", "dataset.parquet", "dataset_stats.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "f1_macro", "f1_weighted", "per_class", "confusion_matrix", "auc"}
    assert set(metrics["class_counts"]["train"]) == {"down", "up"}

    # the card: spec hash and key, window, per-class metrics, reference distribution
    card = await services.registry.get("trend", 1)
    assert card.stage is Stage.PRODUCTION and card.task is Task.BINARY and card.classes == ("down", "up")
    assert card.feature_names == spec.names
    assert card.extra["feature_spec_hash"] == spec.spec_hash and card.extra["feature_key"] == spec.feature_key
    assert FeatureSpec.from_card(card.extra["feature_spec"]).names == spec.names
    window = card.extra["training_window"]
    assert window["split"] == "temporal" and window["train"]["end"] < window["valid"]["start"] < window["test"]["start"]
    assert set(card.extra["class_metrics"]) == {"down", "up"}
    assert set(card.extra["reference_distribution"]) == set(spec.names)
    assert len(card.extra["reference_distribution"]["rsi_14"]["deciles"]) == 11
    assert 0.0 <= card.metrics["accuracy"] <= 1.0 and card.metrics["n_test"] > 0

    # the training_runs row
    run = await services.store.get_training_run(summary["run_id"])
    assert run is not None and run.status == "completed" and run.completed_at
    assert run.model_type == "lightgbm" and run.experiment == "test"
    assert run.config_hash == config.config_hash and run.dataset_version == summary["dataset"]["version"]
    assert run.metrics["accuracy"] == card.metrics["accuracy"] and run.details["model"] == "trend:1"

    # MLflow: params, per-class counts, metrics, artifacts, and the model registry
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    tracked = client.get_run(summary["mlflow_run_id"])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["feature_key"] == spec.feature_key
    assert tracked.data.params["model_type"] == "lightgbm"
    assert tracked.data.metrics["count_train_up"] > 0 and "f1_macro" in tracked.data.metrics
    listed = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"confusion_matrix.png", "feature_importance.png", "classification_report.txt", "pipeline.yaml",
            "model"} <= listed
    assert summary["mlflow_model_version"] == "1"

    # served: the signal it defined backfills from the spec's rows
    assert summary["signal_id"] == "trend-1h"
    m = markets["BTCUSDT"]
    report = await run_backfill(services.engine, BackfillRequest("trend-1h", "BTCUSDT", "1h", "window",
                                                                 m["ts"][0], m["ts"][-1]),
                                max_rows=100_000, chunk_rows=500)
    assert report.rows_written == BARS - spec.warmup

    # the same config again: the same bytes reuse version 1, a second run row
    again = await run_pipeline(services, config)
    assert again["model"] == "trend:1" and again["dataset"]["version"] == summary["dataset"]["version"]
    assert len(await services.store.list_training_runs("test")) == 2


async def test_span_labels_train_a_multiclass_tagger(services: Services, tmp_path: Path) -> None:
    markets = await _candles(services)
    ts = markets["BTCUSDT"]["ts"]
    spans = [{"symbol": "BTCUSDT", "interval": "1h", "start": str(ts[i]) + "Z", "end": str(ts[i + 4]) + "Z",
              "label": "bullish_run" if i % 2 else "bearish_run", "confidence": 0.9} for i in range(100, 1400, 37)]
    spans.append({**spans[0], "confidence": 0.1})
    annotations = tmp_path / "labels.json"
    annotations.write_text(json.dumps(spans))
    config = parse_config({**pipeline(name="tagger"), "labels": {
        "kind": "merged", "annotations": str(annotations), "min_confidence": 0.5,
        "patterns": ["CDLENGULFING"], "merge": "human_priority", "encoding": "bio", "context": 10},
        "register": {"promote": "staging", "signal": {"id": "tagger-1h", "threshold": 0.3}},
        "tracking": {"experiment": "spans"}, "data": {"symbols": ["BTCUSDT"], "interval": "1h"}})
    summary = await run_pipeline(services, config)
    stats = summary["dataset"]["stats"]
    assert stats["human_spans"] == len(spans) - 1 and stats["human_spans_below_min_confidence"] == 1
    assert stats["programmatic_spans"] > 0 and stats["mean_span_length"] is not None
    assert "agreement_rate" in stats and set(stats["counts"]) >= {"O", "B-bullish_run", "I-bearish_run"}
    card = await services.registry.get("tagger", 1)
    assert card.task is Task.MULTICLASS and card.classes[0] == "O" and card.stage is Stage.STAGING
    definition = await services.store.get_signal("tagger-1h")
    assert definition is not None and definition.model_ref == "@staging"
    assert definition.policy.class_actions["I-bullish_run"] == "buy"
    assert definition.policy.class_actions["B-bearish_engulfing"] == "sell"
    assert definition.policy.class_actions["O"] == "hold"
    assert class_actions_for(("O", "B-top")) == {"O": "hold", "B-top": "hold"}


async def test_windowed_examples_are_tracked_not_registered(services: Services, tmp_path: Path) -> None:
    markets = await _candles(services)
    ts = markets["BTCUSDT"]["ts"]
    spans = [{"symbol": "BTCUSDT", "interval": "1h", "start": str(ts[i]) + "Z", "end": str(ts[i + 2]) + "Z",
              "label": ("top", "bottom", "none")[i % 3]} for i in range(60, 1450, 7)]
    (tmp_path / "w.json").write_text(json.dumps(spans))
    config = parse_config({**pipeline(name="windowed"), "register": {"promote": "none"},
                           "labels": {"kind": "annotations", "annotations": str(tmp_path / "w.json"),
                                      "encoding": "windowed", "window": 5},
                           "data": {"symbols": ["BTCUSDT"], "interval": "1h"},
                           "tracking": {"mlflow": False}})
    summary = await run_pipeline(services, config)
    assert summary["model"] is None and "not registered" in summary["note"]
    assert summary["dataset"]["rows"] == len(spans)
    assert await services.store.list_models("windowed") == []


async def test_stages_stop_where_asked_and_failures_are_recorded(services: Services) -> None:
    await _candles(services)
    config = parse_config(pipeline(name="staged", tracking={"mlflow": False}))
    features = await run_pipeline(services, config, stage="features")
    assert "dataset" not in features and features["features"]["rows_written"] > 0
    labels = await run_pipeline(services, config, stage="labels")
    assert labels["dataset"]["rows"] > 0 and "model" not in labels
    assert await services.store.list_models("staged") == []
    runs = await services.store.list_training_runs()
    assert [r.status for r in runs] == ["completed", "completed"]
    assert runs[1].dataset_version == labels["dataset"]["version"] and runs[0].dataset_version == ""

    bad = parse_config(pipeline(name="late", data={"symbols": ["NOPE"], "interval": "1h"},
                                tracking={"mlflow": False}))
    with pytest.raises(ValidationError):
        await run_pipeline(services, bad)
    failed = (await services.store.list_training_runs())[-1]
    assert failed.status == "failed" and "validation_error" in failed.details["error"]


def test_cli_train_with_candle_files(tmp_path: Path) -> None:
    """``sigserve train --config`` imports the candle files it names and prints its summary."""
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "BTCUSDT_1h.csv", generate_ohlcv("BTCUSDT", "1h", "2024-01-01", 900))
    config = pipeline(name="cli-trend", data={"symbols": ["BTCUSDT"], "interval": "1h",
                                              "candles": {"BTCUSDT": "data/BTCUSDT_1h.csv"}},
                      register={"promote": "production"})
    import yaml

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "sigserve", "--home", str(home), "train", "--config",
                           str(tmp_path / "pipeline.yaml"), "--json"], capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["model"] == "cli-trend:1" and summary["status"] == "completed"
    bad = subprocess.run([sys.executable, "-m", "sigserve", "--home", str(home), "train", "--config",
                          str(tmp_path / "pipeline.yaml"), "--stage", "everything"], capture_output=True,
                         text=True, timeout=120, check=False, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("validation_error: unknown stage")
    settings = Settings(home=home)
    assert settings.home.is_dir()


def test_cli_features_compute_is_idempotent(tmp_path: Path) -> None:
    """``sigserve features compute --spec`` writes the spec's rows under its feature_key; a rerun
    writes the same rows again (upserts), and a bad spec is one validation_error line."""
    import yaml

    market = generate_ohlcv("BTCUSDT", "1h", "2024-01-01", 400)
    write_csv(tmp_path / "btc.csv", market)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"name": "x", "features": FEATURES}))
    home = tmp_path / "home"
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sigserve", "--home", str(home), *args],
                              capture_output=True, text=True, timeout=120, check=False, env=env)

    imported = run("candles", "import", str(tmp_path / "btc.csv"), "--symbol", "BTCUSDT", "--interval", "1h")
    assert imported.returncode == 0, imported.stderr
    spec = FeatureSpec.from_dict(FEATURES)
    for _ in range(2):
        proc = run("features", "compute", "--spec", str(tmp_path / "pipeline.yaml"), "--symbol", "BTCUSDT",
                   "--interval", "1h", "--chunk-rows", "100", "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["feature_key"] == spec.feature_key and report["rows_written"] == 400 - spec.warmup
        assert report["warmup_rows_dropped"] == spec.warmup and report["chunks"] == 4
    check = run("features", "check", "--interval", "1h", "--json")
    assert json.loads(check.stdout)["bars_missing_features"] == spec.warmup
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"features": {"indicators": ["OBV"]}}))
    bad = run("features", "compute", "--spec", str(tmp_path / "bad.yaml"), "--symbol", "BTCUSDT", "--interval", "1h")
    assert bad.returncode == 2 and bad.stderr.startswith("validation_error: OBV depends on the whole history")
