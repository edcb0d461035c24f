"""Core types shared by every layer: models, signal definitions, policies and signal batches.

These are plain dataclasses on purpose: they cross the hot path, where a pydantic round-trip per
bar would cost more than the model itself. Validation of user input happens once, at the edge
(CLI, HTTP), when a definition is created.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np

from .errors import ValidationError
from .timeutil import format_ts


class Stage(StrEnum):
    REGISTERED = "registered"
    STAGING = "staging"
    PRODUCTION = "production"
    RETIRED = "retired"
    REJECTED = "rejected_by_operator"


SERVABLE_STAGES = frozenset({Stage.REGISTERED, Stage.STAGING, Stage.PRODUCTION})
ALIASES = ("production", "staging")


class Task(StrEnum):
    BINARY = "binary"
    MULTICLASS = "multiclass"
    REGRESSION = "regression"


class Source(StrEnum):
    STREAM = "stream"
    CATCHUP_SCAN = "catchup_scan"
    HISTORICAL_REPLAY = "historical_replay"


# Actions are int8 codes inside vectors, and strings at the edges.
ACTIONS = ("hold", "buy", "sell", "close_long", "close_short")
HOLD, BUY, SELL, CLOSE_LONG, CLOSE_SHORT = range(5)
ACTION_CODE = {name: code for code, name in enumerate(ACTIONS)}

# Position sides, derived from a signal's own history.
FLAT, LONG, SHORT = 0, 1, -1


@dataclass(frozen=True)
class ModelCard:
    """What sigserve knows about one registered model version."""

    name: str
    version: int
    flavor: str
    sha256: str | None
    artifact_path: str | None  # relative to SIGSERVE_HOME
    task: Task
    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    stage: Stage = Stage.REGISTERED
    runtime: str | None = None  # None: the flavor's own library
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task"] = str(self.task)
        data["stage"] = str(self.stage)
        data["feature_names"] = list(self.feature_names)
        data["classes"] = list(self.classes)
        return data


TRAINING_STATUSES = ("running", "completed", "failed")


@dataclass(frozen=True)
class TrainingRun:
    """One ``sigserve train`` run, as the ``training_runs`` table records it.

    ``config_hash`` is the sha256 of the pipeline config, ``dataset_version`` the sha256 of the
    labelled data it trained on. ``details`` carries the registered model ref, the MLflow run id,
    the error of a failed run. The store sets ``created_at`` on the first save and
    ``completed_at`` when the status leaves ``running``.
    """

    run_id: str
    model_type: str
    experiment: str
    config_hash: str
    dataset_version: str
    status: str = "running"
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    completed_at: str | None = None

    def __post_init__(self) -> None:
        if self.status not in TRAINING_STATUSES:
            raise ValidationError(f"unknown training run status {self.status!r}: use one of"
                                  f" {list(TRAINING_STATUSES)}", details={"status": self.status})
        if not self.run_id:
            raise ValidationError("a training run needs a run_id")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Policy:
    """How a prediction becomes a trading signal. Stored as JSON on the signal definition.

    ``threshold`` is p(up) for binary models, the minimum winning probability for multiclass
    models, and the predicted return for regression models.
    """

    threshold: float = 0.55
    class_actions: dict[str, str] = field(default_factory=dict)
    atr_feature: str | None = None  # None: the first model or row feature named atr*
    atr_multiplier_sl: float = 1.5
    atr_multiplier_tp: float = 3.0
    risk_fraction: float = 0.01
    equity: float = 100_000.0
    max_leverage: float = 1.0
    position_aware: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.threshold >= 0.0:
            problems.append("threshold must be >= 0")
        if not 0.0 < self.risk_fraction <= 1.0:
            problems.append("risk_fraction must be in (0, 1]")
        if self.atr_multiplier_sl <= 0 or self.atr_multiplier_tp <= 0:
            problems.append("ATR multipliers must be > 0")
        if self.equity <= 0 or self.max_leverage <= 0:
            problems.append("equity and max_leverage must be > 0")
        bad = {k: v for k, v in self.class_actions.items() if v not in ACTION_CODE}
        if bad:
            problems.append(f"class_actions maps to unknown actions {bad}; use {list(ACTIONS)}")
        if problems:
            raise ValidationError("invalid policy: " + "; ".join(problems),
                                  details={"problems": problems})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any] | None) -> Policy:
        data = json.loads(text) if isinstance(text, str) else dict(text or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValidationError(f"unknown policy options {sorted(unknown)}",
                                  details={"unknown": sorted(unknown)})
        return cls(**data)


@dataclass(frozen=True)
class SignalDefinition:
    signal_id: str
    model_name: str
    model_ref: str  # "@production", "@staging" or a version number as text
    interval: str
    symbols: tuple[str, ...]  # empty: every symbol
    policy: Policy
    status: str = "active"
    feature_key: str | None = None  # pinned feature computation; None: newest created_at
    created_at: str = ""

    @property
    def active(self) -> bool:
        return self.status == "active"


ROLLOUT_STAGES = ("none", "shadow", "canary", "full")


@dataclass(frozen=True)
class TrafficPolicy:
    """Which model versions serve a signal definition (``sigserve rollout``; one row per signal).

    ``champion`` serves every request the challenger does not take. ``challenger`` takes the
    (symbol, trading date) buckets below ``share`` (see :mod:`sigserve.routing`); with share 0 it
    is only predicted as a shadow. ``shadows`` are further versions predicted on the same feature
    row, stored with ``shadow = true`` and never returned. ``stage`` names the rollout step.
    """

    signal_id: str
    champion: int
    challenger: int | None = None
    share: float = 0.0
    shadows: tuple[int, ...] = ()
    stage: str = "none"
    updated_at: str = ""
    updated_by: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.share <= 1.0:
            problems.append("share must be in [0, 1]")
        if self.champion < 1 or (self.challenger is not None and self.challenger < 1):
            problems.append("versions are >= 1")
        if self.challenger is not None and self.challenger == self.champion:
            problems.append("the challenger must differ from the champion")
        if self.challenger is None and self.share:
            problems.append("a share needs a challenger")
        if self.stage not in ROLLOUT_STAGES:
            problems.append(f"stage must be one of {list(ROLLOUT_STAGES)}")
        if problems:
            raise ValidationError("invalid traffic policy: " + "; ".join(problems),
                                  details={"problems": problems, "signal_id": self.signal_id})

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version the policy predicts with: champion, challenger, shadows (no repeats)."""
        out = [self.champion]
        for v in (self.challenger, *self.shadows):
            if v is not None and v not in out:
                out.append(v)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shadows"] = list(self.shadows)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrafficPolicy:
        return cls(signal_id=data["signal_id"], champion=int(data["champion"]),
                   challenger=None if data.get("challenger") is None else int(data["challenger"]),
                   share=float(data.get("share") or 0.0),
                   shadows=tuple(int(v) for v in data.get("shadows") or ()),
                   stage=str(data.get("stage") or "none"), updated_at=str(data.get("updated_at") or ""),
                   updated_by=str(data.get("updated_by") or ""))


