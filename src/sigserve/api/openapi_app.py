"""The FastAPI app behind the edge: the OpenAPI schema, ``/docs``, and any route declared the
ordinary way (``RouteTable.get``...).

It registers every endpoint of the route table, the lean ones included (the schema documents
them; the edge serves them). It is built on the first request that needs it, in a worker thread:
importing FastAPI costs ~0.25 s, a quarter of the cold-start budget, and a build in the
background right after startup was measured to delay the first predictions past their deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import __version__
from ..errors import InternalError, SigserveError
from .auth import PUBLIC_PATHS
from .errors import METHOD_NOT_ALLOWED, ROUTE_NOT_FOUND, error_body, error_response, request_id_of
from .lean import RouteTable, compile_handler, field_errors, invalid_request, path_params
from .metrics import Metrics
from .responses import JSONResp
from .routes import docs_page

log = logging.getLogger("sigserve.api")

DESCRIPTION = """Live, auditable trading signals from registered models.

Every endpoint but `/healthz` and `/readyz` needs `Authorization: Bearer <SIGSERVE_AUTH_TOKEN>`.
Every non-2xx answer is `{"error_code", "message", "details", "request_id"}`; branch on
`error_code`. `X-Request-ID` is echoed, or generated, on every response."""


class LeanRoute(APIRoute):
    """An APIRoute documented like any other, served by :func:`.lean.compile_handler`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return compile_handler(self.endpoint, path_params(self.path))


def build_openapi_app(table: RouteTable, metrics: Metrics, *, otel: bool = False) -> FastAPI:
    """A FastAPI app with every route of ``table``, the error handlers and ``/docs``."""
    # FastAPI's native OpenTelemetry asks the global providers on every request unless it is off
    # (older FastAPI versions keep the option in ``app.extra``, unused).
    telemetry: Any = {"tracing": otel, "metrics": otel, "logs": otel}
    app = FastAPI(title="sigserve", version=__version__, description=DESCRIPTION,
                  docs_url=None, redoc_url=None, default_response_class=JSONResp,
                  telemetry=telemetry)
    install_error_handlers(app, metrics)
    for spec in table.routes:
        options = dict(spec.options)
        if spec.lean:
            options.setdefault("response_model", None)
            options["route_class_override"] = LeanRoute
        app.router.add_api_route(spec.path, spec.endpoint, methods=list(spec.methods), **options)

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

    return app


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Register the exception handlers that turn errors into envelopes."""

    async def sigserve_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SigserveError)
        metrics.count_error(exc.code)
        if exc.http_status >= 500:
            log.warning("%s %s -> %s: %s (request %s)", request.method, request.url.path,
                        exc.code, exc.message, request_id_of(request.scope), exc_info=exc.__cause__)
        return Response(error_body(exc, request_id_of(request.scope)), status_code=exc.http_status,
                        media_type="application/json")

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return await sigserve_error(request, invalid_request(field_errors(list(exc.errors()))))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        headers = dict(exc.headers or {})
        if status == 404:
            code, message = ROUTE_NOT_FOUND, f"no route {request.url.path}"
            details: dict[str, Any] = {"path": request.url.path}
        elif status == 405:
            code = METHOD_NOT_ALLOWED
            allowed = headers.get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
            details = {"method": request.method, "allow": [m.strip() for m in allowed.split(",") if m]}
        elif status >= 500:
            code, message, details = InternalError.code, "an unexpected error occurred", {}
        else:
            code, message, details = "validation_error", str(exc.detail), {"status": status}
        metrics.count_error(code)
        return error_response(status, code, message, details, request_id_of(request.scope), headers)

    app.add_exception_handler(SigserveError, sigserve_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
