"""Request bodies (validated) and response shapes (documented in OpenAPI, not re-validated).

Requests refuse unknown fields, so a typo such as ``interval`` for ``interval_name`` is a
``validation_error`` rather than a silently ignored option. Timestamps are ISO 8601 strings
(an offset is converted to UTC; a naive time is UTC) or epoch seconds (milliseconds above 1e11).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

Text = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
Timestamp = Annotated[StrictStr | StrictInt | StrictFloat,
                      Field(description="ISO 8601 (UTC unless an offset is given) or epoch seconds",
                            examples=["2024-03-01T10:00:00Z"])]
SourceName = Literal["stream", "catchup_scan", "historical_replay"]
Interval = Annotated[str, Field(min_length=2, max_length=8, examples=["1h"],
                                description="a count and a unit: 1m, 5m, 1h, 4h, 1d, 1w")]
FeatureValue = StrictFloat | StrictInt | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRequest(_Body):
    signal_id: Text
    symbol: Text
    ts: Timestamp
    interval_name: Interval
    source: SourceName = "stream"


class BackfillBody(_Body):
    signal_id: Text
    symbol: Text
    interval_name: Interval
    start: Timestamp | None = None
    end: Timestamp | None = None
    source: SourceName = "historical_replay"
    mode: Literal["window", "last", "ts-list"] = Field(
        default="window", description="window: [start, end]; last: after the newest signal row;"
        " ts-list: exactly the bars in ts")
    ts: list[Timestamp] | None = Field(default=None, max_length=100_000,
                                       description="the bars of ts-list mode")


class PredictRequest(_Body):
    symbol: Text
    timestamp: Timestamp | None = Field(
        default=None, description="the bar; default: now with inline features, else the newest bar"
        " with a feature row")
    signal_id: Text | None = Field(default=None, description="default: the server's default signal")
    features: dict[Annotated[str, Field(max_length=256)], FeatureValue] | None = Field(
        default=None, max_length=10_000,
        description="inline feature values (no store read, nothing written); null is a missing"
        " value; the reserved key `close` is the bar's close price, used for levels and size")
    strategy_override: None = Field(default=None, description="not supported yet: must be null")
    risk_check: bool = Field(default=False, description="run the risk checks (SIGSERVE_RISK_*):"
                             " risk_validation in the answer; a failed check is 403 risk_rejected")
    explain: bool = Field(default=False, description="top features by TreeSHAP contribution in"
                          " metadata.explanation (LightGBM, XGBoost; else 409 explanation_unsupported)")
    explain_top_k: int = Field(default=5, ge=1, le=100, description="how many features explain returns")


# --- responses (documentation) -----------------------------------------------------------------
class ErrorEnvelope(BaseModel):
    error_code: str = Field(examples=["signal_not_found"])
    message: str
    details: dict[str, Any]
    request_id: str


class SignalRow(BaseModel):
    signal_id: str
    symbol: str
    interval: str
    ts: str
    action: Literal["hold", "buy", "sell", "close_long", "close_short"]
    confidence: float
    entry_price: float | None
    stop_loss: float | None
    take_profit: float | None
    recommended_size: float | None
    raw_output: list[float | None]
    model_name: str
    model_version: int
    model_sha256: str
    feature_key: str
    source: SourceName
    latency_ms: float
    flags: str = Field(description="'' or levels_invalid, levels_need_close, deadline_fallback_hold")


class BackfillResponse(BaseModel):
    signal_id: str
    symbol: str
    interval: str
    mode: str
    start: str | None
    end: str | None
    rows_written: int
    rows_skipped_missing_features: int
    chunks: int
    elapsed_s: float
    bars_per_s: float
    actions: dict[str, int]


class Levels(BaseModel):
    entry_price: float | None
    stop_loss: float | None
    take_profit: float | None


class PredictMetadata(BaseModel):
    model_version: int
    latency_ms: float = Field(description="server time from the request's arrival")
    timestamp: str = Field(description="the bar")
    model_name: str
    model_sha256: str
    signal_id: str
    signal_action: str = Field(description="the engine's action (close_long maps to SELL,"
                                           " close_short to BUY)")
    feature_key: str
    flags: str
    inline_features: bool
    levels: Levels
    explanation: dict[str, Any] | None = Field(
        default=None, description="with explain: true: method, explained class, base_value,"
        " raw_margin, top_features [{feature, value, contribution}], latency_ms")


class RiskValidation(BaseModel):
    approved: bool
    warnings: list[str]
    checks: dict[str, Literal["pass", "fail"]] = Field(
        description="max_position, max_concentration, max_signals_per_window, min_confidence, levels")


class PredictResponse(BaseModel):
    decision_id: str
    symbol: str
    action: Literal["BUY", "SELL", "HOLD"]
    confidence: float
    recommended_quantity: float | None
    regime_probabilities: dict[str, float] | None = Field(
        default=None, description="a regime-gated ensemble's regime probabilities, and their"
        " entropy (nats) under the key 'entropy'; null for a single model")
    strategy_weights: dict[str, float] | None = Field(
        default=None, description="the ensemble's weight per specialist ('REGIME:MODEL')")
    risk_validation: RiskValidation | None = Field(default=None, description="with risk_check: true")
    metadata: PredictMetadata


class ModelSummary(BaseModel):
    name: str
    latest: int
    production: int | None
    staging: int | None
    versions: list[dict[str, Any]]


class ModelsResponse(BaseModel):
    models: list[ModelSummary]


class ModelDetail(BaseModel):
    name: str
    card: dict[str, Any] = Field(description="the production version's card, else the newest's")
    versions: list[dict[str, Any]]
    events: list[dict[str, Any]]


class ModelInfo(BaseModel):
    signal_id: str
    interval: str
    symbols: list[str]
    model: dict[str, Any]
    runtime: str
    read_features: list[str]
    policy: dict[str, Any]
    class_metrics: dict[str, Any] | None = Field(
        default=None, description="per-class precision, recall, F1 and support on the test part"
                                  " (models trained by sigserve train), else null")


class Label(BaseModel):
    index: int
    name: str
    action: str
    color: str


class ModelLabels(BaseModel):
    signal_id: str
    model: str
    task: str
    labels: list[Label]
    actions: dict[str, str] = Field(description="display colour per API action")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
