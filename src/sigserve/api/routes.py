"""The endpoints. Each one parses its input, calls the engine (or the registry) and shapes the
answer; none re-implements a pipeline step.

One-bar endpoints (``/inference/run``, ``/api/v1/predict``) run under the request's latency
budget (``SIGSERVE_DEADLINE_MS``, counted from the request's arrival): the engine checks it before
the write (``deadline_exceeded``, or a hold row flagged ``deadline_fallback_hold`` with
``SIGSERVE_FALLBACK_TO_HOLD``), and an await still pending at twice the budget is cancelled
(``deadline_exceeded``, ``details.hard_stop``). Backfill has no budget: it runs off the event loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Awaitable
from dataclasses import asdict
from enum import Enum
from typing import Any, TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..backfill import BackfillRequest, run_backfill
from ..domain import ACTIONS, SERVABLE_STAGES, Stage, Task
from ..ensemble import ENSEMBLE_PARTS
from ..errors import DeadlineExceeded, ModelNotFound, StoreUnavailable, ValidationError
from ..ids import random_uuid4 as decision_id
from ..timeutil import check_window, parse_ts, validate_interval
from .admin import ensure_shadow_runner
from .errors import STARTED_KEY
from .extras import Extras
from .lean import RouteTable, lean
from .metrics import CONTENT_TYPE
from .responses import JSONBytes, JSONResp, dumps
from .schemas import (
    BackfillBody,
    BackfillResponse,
    ErrorEnvelope,
    Health,
    ModelDetail,
    ModelInfo,
    ModelLabels,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
    RunRequest,
    SignalRow,
)
from .state import ServerState

T = TypeVar("T")

_TS_MIN = np.datetime64("1900-01-01T00:00:00", "us")
_TS_MAX = np.datetime64("2200-01-01T00:00:00", "us")
API_ACTION = {"buy": "BUY", "close_short": "BUY", "sell": "SELL", "close_long": "SELL", "hold": "HOLD"}
ACTION_COLORS = {"BUY": "#16a34a", "SELL": "#dc2626", "HOLD": "#6b7280"}

_ERROR_TEXT = {
    401: "unauthorized: missing or wrong bearer token",
    404: "signal_not_found, model_not_found or route_not_found",
    403: "risk_rejected (risk_check: true; the checks in details.checks)",
    409: "signal_retired, model_lifecycle_refused, model_artifact_missing, feature_not_registered,"
         " feature_value_missing, feature_spec_mismatch, explanation_unsupported (explain: true)",
    413: "backfill_window_too_large",
    422: "validation_error",
    500: "internal_error (details.request_id)",
    502: "artifact_corrupt",
    503: "store_unavailable",
    504: "deadline_exceeded",
}


def errors_doc(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorEnvelope, "description": _ERROR_TEXT[s]} for s in (401, *statuses, 500)}


# ISO 8601 in UTC (Z or no offset): numpy parses these directly, several times faster than
# parse_ts's general path (offsets, epoch numbers), which every other form takes.
_UTC_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?Z?$")


def to_ts(value: str | int | float, field: str) -> np.datetime64:
    """A request timestamp as UTC datetime64[us], refused outside 1900..2200."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"malformed timestamp for {field}: {value!r}", details={"field": field})
    ts: np.datetime64 | None = None
    if isinstance(value, str) and _UTC_ISO.match(value):
        try:
            ts = np.datetime64(value[:-1] if value.endswith("Z") else value, "us")
        except ValueError:  # e.g. 2024-02-30: parse_ts says why
            ts = None
    if ts is None:
        ts = parse_ts(value, field=field)
    if np.isnat(ts) or not _TS_MIN <= ts <= _TS_MAX:
        raise ValidationError(f"timestamp {field} is out of range (1900..2200): {value!r}",
                              details={"field": field, "value": str(value)})
    return ts


