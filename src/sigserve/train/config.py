"""The pipeline config: one YAML file from raw OHLCV (and optional annotations) to a registered,
served model. See ``examples/pipeline.yaml`` for every key.

.. code-block:: yaml

    name: trend                        # the model's name in sigserve's registry
    data:
      symbols: [BTCUSDT, ETHUSDT]
      interval: 1h
      start: 2023-01-01                # optional window (UTC)
      end: 2024-12-31
      candles: {BTCUSDT: data/btc_1h.csv}   # optional: files imported first (else: the store's)
    features: {indicators: [...], candles: [...], custom: [...]}     # see sigserve.features.spec
    labels:
      kind: forward_return             # forward_return | annotations | patterns | merged
      horizon: 4
      task: classification             # classification | regression (forward_return only)
      classification: sign             # sign | threshold
      threshold: 0.0
      annotations: labels.json         # annotations / merged
      min_confidence: 0.5
      patterns: [CDLENGULFING, CDLHAMMER]   # patterns / merged; or "all"
      merge: human_priority            # merged: human_priority | programmatic_priority | both
      encoding: bio                    # bio (per candle, trainable and served) | windowed
      context: 8                       # bio: candles of context around each span (null: all rows)
      window: 9                        # windowed: candles per example
    split: {train: 0.7, valid: 0.15, test: 0.15, method: temporal}
    model:
      type: lightgbm                   # lightgbm | xgboost | random_forest
      params: {n_estimators: 300, learning_rate: 0.05}
      class_weight: balanced           # balanced | none
      early_stopping_rounds: 30
    tracking:
      mlflow: true
      uri: null                        # default: file store under SIGSERVE_HOME/mlruns
      experiment: sigserve
      register_model: false            # also register in the MLflow model registry
    register:
      promote: production              # none | staging | production
      signal: {id: trend-1h, threshold: 0.55}    # optional: define a signal on the model
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticError

from ..errors import ValidationError
from ..features.spec import load_yaml
from ..timeutil import validate_interval

MODEL_TYPES = ("lightgbm", "xgboost", "random_forest")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    symbols: list[str] = Field(min_length=1)
    interval: str
    start: str | None = None
    end: str | None = None
    candles: dict[str, str] = Field(default_factory=dict)

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        validate_interval(value)
        return value

    @field_validator("start", "end", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return None if value is None else str(value)


class LabelsConfig(_Strict):
    kind: Literal["forward_return", "annotations", "patterns", "merged"] = "forward_return"
    horizon: int = Field(default=4, ge=1)
    task: Literal["classification", "regression"] = "classification"
    classification: Literal["sign", "threshold"] = "sign"
    threshold: float = Field(default=0.0, ge=0.0)
    annotations: str | None = None
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    patterns: list[str] | str | None = None
    merge: Literal["human_priority", "programmatic_priority", "both"] = "human_priority"
    encoding: Literal["bio", "windowed"] = "bio"
    context: int | None = Field(default=None, ge=0)
    window: int = Field(default=9, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> LabelsConfig:
        if self.kind in ("annotations", "merged") and not self.annotations:
            raise ValueError(f"labels.kind {self.kind} needs labels.annotations (a JSON file)")
        if self.kind in ("patterns", "merged") and not self.patterns:
            raise ValueError(f"labels.kind {self.kind} needs labels.patterns (names or 'all')")
        if self.kind != "forward_return" and self.task == "regression":
            raise ValueError("span labels train a classifier: labels.task regression is for forward_return")
        return self


class SplitConfig(_Strict):
    train: float = Field(default=0.7, gt=0.0, lt=1.0)
    valid: float = Field(default=0.15, ge=0.0, lt=1.0)
    test: float = Field(default=0.15, gt=0.0, lt=1.0)
    method: Literal["temporal", "random"] = "temporal"
    seed: int = 7

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        if abs(self.train + self.valid + self.test - 1.0) > 1e-9:
            raise ValueError(f"split ratios must sum to 1 (train {self.train} + valid {self.valid}"
                             f" + test {self.test})")
        return self


class ModelConfig(_Strict):
    type: str = "lightgbm"
    params: dict[str, Any] = Field(default_factory=dict)
    class_weight: Literal["balanced", "none"] = "balanced"
    early_stopping_rounds: int | None = Field(default=30, ge=1)
    seed: int = 7

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        key = value.strip().lower().replace("-", "_")
        key = {"randomforest": "random_forest", "rf": "random_forest", "lgbm": "lightgbm",
               "xgb": "xgboost"}.get(key, key)
        if key not in MODEL_TYPES:
            raise ValueError(f"unknown model type {value!r}: supported are {', '.join(MODEL_TYPES)}")
        return key


class TrackingConfig(_Strict):
    mlflow: bool = True
    uri: str | None = None
    experiment: str = "sigserve"
    register_model: bool = False


class SignalConfig(_Strict):
    id: str
    symbols: list[str] | None = None
    threshold: float = 0.55
    class_actions: dict[str, str] | None = None
    atr_feature: str | None = None


class RegisterConfig(_Strict):
    enabled: bool = True
    promote: Literal["none", "staging", "production"] = "none"
    signal: SignalConfig | None = None


class PipelineConfig(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1)
    data: DataConfig
    features: dict[str, Any]
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registration: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")

    # set by load_config: where relative paths start, and the file's own text
    base_dir: Path = Field(default=Path("."), exclude=True)
    source_text: str = Field(default="", exclude=True)

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def config_hash(self) -> str:
        """sha256 of the config's content (every key, in a canonical form)."""
        canonical = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_config(data: Any, *, base_dir: Path = Path("."), source_text: str = "") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ValidationError("the pipeline config must be a mapping (name, data, features, labels, ...)")
    try:
        return PipelineConfig(**data, base_dir=base_dir, source_text=source_text)
    except PydanticError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ValidationError("invalid pipeline config: " + "; ".join(problems),
                              details={"problems": problems}) from exc


def load_config(path: Path) -> PipelineConfig:
    path = Path(path)
    data = load_yaml(path)
    return parse_config(data, base_dir=path.resolve().parent, source_text=path.read_text())