@dataclass
class FeatureBatch:
    """Feature rows for one symbol and interval, in ts order, columns in ``names`` order."""

    symbol: str
    interval: str
    ts: np.ndarray  # datetime64[us], sorted, unique
    values: np.ndarray  # float64 (n, len(names))
    names: tuple[str, ...]
    feature_keys: np.ndarray  # object array of str, one per row
    close: np.ndarray  # float64 (n,), NaN where no candle

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def take(self, rows: np.ndarray) -> FeatureBatch:
        """The rows ``rows`` selects (a boolean mask or indices), in that order."""
        return FeatureBatch(self.symbol, self.interval, self.ts[rows], self.values[rows], self.names,
                            self.feature_keys[rows], self.close[rows])


SIGNAL_ROW_COLUMNS = ("ts", "action", "confidence", "raw_output", "entry_price", "stop_loss", "take_profit",
                "recommended_size", "feature_keys", "latency_ms", "flags")


@dataclass
class SignalBatch:
    """Signals for one signal definition and symbol: a column per field of ``signal_history``."""

    signal_id: str
    symbol: str
    interval: str
    model_name: str
    model_version: int
    model_sha256: str
    source: str
    ts: np.ndarray
    action: np.ndarray  # int8 codes into ACTIONS
    confidence: np.ndarray
    raw_output: np.ndarray  # float64 (n, k): probabilities per class, or the regression value
    entry_price: np.ndarray
    stop_loss: np.ndarray
    take_profit: np.ndarray
    recommended_size: np.ndarray
    feature_keys: np.ndarray
    latency_ms: np.ndarray
    flags: np.ndarray  # object array of str ('' when none)
    shadow: bool = False

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def take(self, rows: np.ndarray) -> SignalBatch:
        """The rows ``rows`` selects (a boolean mask or indices), in that order."""
        return replace(self, **{name: getattr(self, name)[rows] for name in SIGNAL_ROW_COLUMNS})

    def row(self, i: int) -> dict[str, Any]:
        """One signal as a plain dict (for the CLI and the HTTP edge)."""
        entry, stop, take, size = (float(self.entry_price[i]), float(self.stop_loss[i]),
                                   float(self.take_profit[i]), float(self.recommended_size[i]))
        return {
            "signal_id": self.signal_id,
            "symbol": self.symbol,
            "interval": self.interval,
            "ts": format_ts(self.ts[i]),
            "action": ACTIONS[int(self.action[i])],
            "confidence": float(self.confidence[i]),
            "entry_price": None if entry != entry else entry,  # NaN -> None
            "stop_loss": None if stop != stop else stop,
            "take_profit": None if take != take else take,
            "recommended_size": None if size != size else size,
            "raw_output": self.raw_output[i].tolist(),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "model_sha256": self.model_sha256,
            "feature_key": str(self.feature_keys[i]),
            "source": self.source,
            "latency_ms": float(self.latency_ms[i]),
            "flags": str(self.flags[i]),
        }


