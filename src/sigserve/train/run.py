"""``sigserve train``: one config file from raw OHLCV (and optional annotations) to a registered,
served model, in three stages.

1. **features**: candle files named in the config are imported; the spec's features are computed
   over each symbol's stored candles and upserted under the spec's ``feature_key`` (the rows the
   served model reads), and the feature names are registered.
2. **labels**: the labelled dataset (features from the same spec code, labels from the config),
   saved as ``dataset.parquet`` with ``dataset_stats.json`` in the run directory.
3. **train**: split (temporal by default), fit with class weights, evaluate on the test part,
   write the plots, the classification report, the metrics and the config; track everything in
   MLflow; register the model with its card (spec hash and feature_key, training window, metrics
   per class, reference distribution per feature), promote it and define its signal when asked.

``--stage features`` or ``--stage labels`` stops after that stage. Every run is a row of
``training_runs`` (running -> completed or failed), and its files live in
``SIGSERVE_HOME/runs/<run_id>/``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..domain import SERVABLE_STAGES, ModelCard, Policy, SignalDefinition, Stage, Task, TrainingRun
from ..errors import SigserveError, ValidationError
from ..features.spec import FeatureSpec
from ..timeutil import format_ts
from .config import PipelineConfig
from .dataset import Dataset, build_dataset
from .metrics import classification_metrics, classification_report, flat_metrics, regression_metrics
from .split import RANDOM_SPLIT_WARNING, Split, random_split, temporal_split

log = logging.getLogger("sigserve.train")

STAGES = ("features", "labels", "train")
_BUY = {"bull", "bullish", "buy", "long", "up"}
_SELL = {"bear", "bearish", "sell", "short", "down"}


def class_actions_for(classes: tuple[str, ...]) -> dict[str, str]:
    """An action per class from the words in its name (BIO prefixes stripped): bullish -> buy,
    bearish -> sell, anything else (``O`` included) -> hold."""
    out = {}
    for c in classes:
        words = set(c[2:].lower().split("_") if c.startswith(("B-", "I-")) else c.lower().split("_"))
        out[c] = "buy" if words & _BUY else "sell" if words & _SELL else "hold"
    return out


def reference_distribution(x: np.ndarray, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per feature on the training rows: mean, std, min, max and the deciles (for drift)."""
    out: dict[str, dict[str, Any]] = {}
    if x.shape[0] == 0:
        return out
    deciles = np.quantile(x, np.linspace(0.0, 1.0, 11), axis=0)
    for j, name in enumerate(names):
        column = x[:, j]
        out[name] = {"mean": float(column.mean()), "std": float(column.std()),
                     "min": float(column.min()), "max": float(column.max()),
                     "deciles": [float(v) for v in deciles[:, j]]}
    return out


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    TextColumn("{task.fields[note]}"), console=console, transient=False)


async def run_pipeline(services: Any, config: PipelineConfig, *, stage: str = "train",
                       console: Console | None = None, now: np.datetime64 | None = None,
                       run_id: str | None = None) -> dict[str, Any]:
    """Run the pipeline up to ``stage``; returns the run's summary (also the CLI's ``--json``)."""
    if stage not in STAGES:
        raise ValidationError(f"unknown stage {stage!r}: use one of {list(STAGES)}", details={"stage": stage})
    console = console or Console(quiet=True)
    store, settings = services.store, services.settings
    spec = FeatureSpec.from_dict(config.features)
    run_id = run_id or uuid.uuid4().hex
    run_dir = Path(settings.home) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.yaml").write_text(config.source_text or json.dumps(
        config.model_dump(mode="json"), indent=2))
    record = TrainingRun(run_id, config.model.type, config.tracking.experiment, config.config_hash, "",
                         details={"name": config.name, "stage": stage, "feature_key": spec.feature_key,
                                  "spec_hash": spec.spec_hash, "run_dir": str(run_dir)})
    record = await store.save_training_run(record)
    summary: dict[str, Any] = {"run_id": run_id, "stage": stage, "run_dir": str(run_dir),
                               "feature_key": spec.feature_key, "spec_hash": spec.spec_hash,
                               "config_hash": config.config_hash, "timings": {}}
    tracker: Any = None
    try:
        with _progress(console) as progress:
            await _features_stage(services, config, spec, progress, summary, now)
            if stage != "features":
                dataset = await _labels_stage(store, config, spec, progress, summary, run_dir, now)
                record = await store.save_training_run(replace(record, dataset_version=dataset.version))
                if stage == "train":
                    tracker = await _train_stage(services, config, spec, dataset, progress, summary,
                                                 run_dir, record, console)
        record = await store.save_training_run(replace(
            record, status="completed", metrics=summary.get("metrics", {}),
            details={**record.details, **{k: summary[k] for k in ("model", "mlflow_run_id")
                                           if summary.get(k) is not None}}))
        summary["status"] = record.status
        return summary
    except BaseException as exc:
        error = f"{exc.code}: {exc.message}" if isinstance(exc, SigserveError) else f"{type(exc).__name__}: {exc}"
        await store.save_training_run(replace(record, status="failed",
                                              details={**record.details, "error": error[:2000]}))
        if tracker is not None:
            tracker.finish("FAILED")
        raise


