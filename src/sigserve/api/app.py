"""``create_app``: the FastAPI app over one opened set of services.

The lifespan opens the store, the registry and the engine once (the engine keeps resolved signals
for ``SIGSERVE_SERVER_PREPARED_TTL_S`` and reports its stage timings to the metrics), then loads
and verifies the default signal's model and runs one prediction through it, so that the first
request pays no load. Heavy imports happen here, at startup, never on a request.

Usage::

    uvicorn sigserve.api.app:create_app --factory       # settings from SIGSERVE_*
    sigserve serve --port 8000                          # the same, through the CLI
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response

from .. import __version__
from ..app import Services
from ..config import DEV_TOKEN_SENTINEL, Settings
from ..domain import FLAT, FeatureBatch, Source
from ..errors import SigserveError
from ..timeutil import TS_DTYPE
from . import errors as api_errors
from .auth import PUBLIC_PATHS
from .metrics import Metrics
from .middleware import EdgeMiddleware
from .responses import JSONResp
from .routes import build, docs_page
from .state import ServerState

log = logging.getLogger("sigserve.api")

DESCRIPTION = """Live, auditable trading signals from registered models.

Every endpoint but `/healthz` and `/readyz` needs `Authorization: Bearer <SIGSERVE_AUTH_TOKEN>`.
Every non-2xx answer is `{"error_code", "message", "details", "request_id"}`; branch on
`error_code`. `X-Request-ID` is echoed, or generated, on every response."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; refuses (``validation_error``) a token that cannot protect it (see
    ``Settings.check_serving``)."""
    settings = settings or Settings()
    settings.check_serving()
    if settings.auth_token.strip() == DEV_TOKEN_SENTINEL:
        log.warning("serving with the development token; set SIGSERVE_AUTH_TOKEN outside development")
    metrics = Metrics()
    state = ServerState(settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with Services.open(settings) as services:
            settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
            services.engine.prepared_ttl_s = settings.server_prepared_ttl_s
            state.services = services
            await warm_up(state)
            services.engine.observer = metrics.observe_stage
            # What startup allocated lives as long as the process: keep it out of the collector's
            # full passes (measured: a full pass over it paused a request for ~60 ms).
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()
                state.services = None

    # FastAPI's native OpenTelemetry asks the global providers on every request unless it is off
    # (older FastAPI versions keep the option in ``app.extra``, unused).
    telemetry: Any = {"tracing": settings.otel, "metrics": settings.otel, "logs": settings.otel}
    app = FastAPI(title="sigserve", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=JSONResp, telemetry=telemetry)
    app.state.sigserve = state
    api_errors.install(app, metrics)
    build(app, state)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {})
            components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
            schema["security"] = [{"bearer": []}]
            for path in PUBLIC_PATHS:
                for operation in schema.get("paths", {}).get(path, {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return docs_page(openapi())

    app.add_middleware(EdgeMiddleware, token=settings.auth_token, metrics=metrics)
    return app


async def warm_up(state: ServerState) -> None:
    """Resolve the default signal, load and verify its model, and predict one row through it.

    A default signal that cannot be served does not stop the server: its requests get the
    refusal's code; the log says why now.
    """
    engine = state.engine
    try:
        signal_id = await state.default_signal()
    except SigserveError as exc:
        log.info("no default signal to warm up: %s", exc.message)
        return
    try:
        prepared = await engine.prepare(signal_id)
    except SigserveError as exc:
        log.warning("the default signal %r cannot be served: %s", signal_id, exc)
        return
    names = prepared.read_names
    row = FeatureBatch("warm-up", prepared.definition.interval, np.zeros(1, dtype=TS_DTYPE),
                       np.zeros((1, len(names))), names, np.array([""], dtype=object),
                       np.array([1.0]))
    try:
        engine.compute(prepared, row, FLAT, Source.STREAM)
    except Exception as exc:  # a model that fails on zeros still serves real rows
        log.warning("warm-up prediction of %r failed: %s", signal_id, exc)
