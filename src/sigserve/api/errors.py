"""Every non-2xx answer is the envelope ``{"error_code", "message", "details", "request_id"}``.

Domain errors (:class:`sigserve.errors.SigserveError`) keep their code and HTTP status. The edge
adds the codes that only HTTP has:

=================== ====== ===========================================================
error_code          HTTP   when
=================== ====== ===========================================================
validation_error    422    the body or a parameter fails validation (field errors in
                           ``details.errors``: loc, msg, type; never the input itself)
route_not_found     404    no route has that path
method_not_allowed  405    the route exists, the method does not (``Allow`` header)
internal_error      500    anything else: ``details.request_id``, never a traceback
=================== ====== ===========================================================
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from ..errors import InternalError, SigserveError
from .metrics import Metrics
from .responses import dumps

log = logging.getLogger("sigserve.api")

REQUEST_ID_KEY = "sigserve.request_id"
STARTED_KEY = "sigserve.started"
ROUTE_NOT_FOUND = "route_not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"


def request_id_of(scope: Any) -> str:
    return str(scope.get(REQUEST_ID_KEY, ""))


def envelope(code: str, message: str, details: dict[str, Any], request_id: str) -> dict[str, Any]:
    if code == InternalError.code:
        details = {**details, "request_id": request_id}
    return {"error_code": code, "message": message, "details": details, "request_id": request_id}


def error_body(exc: SigserveError, request_id: str) -> bytes:
    return dumps(envelope(exc.code, exc.message, exc.details, request_id))


def error_response(status: int, code: str, message: str, details: dict[str, Any], request_id: str,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(envelope(code, message, details, request_id)), status_code=status,
                    headers=headers, media_type="application/json")


async def send_error(send: Send, status: int, body: bytes,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a whole JSON error response from pure ASGI code (auth, the 500 safety net)."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *(headers or ())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for error in exc.errors():
        out.append({"loc": [str(part) for part in error.get("loc", ())],
                    "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))})
    return out


def install(app: FastAPI, metrics: Metrics) -> None:
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
        metrics.count_error("validation_error")
        errors = _field_errors(exc)
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        message = f"invalid request: {where}: {first['msg']}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return error_response(422, "validation_error", message, {"errors": errors},
                              request_id_of(request.scope))

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