async def _features_stage(services: Any, config: PipelineConfig, spec: FeatureSpec, progress: Progress,
                          summary: dict[str, Any], now: np.datetime64 | None) -> None:
    from ..features.io import read_candle_file
    from ..features.pipeline import compute_and_store
    from .dataset import _bounds

    began = time.perf_counter()
    store = services.store
    interval = config.data.interval
    task = progress.add_task("features", total=len(config.data.symbols), note=spec.feature_key)
    start, end = _bounds(config)
    reports = []
    for symbol in config.data.symbols:
        if symbol in config.data.candles:
            candles = read_candle_file(config.path(config.data.candles[symbol]), symbol)
            await store.write_candles(symbol, interval, candles)
        reports.append(await compute_and_store(store, spec, symbol, interval, start=start, end=end,
                                               home=services.settings.home, now=now))
        progress.update(task, advance=1, note=f"{symbol}: {reports[-1]['rows_written']} rows")
    summary["features"] = {"feature_key": spec.feature_key, "names": list(spec.names),
                           "warmup": spec.warmup, "window": spec.window,
                           "rows_written": sum(r["rows_written"] for r in reports),
                           "warmup_rows_dropped": sum(r["warmup_rows_dropped"] for r in reports)}
    summary["timings"]["features"] = time.perf_counter() - began


