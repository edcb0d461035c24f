"""JSON responses rendered with orjson, and the error envelope as a response.

The hot endpoints return plain dicts through :class:`JSONResp`: no response-model validation,
no pydantic round trip (the models in :mod:`.schemas` document the shapes in OpenAPI only).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class JSONResp(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)


_JSON_TYPE = (b"content-type", b"application/json")


class JSONBytes(Response):
    """JSON already rendered (by :func:`dumps`): the hot endpoints' answer. Its headers are built in
    one step and it is sent as its two ASGI messages, where ``Response`` checks and builds more.

    Usage::

        return JSONBytes(dumps(row))
    """

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200) -> None:
        self.body = body
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(b"content-length", str(len(body)).encode()), _JSON_TYPE]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=_OPTIONS)
