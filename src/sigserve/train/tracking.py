"""Experiment tracking: MLflow (``pip install 'sigserve[train]'``), or nothing.

By default runs go to a local MLflow file store under ``SIGSERVE_HOME/mlruns`` (MLflow 3 keeps
the file store in maintenance mode and asks for ``MLFLOW_ALLOW_FILE_STORE=true``, which this
module sets for ``file:`` URIs only); ``tracking.uri`` points at a server or a database instead.
MLflow's usage telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY``) unless the environment
says otherwise. Everything goes through one ``MlflowClient`` (no global active run).

Usage::

    tracker = open_tracker(config.tracking, settings.home)
    tracker.start("trend", tags={...})
    tracker.log_params({...}); tracker.log_metrics({...}); tracker.log_artifact(path)
    version = tracker.register_model("trend", "model/model.txt")
    tracker.finish("FINISHED")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ValidationError, missing_extra
from .config import TrackingConfig


class NullTracker:
    """Tracking switched off: every call is a no-op."""

    enabled = False
    run_id: str | None = None
    uri: str | None = None

    def start(self, run_name: str, tags: dict[str, str] | None = None) -> None:
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        return None

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        return None

    def register_model(self, name: str, artifact: str) -> str | None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        return None


class MlflowTracker(NullTracker):
    enabled = True

    def __init__(self, uri: str, experiment: str) -> None:
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise missing_extra("mlflow", "train") from exc
        self.uri = uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.run_id: str | None = None
        self.artifact_uri: str | None = None

    def start(self, run_name: str, tags: dict[str, str] | None = None) -> None:
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(self.experiment)
        run = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        self.artifact_uri = run.info.artifact_uri

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self._run(), params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self._run(), metrics=items[i:i + 500])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self._run(), str(path), subdir)

    def register_model(self, name: str, artifact: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")) \
                    and "already exists" not in str(exc):
                raise
        version = self.client.create_model_version(name, f"{self.artifact_uri}/{artifact}", run_id=self._run())
        return str(version.version)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def _run(self) -> str:
        if self.run_id is None:
            raise ValidationError("the MLflow run was not started")
        return self.run_id


def _metric_key(key: str) -> str:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /")
    return "".join(c if c in allowed else "_" for c in key)


def open_tracker(config: TrackingConfig, home: Path) -> NullTracker:
    if not config.mlflow:
        return NullTracker()
    uri = config.uri or (Path(home).resolve() / "mlruns").as_uri()
    return MlflowTracker(uri, config.experiment)
