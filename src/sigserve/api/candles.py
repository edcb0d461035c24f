"""Candle-based inference: candles in, the model's own feature spec computed from them, a label per
candle out.

- ``POST /predict``: ``{"symbol", "interval", "candles": [{ts, open, high, low, close, volume}...]}``.
  The spec recorded on the model's card (``sigserve train``) computes the features over the
  candles (closed bars only); every candle after the warm-up gets ``{ts, label, confidence,
  action}``; consecutive candles with the same label other than ``O`` (BIO prefixes stripped)
  are grouped into ``spans`` with their average confidence. Too few candles for the warm-up is a
  ``validation_error`` that names the count needed.
- ``POST /predict/batch``: ``{"symbol", "interval", "start", "end", "batch_size"}`` reads the
  candles from the store and predicts ``[start, end]`` in chunks of ``batch_size`` candles, each
  chunk computed from the spec's ``window`` of candles before it (so it equals the whole
  history's features to 1e-9), off the event loop.

Both go through the engine's pure step (``Engine.compute``: predict, then the signal's policy), and
write nothing. The features of the first candles after the warm-up come from a short history:
recursive indicators (EMA, RSI, ATR, ...) settle over the spec's ``window`` (see
``GET /model/info``), so send that many candles when the first predictions must match a long
history's.

``build_candles(router, state)`` declares the endpoints (called from ``routes.build``).
"""

from __future__ import annotations

import asyncio
import time
from enum import Enum
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from starlette.responses import Response

from ..domain import ACTIONS, FLAT, FeatureBatch, ModelCard, Task
from ..engine import Engine, Prepared, card_feature_spec
from ..errors import BackfillWindowTooLarge, ValidationError
from ..features.spec import FeatureSpec, closed_bars
from ..timeutil import TS_DTYPE, check_window, format_ts, interval_us, validate_interval
from .responses import JSONBytes, dumps
from .routes import errors_doc, lean, to_ts
from .schemas import Interval, Text, Timestamp
from .state import ServerState

Number = StrictFloat | StrictInt
MAX_CANDLES = 100_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CandleIn(_Body):
    ts: Timestamp
    open: Number
    high: Number
    low: Number
    close: Number
    volume: Number = 0.0


class PredictCandlesRequest(_Body):
    symbol: Text
    interval: Interval
    candles: list[CandleIn] = Field(min_length=1, max_length=MAX_CANDLES,
                                    description="one symbol's bars in time order (ts = open time, UTC)")
    signal_id: Text | None = Field(default=None, description="default: the server's default signal")


class PredictBatchRequest(_Body):
    symbol: Text
    interval: Interval
    start: Timestamp
    end: Timestamp
    batch_size: Annotated[int, Field(ge=1, le=MAX_CANDLES)] = 5_000
    signal_id: Text | None = Field(default=None, description="default: the server's default signal")


class CandlePrediction(BaseModel):
    ts: str
    label: str
    confidence: float
    action: str


class LabelSpan(BaseModel):
    label: str
    start: str
    end: str
    candles: int
    avg_confidence: float


class CandleModelInfo(BaseModel):
    signal_id: str
    model: str
    name: str
    version: int
    sha256: str | None
    task: str
    classes: list[str]
    feature_key: str
    spec_hash: str
    warmup: int
    window: int


class PredictCandlesResponse(BaseModel):
    symbol: str
    interval: str
    predictions: list[CandlePrediction]
    spans: list[LabelSpan]
    model_info: CandleModelInfo
    candles: int = Field(description="candles received (batch: read)")
    warmup_skipped: int = Field(description="candles before the warm-up ended, or with an incomplete feature row")
    open_bars_dropped: int = Field(description="candles not closed yet (open time + interval > now)")
    chunks: int = 1
    latency_ms: float


def model_info(prepared: Prepared, spec: FeatureSpec) -> dict[str, Any]:
    card = prepared.card
    return {"signal_id": prepared.definition.signal_id, "model": card.ref, "name": card.name,
            "version": card.version, "sha256": card.sha256, "task": str(card.task),
            "classes": list(card.classes), "feature_key": spec.feature_key, "spec_hash": spec.spec_hash,
            "warmup": spec.warmup, "window": spec.window}


def _label_of(card: ModelCard, output: np.ndarray) -> np.ndarray:
    if card.task is Task.REGRESSION:
        return np.where(output[:, 0] > 0, "up", "down").astype(object)
    classes = np.asarray(card.classes, dtype=object)
    return np.asarray(classes[np.argmax(output, axis=1)], dtype=object)


