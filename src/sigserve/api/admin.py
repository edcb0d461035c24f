"""Admin endpoints: rollouts of model versions (champion / challenger / shadow), audited.

Every endpoint needs the bearer token (the edge checks it, like every path but /healthz and
/readyz). Each change is stored with an audit row whose actor is ``token:<SIGSERVE_AUTH_TOKEN_LABEL>``
(plus the ``X-Sigserve-Actor`` header when sent, e.g. ``token:ops (alice)``). A change is loaded,
sha-verified and warmed up before it is stored, then swapped into this server's engine: the next
request uses it. Other servers see it within ``SIGSERVE_SERVER_PREPARED_TTL_S``.

===================================================== =============================================
``GET  /admin/rollouts``                              every signal's traffic policy
``GET  /admin/rollouts/{signal_id}``                  policy, serving version, audit rows, live
                                                      shadow agreement of this server
``POST /admin/rollouts/{signal_id}/start``            ``{"version", "shadows"?, "share"?}``
``POST /admin/rollouts/{signal_id}/advance``          ``{"share"?}``: 10% -> 50% -> 100%
``POST /admin/rollouts/{signal_id}/promote``          the challenger becomes the champion
``POST /admin/rollouts/{signal_id}/rollback``         the champion takes all traffic again
``GET  /admin/rollouts/{signal_id}/report``           ``?start=&end=&horizon=``: comparison report
===================================================== =============================================
"""

from __future__ import annotations

import asyncio
import re
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ValidationError
from .lean import RouteTable, lean
from .responses import JSONResp
from .state import ServerState

_ACTOR_RE = re.compile(r"^[A-Za-z0-9 ._@:-]{1,64}$")


class RolloutStartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, description="the candidate model version (same model name)")
    shadows: list[int] = Field(default_factory=list, max_length=16,
                               description="further versions predicted as shadows only")
    share: float = Field(default=0.0, ge=0.0, le=1.0,
                         description="0: shadow stage; else the challenger's traffic share now")


class RolloutAdvanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    share: float | None = Field(default=None, ge=0.0, le=1.0,
                                description="default: the next step of 10% -> 50% -> 100%")


def ensure_shadow_runner(state: ServerState) -> None:
    """Start this server's background shadow runner once (bounded queue, drops counted)."""
    engine = state.engine
    if engine.shadow_runner is None:
        settings = state.settings
        linger_s = settings.shadow_linger_ms / 1000.0
        runner: Any
        if settings.shadow_worker == "process":
            from ..routing.shadow_process import ShadowProcessRunner

            cpus = {int(c) for c in settings.shadow_cpus.split(",")} if settings.shadow_cpus else None
            runner = ShadowProcessRunner(engine, settings, maxsize=settings.shadow_queue_size,
                                         metrics=state.metrics, linger_s=linger_s, cpus=cpus)
        else:
            from ..routing.shadow import ShadowRunner

            runner = ShadowRunner(engine, maxsize=settings.shadow_queue_size, metrics=state.metrics,
                                  linger_s=linger_s, gate=state.requests)
        runner.start()
        engine.shadow_runner = runner
        state.svc.on_close.append(runner.stop)  # drain (2 s at most) before the store closes


def _actor(state: ServerState, request: Request) -> str:
    actor = f"token:{state.settings.auth_token_label}"
    named = request.headers.get("x-sigserve-actor")
    if named:
        if not _ACTOR_RE.match(named):
            raise ValidationError("X-Sigserve-Actor must be 1-64 of letters, digits, space . _ @ : -",
                                  details={"header": "X-Sigserve-Actor"})
        actor += f" ({named})"
    return actor


