"""The edge middleware (pure ASGI: no BaseHTTPMiddleware task and stream per request).

For every HTTP request it: takes ``X-Request-ID`` (or makes one) and sets it on the response;
refuses a request without the bearer token (401 envelope, ``WWW-Authenticate``) unless the path is
public; turns any exception that escaped the handlers into a 500 ``internal_error`` envelope (the
traceback goes to the log, never to the caller); and observes the request latency by route
template.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InternalError, Unauthorized
from ..idle import IdleGate
from ..ids import random_hex
from .auth import CHALLENGE, CHALLENGE_INVALID, MESSAGES, PUBLIC_PATHS, TokenCheck
from .errors import REQUEST_ID_KEY, STARTED_KEY, envelope, send_error
from .metrics import Metrics
from .responses import dumps

log = logging.getLogger("sigserve.api")

_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, token: str, metrics: Metrics, requests: IdleGate) -> None:
        self.app = app
        self.auth = TokenCheck(token)
        self.metrics = metrics
        self.requests = requests  # requests in flight, for background work to wait for a gap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope[STARTED_KEY] = started
        given: bytes | None = None
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value
            elif name == b"authorization":
                authorization = value
        if given is not None and _REQUEST_ID_RE.match(given):
            request_id, raw_id = given.decode("ascii"), given
        else:
            request_id = random_hex()
            raw_id = request_id.encode("ascii")
        scope[REQUEST_ID_KEY] = request_id
        id_header = (b"x-request-id", raw_id)
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        requests = self.requests
        requests.enter()
        try:
            refused = None if scope["path"] in PUBLIC_PATHS else self.auth.check(authorization)
            if refused is not None:
                self.metrics.count_error(Unauthorized.code)
                body = dumps(envelope(Unauthorized.code, MESSAGES[refused], {}, request_id))
                challenge = CHALLENGE if refused == "missing" else CHALLENGE_INVALID
                await send_error(send_with_id, 401, body, [(b"www-authenticate", challenge)])
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if response_started:
                raise
            log.error("unhandled %s on %s %s (request %s)", type(exc).__name__, scope.get("method"),
                      scope.get("path"), request_id, exc_info=exc)
            self.metrics.count_error(InternalError.code)
            body = dumps(envelope(InternalError.code,
                                  "an unexpected error occurred; quote the request_id to report it",
                                  {}, request_id))
            await send_error(send_with_id, 500, body)
        finally:
            requests.leave()
            route: Any = scope.get("route")
            method = scope.get("method", "GET")
            self.metrics.observe_request(
                route.path if route is not None else "unmatched",
                method if method in _METHODS else "other", status, time.perf_counter() - started)
