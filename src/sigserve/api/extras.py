"""What ``/api/v1/predict`` adds to a decision on request: risk checks (``risk_check``),
explanations (``explain``), a regime-gated ensemble's regime probabilities and strategy weights,
and the ``trading_decision`` event to the audit bus. A plain request pays two attribute tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from typing import Any

import numpy as np

from ..risk import RiskBook, RiskLimits
from .state import ServerState

log = logging.getLogger("sigserve.api")


class Extras:
    """Per server: the risk book, the decision publisher, explain timing."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.risk = RiskBook(RiskLimits.from_settings(state.settings))
        self.publisher = DecisionPublisher(state.settings.audit_bus, state.settings.audit_subject,
                                           state.metrics) if state.settings.audit_bus else None

    async def enrich(self, body: Any, signal_id: str, row: dict[str, Any],
                     features: dict[str, Any] | None, answer: dict[str, Any]) -> None:
        from ..ensemble import take_last_parts

        parts = take_last_parts(f"{row['model_name']}:{row['model_version']}")
        if parts is not None:
            answer["regime_probabilities"], answer["strategy_weights"] = parts
        if body.explain:
            answer["metadata"]["explanation"] = await self._explain(body, signal_id, row, features)
        if body.risk_check:
            levels = answer["metadata"]["levels"]
            answer["risk_validation"] = self.risk.check(
                row["symbol"], answer["action"], row["recommended_size"], row["confidence"], levels)

    async def _explain(self, body: Any, signal_id: str, row: dict[str, Any],
                       features: dict[str, Any] | None) -> dict[str, Any]:
        from ..explain import explain
        from .routes import to_ts

        state = self.state
        engine = state.engine
        began = time.perf_counter()
        ts = to_ts(row["ts"], "timestamp")
        prepared = await engine.prepare(signal_id)
        if prepared.rollout is not None:
            prepared = prepared.rollout.pick(row["symbol"], ts)
        names = prepared.card.feature_names
        if features is not None:
            values = np.array([[math.nan if features.get(n) is None else float(features[n]) for n in names]])
        else:
            read = await engine.store.read_features(
                row["symbol"], prepared.definition.interval, prepared.read_names,
                ts=np.array([ts], dtype="datetime64[us]"),
                feature_key=prepared.definition.feature_key or prepared.spec_key)
            values = read.batch.values[:, : len(names)]
        out = explain(prepared, engine.registry, values, top_k=body.explain_top_k,
                      output=np.asarray([row["raw_output"]], dtype=np.float64))
        elapsed = time.perf_counter() - began
        out["latency_ms"] = round(elapsed * 1000.0, 4)
        state.metrics.observe_stage("explain", elapsed)
        return out


class DecisionPublisher:
    """``trading_decision`` events to the audit bus (``SIGSERVE_AUDIT_BUS``), off the response
    path: a bounded queue and one task that connects on first use; a full queue or a bus that
    is down drops the event and counts it (``sigserve_decision_events_total{outcome}``)."""

    def __init__(self, url: str, subject: str, metrics: Any, maxsize: int = 10_000) -> None:
        from prometheus_client import Counter

        self.url = url
        self.subject = subject
        self.maxsize = maxsize
        self.queue: asyncio.Queue[tuple[str, bytes, str]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.bus: Any = None
        self._stream = False  # the durable stream of the events is ensured
        self.stream = "DECISIONS_" + re.sub(r"[^A-Za-z0-9_-]", "_", subject)[:100]
        self.counter = Counter("sigserve_decision_events", "trading_decision events, by outcome",
                               ["outcome"], registry=metrics.registry)
        self.sent = self.dropped = 0

    def submit(self, answer: dict[str, Any], on_close: list[Any]) -> None:
        """Queue the event of one answered decision; ``on_close``: the services' close hooks."""
        from .responses import dumps

        if self.queue is None or self.task is None or self.task.done():
            self.queue = asyncio.Queue(maxsize=self.maxsize)
            self.task = asyncio.get_running_loop().create_task(self._run(), name="decision-events")
            on_close.append(self.stop)
        meta = answer["metadata"]
        explanation = meta.get("explanation") or {}
        event = {
            "event": "trading_decision", "decision_id": answer["decision_id"],
            "symbol": answer["symbol"], "action": answer["action"],
            "quantity": answer["recommended_quantity"], "confidence": answer["confidence"],
            "regime_probs": answer["regime_probabilities"], "strategy_weights": answer["strategy_weights"],
            "top_features": explanation.get("top_features"), "risk_checks": answer["risk_validation"],
            "signal_id": meta["signal_id"], "model_name": meta["model_name"],
            "model_version": meta["model_version"], "model_sha256": meta["model_sha256"],
            "timestamp": meta["timestamp"], "emitted_at": time.time(),
        }
        try:
            self.queue.put_nowait((f"{self.subject}.{answer['symbol']}", dumps(event), answer["decision_id"]))
        except asyncio.QueueFull:
            self.dropped += 1
            self.counter.labels("dropped").inc()

    async def stop(self, drain_s: float = 2.0) -> None:
        """Send what is queued (``drain_s`` at most), then close the bus connection."""
        queue, task = self.queue, self.task
        if queue is not None and task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await queue.join()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.task = None
        bus, self.bus, self._stream = self.bus, None, False
        if bus is not None:
            with contextlib.suppress(Exception):
                await bus.close()

    async def _run(self) -> None:
        from ..bus.base import open_bus

        queue = self.queue
        assert queue is not None
        while True:
            subject, data, decision_id = await queue.get()
            try:
                if self.bus is None:
                    bus = open_bus(self.url)
                    await bus.connect()
                    self.bus, self._stream = bus, False
                if self.bus.durable and not self._stream:
                    await self.bus.ensure_stream(self.stream, [f"{self.subject}.>"])
                    self._stream = True
                if self.bus.durable:
                    await (await self.bus.publish_durable(subject, data, msg_id=decision_id))
                else:
                    await self.bus.publish(subject, data)
                self.sent += 1
                self.counter.labels("sent").inc()
            except Exception as exc:  # the bus is down: the decision was answered; count the loss
                self.dropped += 1
                self.counter.labels("failed").inc()
                log.warning("trading_decision event not sent: %s", exc)
                with contextlib.suppress(Exception):
                    if self.bus is not None:
                        await self.bus.close()
                self.bus = None
            finally:
                queue.task_done()