def build_admin(table: RouteTable, state: ServerState) -> None:
    tags: list[str | Enum] = ["admin"]
    from .routes import errors_doc

    changes = asyncio.Lock()  # one change at a time: each reads the policy it replaces

    def service() -> Any:
        from ..routing.rollout import RolloutService

        ensure_shadow_runner(state)
        return RolloutService(state.engine, install=True)

    @lean(table, "/admin/rollouts", ["GET"], tags, response_model=None, responses=errors_doc(503))
    async def rollouts_list() -> Response:
        """Every signal's traffic policy (champion, challenger and share, shadows, stage)."""
        policies = await state.svc.store.list_traffic_policies()
        return JSONResp({"rollouts": [p.to_dict() for p in policies]})

    @lean(table, "/admin/rollouts/{signal_id}", ["GET"], tags, response_model=None,
          responses=errors_doc(404, 503))
    async def rollout_status(signal_id: str) -> Response:
        """A signal's policy, the version serving, the audit rows, and this server's live shadow
        comparison (bars, agreement rate, mean predict ms per shadow version)."""
        status = await service().status(signal_id)
        runner = state.engine.shadow_runner
        live = []
        if runner is not None:
            for (sid, served, version), (bars, agree, ms) in sorted(runner.compare.items()):
                if sid == signal_id and bars:
                    live.append({"served_version": served, "shadow_version": version, "bars": int(bars),
                                 "agreement_rate": round(agree / bars, 4),
                                 "mean_predict_ms": round(ms / bars, 4)})
            status["shadow_queue"] = {"dropped": runner.stats["dropped"],
                                      "predicted": runner.stats["predicted"],
                                      "failed": runner.stats["failed"],
                                      "batches": runner.stats["batches"]}
        status["live_shadow_comparison"] = live
        return JSONResp(status)

    @lean(table, "/admin/rollouts/{signal_id}/start", ["POST"], tags, response_model=None,
          responses=errors_doc(404, 409, 422, 502, 503))
    async def rollout_start(body: RolloutStartBody, request: Request, signal_id: str) -> Response:
        """Start a rollout: the candidate version as a shadow (or with ``share`` of the traffic)."""
        async with changes:
            return JSONResp(await service().apply(signal_id, "start", _actor(state, request),
                                                  version=body.version, shadows=body.shadows,
                                                  share=body.share))

    @lean(table, "/admin/rollouts/{signal_id}/advance", ["POST"], tags, response_model=None,
          responses=errors_doc(404, 409, 422, 502, 503))
    async def rollout_advance(body: RolloutAdvanceBody, request: Request, signal_id: str) -> Response:
        """The next stage: shadow -> canary 10% -> 50% -> 100% (or the ``share`` given)."""
        async with changes:
            return JSONResp(await service().apply(signal_id, "advance", _actor(state, request),
                                                  share=body.share))

    @lean(table, "/admin/rollouts/{signal_id}/promote", ["POST"], tags, response_model=None,
          responses=errors_doc(404, 409, 422, 502, 503))
    async def rollout_promote(request: Request, signal_id: str) -> Response:
        """The challenger becomes the champion (all traffic)."""
        async with changes:
            return JSONResp(await service().apply(signal_id, "promote", _actor(state, request)))

    @lean(table, "/admin/rollouts/{signal_id}/rollback", ["POST"], tags, response_model=None,
          responses=errors_doc(404, 409, 422, 503))
    async def rollout_rollback(request: Request, signal_id: str) -> Response:
        """Drop the challenger: the champion serves every request from the next one on."""
        async with changes:
            return JSONResp(await service().apply(signal_id, "rollback", _actor(state, request)))

    @lean(table, "/admin/rollouts/{signal_id}/report", ["GET"], tags, response_model=None,
          responses=errors_doc(404, 422, 503))
    async def rollout_report(request: Request, signal_id: str) -> Response:
        """Agreement rate, actions, latency and (where candles tell) hit rate and mean forward
        return per version, on the bars the versions both predicted. Query: start, end, horizon."""
        from ..routing.report import comparison_report
        from .routes import to_ts

        query = request.query_params
        start = to_ts(query["start"], "start") if query.get("start") else None
        end = to_ts(query["end"], "end") if query.get("end") else None
        horizon = query.get("horizon", "1")
        if not horizon.isdigit() or not 1 <= int(horizon) <= 10_000:
            raise ValidationError("horizon must be a bar count in 1..10000", details={"horizon": horizon})
        await service().status(signal_id)  # signal_not_found
        return JSONResp(await comparison_report(state.svc.store, signal_id, start=start, end=end,
                                                horizon=int(horizon)))