def _now_ts() -> np.datetime64:
    return np.datetime64(time.time_ns() // 1000, "us")


async def _within_budget(state: ServerState, work: Awaitable[T], deadline: float) -> T:
    """Await ``work``; cancel it when it is still pending at twice the budget."""
    budget = state.budget_s
    stop = asyncio.timeout(max(deadline + budget - time.perf_counter(), 0.0))
    try:
        async with stop:
            return await work
    except TimeoutError:
        if not stop.expired():
            raise
        raise DeadlineExceeded(
            f"the request's latency budget of {state.settings.deadline_ms} ms ran out"
            " (a store call was still pending at twice the budget)",
            details={"budget_ms": state.settings.deadline_ms, "hard_stop": True}) from None
    except DeadlineExceeded as exc:
        exc.details.setdefault("budget_ms", state.settings.deadline_ms)
        raise


def build(app: RouteTable, state: ServerState) -> None:
    """Declare every endpoint on the route table (the edge serves the lean ones, FastAPI the
    rest and the schema)."""
    _inference(app, state)
    _health(app, state)
    _models(app, state)
    from .candles import build_candles  # POST /predict, /predict/batch (candles in)
    build_candles(app, state)
    from .admin import build_admin  # /admin/rollouts (champion / challenger / shadow)
    build_admin(app, state)


# --- health, metrics ---------------------------------------------------------------------------
def _health(router: RouteTable, state: ServerState) -> None:
    tags: list[str | Enum] = ["operations"]

    @lean(router, "/healthz", ["GET"], tags, response_model=None, responses={200: {"model": Health}})
    async def healthz() -> Response:
        """The process is up (public)."""
        return JSONResp({"status": "ok"})

    @lean(router, "/readyz", ["GET"], tags, response_model=None,
                responses={200: {"model": Health},
                           503: {"model": ErrorEnvelope, "description": _ERROR_TEXT[503]}})
    async def readyz() -> Response:
        """The store answers and the artifact directory is readable (public)."""
        checks: dict[str, str] = {}
        services = state.services
        if services is None:
            raise StoreUnavailable("the service is starting or stopping", details={"store": "closed"})
        try:
            await asyncio.wait_for(services.store.ping(), timeout=2.0)
            checks["store"] = "ok"
        except Exception as exc:  # any failure to answer is "not ready"
            checks["store"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        artifacts = state.settings.artifacts_dir
        if artifacts.is_dir() and os.access(artifacts, os.R_OK | os.X_OK):
            checks["artifacts"] = "ok"
        else:
            checks["artifacts"] = f"{artifacts} is not a readable directory"
        if any(v != "ok" for v in checks.values()):
            raise StoreUnavailable("not ready: " + "; ".join(f"{k}: {v}" for k, v in checks.items()
                                                           if v != "ok"), details={"checks": checks})
        return JSONResp({"status": "ready", "checks": checks})

    @lean(router, "/metrics", ["GET"], tags, response_class=Response,
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"},
                           401: {"model": ErrorEnvelope, "description": _ERROR_TEXT[401]}})
    async def metrics() -> Response:
        """Prometheus metrics: request and stage latency histograms, signals by action, errors by
        code."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)



# --- inference -----------------------------------------------------------------------------------
def _inference(router: RouteTable, state: ServerState) -> None:
    tags: list[str | Enum] = ["inference"]
    settings = state.settings
    metrics = state.metrics
    extras = Extras(state)  # risk book, decision events (api/extras.py)
    ensemble_parts = ENSEMBLE_PARTS  # a regime-gated ensemble's last one-row parts (ensemble.py)

    @lean(router, "/inference/run", ["POST"], tags, response_model=None,
                 responses={200: {"model": SignalRow}, **errors_doc(404, 409, 422, 502, 503, 504)})
    async def inference_run(body: RunRequest, request: Request) -> Response:
        """One bar through the whole pipeline: signal -> model -> artifact -> feature row ->
        predict -> policy -> upsert. Returns the stored signal row."""
        started = request.scope.get(STARTED_KEY) or time.perf_counter()
        ts = to_ts(body.ts, "ts")
        validate_interval(body.interval_name)
        deadline = started + state.budget_s
        if state.engine.shadow_runner is None:
            ensure_shadow_runner(state)
        row = await _within_budget(state, state.engine.predict_bar(
            body.signal_id, body.symbol, body.interval_name, ts, source=body.source, write=True,
            deadline=deadline, fallback_to_hold=settings.fallback_to_hold), deadline)
        metrics.count_signals(row["action"], "run")
        return JSONBytes(dumps(row))

    @lean(router, "/inference/backfill", ["POST"], tags, response_model=None,
                 responses={200: {"model": BackfillResponse}, **errors_doc(404, 409, 413, 422, 502, 503)})
    async def inference_backfill(body: BackfillBody) -> Response:
        """Signals for a window (or the bars after the newest signal, or a list of bars), in
        vectorised chunks off the event loop; reruns are upserts."""
        validate_interval(body.interval_name)
        start = to_ts(body.start, "start") if body.start is not None else None
        end = to_ts(body.end, "end") if body.end is not None else None
        if body.mode == "window" and (start is None or end is None):
            raise ValidationError("window mode needs start and end", details={"mode": body.mode})
        if start is not None and end is not None:
            check_window(start, end)
        bars = tuple(to_ts(t, "ts") for t in body.ts or ())
        if body.mode == "ts-list" and not bars:
            raise ValidationError("ts-list mode needs at least one ts", details={"mode": body.mode})
        report = await run_backfill(
            state.engine,
            BackfillRequest(body.signal_id, body.symbol, body.interval_name, body.mode, start, end,
                            bars, body.source),
            max_rows=settings.max_backfill_rows, chunk_rows=settings.backfill_chunk_rows)
        for action, n in report.actions.items():
            metrics.count_signals(action, "backfill", n)
        return JSONBytes(dumps(report.to_dict()))

    @lean(router, "/api/v1/predict", ["POST"], tags, response_model=None,
                 responses={200: {"model": PredictResponse}, **errors_doc(403, 404, 409, 422, 502, 503, 504)})
    async def predict(body: PredictRequest, request: Request) -> Response:
        """A trading decision for one bar. With ``features`` inline nothing is read from the
        store or written; without them the store's row at ``timestamp`` (or the newest bar) is
        used, and nothing is written either (``/inference/run`` is the audited write path)."""
        started = request.scope.get(STARTED_KEY) or time.perf_counter()
        engine = state.engine
        if engine.shadow_runner is None:
            ensure_shadow_runner(state)
        signal_id = body.signal_id or await state.default_signal()
        deadline = started + state.budget_s
        features = body.features
        if features is not None:
            ts = to_ts(body.timestamp, "timestamp") if body.timestamp is not None else _now_ts()
            close = features.get("close")
            # No store I/O here (a resolution past the prepared TTL aside): the engine's own
            # deadline check is the whole budget.
            try:
                row = await engine.predict_inline(
                    signal_id, body.symbol, features, ts,
                    close=float(close) if close is not None else None, deadline=deadline,
                    fallback_to_hold=settings.fallback_to_hold)
            except DeadlineExceeded as exc:
                exc.details.setdefault("budget_ms", settings.deadline_ms)
                raise
        else:
            async def from_store() -> dict[str, Any]:
                prepared = await engine.prepare(signal_id)
                interval = prepared.definition.interval
                engine.check_target(prepared, body.symbol, interval)
                ts = (to_ts(body.timestamp, "timestamp") if body.timestamp is not None
                      else await engine.newest_bar(body.symbol, interval))
                return await engine.predict_bar(
                    signal_id, body.symbol, interval, ts, source="stream", write=False,
                    deadline=deadline, fallback_to_hold=settings.fallback_to_hold)

            row = await _within_budget(state, from_store(), deadline)
        action = API_ACTION[row["action"]]
        metrics.count_signals(row["action"], "predict")
        answer = {
            "decision_id": decision_id(),
            "symbol": row["symbol"],
            "action": action,
            "confidence": row["confidence"],
            "recommended_quantity": row["recommended_size"],
            "regime_probabilities": None,
            "strategy_weights": None,
            "risk_validation": None,
            "metadata": {
                "model_version": row["model_version"],
                "latency_ms": round((time.perf_counter() - started) * 1000.0, 4),
                "timestamp": row["ts"],
                "model_name": row["model_name"],
                "model_sha256": row["model_sha256"],
                "signal_id": row["signal_id"],
                "signal_action": row["action"],
                "feature_key": row["feature_key"],
                "flags": row["flags"],
                "inline_features": features is not None,
                "levels": {"entry_price": row["entry_price"], "stop_loss": row["stop_loss"],
                           "take_profit": row["take_profit"]},
            },
        }
        if body.risk_check or body.explain or ensemble_parts.value is not None:
            await extras.enrich(body, signal_id, row, features, answer)
        if extras.publisher is not None:
            extras.publisher.submit(answer, state.svc.on_close)
        return JSONBytes(dumps(answer))



# --- models --------------------------------------------------------------------------------------
def _models(router: RouteTable, state: ServerState) -> None:
    tags: list[str | Enum] = ["models"]

    @lean(router, "/models", ["GET"], tags, response_model=None,
                responses={200: {"model": ModelsResponse}, **errors_doc(503)})
    async def list_models() -> Response:
        """Every model name with its versions and which versions hold the aliases."""
        by_name: dict[str, list[Any]] = {}
        for card in await state.svc.store.list_models():
            by_name.setdefault(card.name, []).append(card)
        models = []
        for name, cards in sorted(by_name.items()):
            cards.sort(key=lambda c: c.version)
            holder = {stage: next((c.version for c in cards if c.stage == stage), None)
                      for stage in (Stage.PRODUCTION, Stage.STAGING)}
            models.append({
                "name": name, "latest": cards[-1].version,
                "production": holder[Stage.PRODUCTION], "staging": holder[Stage.STAGING],
                "versions": [{"version": c.version, "stage": str(c.stage), "flavor": c.flavor,
                              "task": str(c.task), "sha256": c.sha256, "runtime": c.runtime or c.flavor,
                              "servable": c.stage in SERVABLE_STAGES, "created_at": c.created_at}
                             for c in cards],
            })
        return JSONResp({"models": models})

    @lean(router, "/models/{name}", ["GET"], tags, response_model=None,
          responses={200: {"model": ModelDetail}, **errors_doc(404, 503)})
    async def show_model(name: str) -> Response:
        """A model's card (the production version's, else the newest's), every version's card,
        and the lifecycle events."""
        cards = sorted(await state.svc.store.list_models(name), key=lambda c: c.version)
        if not cards:
            raise ModelNotFound(f"no model named {name!r}", details={"name": name})
        card = next((c for c in cards if c.stage == Stage.PRODUCTION), cards[-1])
        events = await state.svc.store.model_events(name)
        return JSONResp({"name": name, "card": card.to_dict(),
                         "versions": [c.to_dict() for c in cards], "events": events})

    @lean(router, "/model/info", ["GET"], tags, response_model=None,
                responses={200: {"model": ModelInfo}, **errors_doc(404, 409, 502, 503)})
    async def model_info() -> Response:
        """The default signal's model as it is served: card, runtime, features, policy."""
        signal_id = await state.default_signal()
        prepared = await state.engine.prepare(signal_id)
        definition = prepared.definition
        return JSONResp({
            "signal_id": signal_id, "interval": definition.interval,
            "symbols": list(definition.symbols), "model": prepared.card.to_dict(),
            "runtime": getattr(prepared.runtime, "name", prepared.card.flavor),
            "read_features": list(prepared.read_names),
            "policy": asdict(definition.policy),
            "class_metrics": prepared.card.extra.get("class_metrics"),  # per class, test part (sigserve train)
        })

    @lean(router, "/model/labels", ["GET"], tags, response_model=None,
                responses={200: {"model": ModelLabels}, **errors_doc(404, 409, 502, 503)})
    async def model_labels() -> Response:
        """The default signal's model's class labels, the action each one leads to, and a
        display colour per action."""
        signal_id = await state.default_signal()
        prepared = await state.engine.prepare(signal_id)
        card = prepared.card
        if card.task is Task.BINARY:
            actions = ["sell", "buy"]
        elif card.task is Task.MULTICLASS:
            actions = [ACTIONS[int(code)] for code in prepared.plan.class_codes]
        else:
            actions = []
        labels = [{"index": i, "name": name, "action": API_ACTION[action],
                   "color": ACTION_COLORS[API_ACTION[action]]}
                  for i, (name, action) in enumerate(zip(card.classes, actions, strict=False))]
        return JSONResp({"signal_id": signal_id, "model": card.ref, "task": str(card.task),
                         "labels": labels, "actions": ACTION_COLORS})



def docs_page(schema: dict[str, Any]) -> HTMLResponse:
    """Swagger UI with the schema inline: one authenticated fetch gives the whole page."""
    spec = dumps(schema).replace(b"</", b"<\\/").decode()
    html = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sigserve API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{spec: {spec}, dom_id: "#swagger-ui", persistAuthorization: true}});</script>
</body></html>"""
    return HTMLResponse(html)