def _confidence(card: ModelCard, output: np.ndarray, policy_confidence: np.ndarray) -> np.ndarray:
    if card.task is Task.REGRESSION:
        return np.asarray(policy_confidence, dtype=np.float64)
    return np.asarray(output.max(axis=1), dtype=np.float64)


def group_spans(ts: list[str], labels: list[str], confidence: list[float]) -> list[dict[str, Any]]:
    """Runs of consecutive candles with the same label (``B-``/``I-`` stripped; a ``B-`` starts a
    new run), ``O`` excluded, with their average confidence."""
    spans: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for t, label, c in zip(ts, labels, confidence, strict=True):
        base = label[2:] if label.startswith(("B-", "I-")) else label
        starts = label.startswith("B-")
        if current is not None and (base == "O" or current["label"] != base or starts):
            current["avg_confidence"] = current.pop("_sum") / current["candles"]
            spans.append(current)
            current = None
        if base == "O":
            continue
        if current is None:
            current = {"label": base, "start": t, "end": t, "candles": 0, "_sum": 0.0}
        current["end"] = t
        current["candles"] += 1
        current["_sum"] += c
    if current is not None:
        current["avg_confidence"] = current.pop("_sum") / current["candles"]
        spans.append(current)
    return spans


def _predict_rows(engine: Engine, prepared: Prepared, spec: FeatureSpec, symbol: str, interval: str,
                  arrays: dict[str, np.ndarray], first: int) -> tuple[dict[str, list[Any]], int]:
    """Features over ``arrays`` and the predictions of rows ``first..`` (complete rows only)."""
    frame = spec.compute(arrays)
    values = frame.values
    complete = np.isfinite(values).all(axis=1)
    complete[:max(first, spec.warmup)] = False
    rows = np.flatnonzero(complete)
    skipped = int(values.shape[0] - first - rows.shape[0]) if values.shape[0] > first else 0
    index = {n: i for i, n in enumerate(spec.names)}
    matrix = np.full((rows.shape[0], len(prepared.read_names)), np.nan)
    for j, name in enumerate(prepared.read_names):
        if name in index:
            matrix[:, j] = values[rows, index[name]]
    batch = FeatureBatch(symbol, interval, frame.ts[rows], matrix, prepared.read_names,
                         np.full(rows.shape[0], spec.feature_key, dtype=object), arrays["close"][rows])
    out: dict[str, list[Any]] = {"ts": [], "label": [], "confidence": [], "action": []}
    if rows.shape[0] == 0:
        return out, skipped
    signals, _ = engine.compute(prepared, batch, FLAT, "stream")
    card = prepared.card
    out["ts"] = [format_ts(t) for t in batch.ts]
    out["label"] = [str(v) for v in _label_of(card, signals.raw_output).tolist()]
    out["confidence"] = [float(v) for v in _confidence(card, signals.raw_output, signals.confidence)]
    out["action"] = [ACTIONS[int(a)] for a in signals.action]
    return out, skipped


def _answer(state: ServerState, prepared: Prepared, spec: FeatureSpec, symbol: str, interval: str,
            rows: dict[str, list[Any]], started: float, **counts: int) -> Response:
    predictions = [{"ts": t, "label": lab, "confidence": c, "action": a} for t, lab, c, a in
                   zip(rows["ts"], rows["label"], rows["confidence"], rows["action"], strict=True)]
    for action in set(rows["action"]):
        state.metrics.count_signals(action, "predict_candles", rows["action"].count(action))
    body = {"symbol": symbol, "interval": interval, "predictions": predictions,
            "spans": group_spans(rows["ts"], rows["label"], rows["confidence"]),
            "model_info": model_info(prepared, spec), **counts,
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 3)}
    return JSONBytes(dumps(body))