async def _labels_stage(store: Any, config: PipelineConfig, spec: FeatureSpec, progress: Progress,
                        summary: dict[str, Any], run_dir: Path, now: np.datetime64 | None) -> Dataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    began = time.perf_counter()
    task = progress.add_task("labels", total=2, note=config.labels.kind)
    dataset = await build_dataset(store, config, spec, now=now)
    progress.update(task, advance=1, note=f"{len(dataset)} rows")
    columns: dict[str, Any] = {
        "symbol": pa.array(np.asarray(dataset.symbols, dtype=object)[dataset.group].tolist(), pa.string()),
        "ts": pa.array(dataset.ts), "label": pa.array(dataset.row_labels().tolist(), pa.string()),
        "y": dataset.y}
    columns.update({name: dataset.x[:, j] for j, name in enumerate(dataset.names)})
    pq.write_table(pa.table(columns), run_dir / "dataset.parquet")
    stats = {**dataset.stats, "dataset_version": dataset.version}
    (run_dir / "dataset_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True, default=str))
    log.info("labels: %s", json.dumps({k: stats[k] for k in ("rows", "counts") if k in stats}))
    progress.update(task, advance=1, note=f"{len(dataset)} rows, {len(dataset.classes) or 'regression'}"
                    + (" classes" if dataset.classes else ""))
    summary["dataset"] = {"rows": len(dataset), "version": dataset.version, "classes": list(dataset.classes),
                          "task": str(dataset.task), "target": dataset.target, "stats": dataset.stats}
    summary["timings"]["labels"] = time.perf_counter() - began
    return dataset


def _split(config: PipelineConfig, dataset: Dataset, console: Console) -> Split:
    s = config.split
    if s.method == "random":
        console.print(f"[bold red]WARNING: {RANDOM_SPLIT_WARNING}[/]")
        return random_split(len(dataset), s.train, s.valid, s.test, s.seed)
    return temporal_split(dataset.ts, dataset.label_end, s.train, s.valid, s.test)


def _counts(y: np.ndarray, classes: tuple[str, ...]) -> dict[str, int]:
    codes = y.astype(np.int64)
    return {c: int((codes == i).sum()) for i, c in enumerate(classes)}


async def _train_stage(services: Any, config: PipelineConfig, spec: FeatureSpec, dataset: Dataset,
                       progress: Progress, summary: dict[str, Any], run_dir: Path, record: TrainingRun,
                       console: Console) -> Any:
    from .models import fit_model
    from .plots import confusion_matrix_png, importance_png
    from .tracking import open_tracker

    began = time.perf_counter()
    task = progress.add_task("train", total=5, note="split")
    split = _split(config, dataset, console)
    x, y = dataset.x, dataset.y
    classes = dataset.classes
    progress.update(task, advance=1, note=f"fit {config.model.type}")
    fitted = fit_model(config.model, dataset.task, classes, dataset.names, x[split.train], y[split.train],
                       x[split.valid], y[split.valid], run_dir)
    progress.update(task, advance=1, note="evaluate")

    output = fitted.predict(x[split.test])
    artifacts: list[Path] = [run_dir / "pipeline.yaml", run_dir / "dataset_stats.json"]
    if dataset.task is Task.REGRESSION:
        test_metrics = regression_metrics(y[split.test], output)
    else:
        test_metrics = classification_metrics(y[split.test], output, classes)
        (run_dir / "classification_report.txt").write_text(classification_report(test_metrics, classes))
        artifacts.append(run_dir / "classification_report.txt")
        artifacts.append(confusion_matrix_png(test_metrics["confusion_matrix"], classes,
                                              run_dir / "confusion_matrix.png"))
    artifacts.append(importance_png(dataset.names, fitted.importance, run_dir / "feature_importance.png"))
    sizes = {"n_train": int(split.train.sum()), "n_valid": int(split.valid.sum()),
             "n_test": int(split.test.sum()), "n_purged": split.purged}
    counts = {part: _counts(y[mask], classes) for part, mask in
              (("train", split.train), ("valid", split.valid), ("test", split.test))} if classes else {}
    t = dataset.ts

    def span(mask: np.ndarray) -> dict[str, str | None]:
        return {"start": format_ts(t[mask].min()) if mask.any() else None,
                "end": format_ts(t[mask].max()) if mask.any() else None}

    window = {"split": split.method, "train": span(split.train), "valid": span(split.valid),
              "test": span(split.test)}
    metrics_doc = {"test": test_metrics, "sizes": sizes, "class_counts": counts, "window": window,
                   "best_iteration": fitted.best_iteration}
    (run_dir / "metrics.json").write_text(json.dumps(metrics_doc, indent=2, sort_keys=True, default=str))
    artifacts.append(run_dir / "metrics.json")
    flat = {**flat_metrics({k: v for k, v in test_metrics.items() if k != "confusion_matrix"}), **sizes}
    summary["metrics"] = flat
    summary["test_metrics"] = test_metrics
    summary["class_counts"] = counts
    summary["window"] = window
    progress.update(task, advance=1, note="track")

    tracker = open_tracker(config.tracking, services.settings.home)
    tracker.start(f"{config.name}-{record.run_id[:8]}", tags={
        "sigserve.run_id": record.run_id, "sigserve.feature_key": spec.feature_key,
        "sigserve.dataset_version": dataset.version, "sigserve.config_hash": config.config_hash})
    tracker.log_params({
        "model_type": config.model.type, **{f"model.{k}": v for k, v in fitted.params.items()},
        "class_weight": config.model.class_weight, "labels.kind": config.labels.kind,
        "labels.target": dataset.target, "labels.horizon": config.labels.horizon,
        "split.method": split.method, "split.ratios": f"{config.split.train}/{config.split.valid}/{config.split.test}",
        "symbols": ",".join(dataset.symbols), "interval": config.data.interval,
        "n_features": len(dataset.names), "feature_key": spec.feature_key, "spec_hash": spec.spec_hash,
        "dataset_version": dataset.version, "config_hash": config.config_hash})
    count_metrics = {f"count_{part}_{c}": float(n) for part, per in counts.items() for c, n in per.items()}
    tracker.log_metrics({**flat, **count_metrics})
    for path in artifacts:
        tracker.log_artifact(path)
    tracker.log_artifact(fitted.path, "model")
    summary["mlflow_run_id"] = tracker.run_id
    summary["mlflow_uri"] = tracker.uri
    progress.update(task, advance=1, note="register")

    if config.registration.enabled and dataset.servable:
        card = await _register(services, config, spec, dataset, fitted, split, test_metrics, flat, counts,
                               window, record, tracker)
        summary["model"] = card.ref
        summary["model_stage"] = str(card.stage)
        if config.tracking.register_model and tracker.enabled:
            summary["mlflow_model_version"] = tracker.register_model(config.name, f"model/{fitted.path.name}")
        if config.registration.signal is not None:
            summary["signal_id"] = await _signal(services, config, spec, card)
    elif not dataset.servable:
        summary["model"] = None
        summary["note"] = ("windowed examples look ahead of their centre candle: the model is tracked"
                           " but not registered for serving")
    progress.update(task, advance=1, note=summary.get("model") or "done")
    tracker.finish("FINISHED")
    summary["model_path"] = str(fitted.path)
    summary["timings"]["train"] = time.perf_counter() - began
    return tracker


async def _register(services: Any, config: PipelineConfig, spec: FeatureSpec, dataset: Dataset,
                    fitted: Any, split: Split, test_metrics: dict[str, Any], flat: dict[str, float],
                    counts: dict[str, Any], window: dict[str, Any], record: TrainingRun,
                    tracker: Any) -> ModelCard:
    from ..registry.artifacts import sha256_file

    registry = services.registry
    sha = sha256_file(fitted.path)
    card: ModelCard | None = None
    for existing in await services.store.list_models(config.name):
        if existing.sha256 == sha and existing.stage in SERVABLE_STAGES:
            card = existing  # the same bytes (deterministic training on the same data): same version
            break
    if card is None:
        extra = {
            "feature_spec": spec.to_dict(), "feature_spec_hash": spec.spec_hash,
            "feature_key": spec.feature_key, "training_window": window,
            "class_metrics": test_metrics.get("per_class"), "class_counts": counts,
            "reference_distribution": reference_distribution(dataset.x[split.train], dataset.names),
            "train_run_id": record.run_id, "config_hash": config.config_hash,
            "dataset_version": dataset.version, "target": dataset.target,
            "labels": config.labels.model_dump(mode="json"), "interval": config.data.interval,
            "symbols": list(dataset.symbols), "mlflow_run_id": tracker.run_id, "mlflow_uri": tracker.uri,
        }
        card = await registry.register(
            fitted.path, name=config.name, features=list(dataset.names), classes=list(dataset.classes) or None,
            task=str(dataset.task), metrics=flat, trust_pickle=fitted.trust_pickle, extra=extra)
    promote = config.registration.promote
    if promote != "none" and card.stage != Stage(promote):
        card = await registry.promote(card.name, card.version, Stage(promote), actor="train")
    return card


async def _signal(services: Any, config: PipelineConfig, spec: FeatureSpec, card: ModelCard) -> str:
    wanted = config.registration.signal
    assert wanted is not None
    store = services.store
    if await store.get_signal(wanted.id) is not None:
        return wanted.id
    promote = config.registration.promote
    ref = f"@{promote}" if promote != "none" else str(card.version)
    actions = wanted.class_actions
    if actions is None and card.task is Task.MULTICLASS and not {"down", "up"} <= set(card.classes):
        actions = class_actions_for(card.classes)
    atr = wanted.atr_feature or next((n for n in spec.names if n.startswith("atr")), None)
    policy = Policy(threshold=wanted.threshold, class_actions=actions or {}, atr_feature=atr)
    await store.create_signal(SignalDefinition(wanted.id, card.name, ref, config.data.interval,
                                               tuple(wanted.symbols or config.data.symbols), policy))
    return wanted.id
