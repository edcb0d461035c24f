"""JSON responses rendered with orjson, and the error envelope as a response.

The hot endpoints return plain dicts through :class:`JSONResp`: no response-model validation,
no pydantic round trip (the models in :mod:`.schemas` document the shapes in OpenAPI only).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class JSONResp(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=_OPTIONS)