def merge_batches(batches: list[SignalBatch]) -> SignalBatch:
    """One batch of the rows of batches that share their key fields, in ts order; for a bar that
    appears twice the later row wins (within a batch too)."""
    if len(batches) == 1 and bool(np.all(np.diff(batches[0].ts) > np.timedelta64(0, "us"))):
        return batches[0]  # already one row per bar, in order
    columns: dict[str, Any] = {name: np.concatenate([getattr(b, name) for b in batches])
                               for name in SIGNAL_ROW_COLUMNS}
    ts = columns["ts"]
    # the last occurrence of each ts, in ts order (a stable sort keeps a bar's rows in order;
    # no np.unique: its first call imports numpy.ma, kept off the serving path)
    order = np.argsort(ts, kind="stable")
    ordered = ts[order]
    keep = order[np.concatenate((ordered[1:] != ordered[:-1], [True]))]
    return replace(batches[-1], **{name: column[keep] for name, column in columns.items()})


class SignalRows:
    """The rows of signal batches that share their key fields, copied into preallocated columns
    as each batch comes, for one merged batch at the end (``merge_batches``' result).

    Why: a stream's write cycle gathers 50-100 one-row batches, and merging them at the cycle's
    start (about 11 ``np.concatenate`` calls per key, 0.7-0.9 ms in the running worker) was one
    stretch of the worker's event loop that a feature message arriving meanwhile waited behind:
    most of the stream's p99. Copied as they come, each batch costs a few microseconds and the
    cycle's take is a view per column.

    Usage::

        rows = SignalRows(first)       # first: a SignalBatch
        rows.append(second)            # same signal, version, symbol, interval, model, source
        merged = rows.take()           # == merge_batches([first, second]); rows is spent
    """

    __slots__ = ("_capacity", "columns", "n", "template")

    def __init__(self, batch: SignalBatch, capacity: int = 64) -> None:
        self.template = batch
        self.n = 0
        self._capacity = max(capacity, len(batch))
        self.columns: dict[str, np.ndarray] = {}
        for name in SIGNAL_ROW_COLUMNS:
            column = np.asarray(getattr(batch, name))
            self.columns[name] = np.empty((self._capacity, *column.shape[1:]), dtype=column.dtype)
        self.append(batch)

    def append(self, batch: SignalBatch) -> None:
        """Copy ``batch``'s rows after the ones held (its key fields are the first batch's)."""
        k = len(batch)
        n = self.n
        if n + k > self._capacity:
            self._grow(n + k)
        columns = self.columns
        for name in SIGNAL_ROW_COLUMNS:
            value = getattr(batch, name)
            column = columns[name]
            if value.dtype != column.dtype or value.shape[1:] != column.shape[1:]:
                column = self._widen(name, np.asarray(value))
            column[n:n + k] = value
        self.n = n + k

    def _grow(self, need: int) -> None:
        self._capacity = max(need, 2 * self._capacity)
        for name, column in self.columns.items():
            wider = np.empty((self._capacity, *column.shape[1:]), dtype=column.dtype)
            wider[:self.n] = column[:self.n]
            self.columns[name] = wider

    def _widen(self, name: str, value: np.ndarray) -> np.ndarray:
        """A batch whose column does not fit the held one (another dtype, another width of
        ``raw_output``): the held rows move to a column both fit, as ``np.concatenate`` would."""
        held = self.columns[name][:self.n]
        if held.shape[1:] != value.shape[1:]:
            raise ValueError(f"cannot merge signal rows: {name} has shape {value.shape[1:]} here and"
                             f" {held.shape[1:]} in the rows held")
        wider = np.empty((self._capacity, *held.shape[1:]), dtype=np.result_type(held, value))
        wider[:self.n] = held
        self.columns[name] = wider
        return wider

    def __len__(self) -> int:
        return self.n

    def take(self) -> SignalBatch:
        """One batch of every row held, as ``merge_batches`` of the appended batches would be (in
        ts order, the later row of a bar winning). Its columns are views of this buffer's: append
        nothing after."""
        n = self.n
        views: dict[str, Any] = {name: column[:n] for name, column in self.columns.items()}
        gathered = replace(self.template, **views)
        return merge_batches([gathered])