def build_candles(router: Any, state: ServerState) -> None:
    """Declare ``POST /predict`` and ``POST /predict/batch``."""
    tags: list[str | Enum] = ["inference"]

    @lean(router, "/predict", ["POST"], tags, response_model=None,
          responses={200: {"model": PredictCandlesResponse}, **errors_doc(404, 409, 422, 502, 503)})
    async def predict_candles(body: PredictCandlesRequest) -> Response:
        """Labels for candles: the model's feature spec computed from the candles sent, a
        prediction per candle after the warm-up, and spans of consecutive equal labels. Nothing
        is read from the store or written."""
        started = time.perf_counter()
        validate_interval(body.interval)
        engine = state.engine
        prepared = await engine.prepare(body.signal_id or await state.default_signal())
        engine.check_target(prepared, body.symbol, body.interval)
        spec = card_feature_spec(prepared.card)
        n = len(body.candles)
        ts: np.ndarray = np.array([to_ts(c.ts, f"candles[{i}].ts") for i, c in enumerate(body.candles)],
                                  dtype=TS_DTYPE)
        arrays = {
            "ts": ts,
            **{k: np.array([getattr(c, k) for c in body.candles], dtype=np.float64)
               for k in ("open", "high", "low", "close", "volume")}}
        if n > 1 and not bool(np.all(np.diff(ts.astype(np.int64)) > 0)):
            raise ValidationError("candles must be in time order with no repeated ts",
                                  details={"field": "candles"})
        closed = closed_bars(arrays, body.interval)
        kept = int(closed["ts"].shape[0])
        if kept < spec.warmup + 1:
            raise ValidationError(
                f"{kept} closed candles are too few: the model's features need at least"
                f" {spec.warmup + 1} (a warm-up of {spec.warmup}); {spec.window} give features that"
                " equal a long history's", details={"needed": spec.warmup + 1, "given": kept,
                                                    "warmup": spec.warmup, "window": spec.window})
        if kept >= engine.thread_rows:
            rows, skipped = await asyncio.to_thread(_predict_rows, engine, prepared, spec, body.symbol,
                                                    body.interval, closed, 0)
        else:
            rows, skipped = _predict_rows(engine, prepared, spec, body.symbol, body.interval, closed, 0)
        return _answer(state, prepared, spec, body.symbol, body.interval, rows, started, candles=n,
                       warmup_skipped=skipped, open_bars_dropped=n - kept, chunks=1)

    @lean(router, "/predict/batch", ["POST"], tags, response_model=None,
          responses={200: {"model": PredictCandlesResponse}, **errors_doc(404, 409, 413, 422, 502, 503)})
    async def predict_batch(body: PredictBatchRequest) -> Response:
        """Labels for the stored candles of ``[start, end]``, computed in chunks of
        ``batch_size`` candles (each from the spec's window of candles before it). Nothing is
        written."""
        started = time.perf_counter()
        validate_interval(body.interval)
        start, end = to_ts(body.start, "start"), to_ts(body.end, "end")
        check_window(start, end)
        engine = state.engine
        prepared = await engine.prepare(body.signal_id or await state.default_signal())
        engine.check_target(prepared, body.symbol, body.interval)
        spec = card_feature_spec(prepared.card)
        step = np.timedelta64(interval_us(body.interval), "us")
        bars = int((end - start) // step) + 1
        limit = state.settings.max_backfill_rows
        if bars > limit:
            raise BackfillWindowTooLarge(
                f"the window holds up to {bars} bars, over SIGSERVE_MAX_BACKFILL_ROWS ({limit})",
                details={"bars": bars, "max_rows": limit})
        candles = await state.svc.store.read_candles(body.symbol, body.interval,
                                                     start - step * (spec.window + 1), end)
        arrays = closed_bars(candles, body.interval)
        total = int(arrays["ts"].shape[0])
        first = int(np.searchsorted(arrays["ts"], start))
        if total - first <= 0:
            raise ValidationError(f"no closed candles for {body.symbol} {body.interval} in the window:"
                                  " import candles first", details={"symbol": body.symbol})
        if first < spec.warmup and total < spec.warmup + 1:
            raise ValidationError(
                f"{total} stored candles are too few: the model's features need at least"
                f" {spec.warmup + 1}", details={"needed": spec.warmup + 1, "given": total})

        def run() -> tuple[dict[str, list[Any]], int, int]:
            merged: dict[str, list[Any]] = {"ts": [], "label": [], "confidence": [], "action": []}
            skipped = chunks = 0
            for lo in range(first, total, body.batch_size):
                hi = min(lo + body.batch_size, total)
                context = max(0, lo - spec.window + 1)
                part = {k: v[context:hi] for k, v in arrays.items()}
                rows, skip = _predict_rows(engine, prepared, spec, body.symbol, body.interval, part, lo - context)
                for key, values in rows.items():
                    merged[key].extend(values)
                skipped += skip
                chunks += 1
            return merged, skipped, chunks

        rows, skipped, chunks = await asyncio.to_thread(run)
        return _answer(state, prepared, spec, body.symbol, body.interval, rows, started, candles=total - first,
                       warmup_skipped=skipped, open_bars_dropped=0, chunks=chunks)
