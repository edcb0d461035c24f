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

from typing import Any

from starlette.responses import Response
from starlette.types import Send

from ..errors import InternalError, SigserveError
from .responses import dumps

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
