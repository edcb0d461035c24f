"""``LeanRoute``: an APIRoute documented like any other, served without FastAPI's per-request
dependency machinery.

FastAPI reads the body, decodes the JSON, solves the dependency graph and validates the result
field by field: about as much time as the whole one-bar prediction. A LeanRoute's endpoint has
one of the signatures ``()``, ``(request)``, ``(body)`` or ``(body, request)``, where ``body`` is a
pydantic model: the body is decoded and validated in one pass by pydantic-core
(``model_validate_json``), and a failure is the same ``RequestValidationError`` (422
``validation_error``) as anywhere else. The OpenAPI schema is generated from the signature as for
any route.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, get_type_hints

import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ValidationError

MAX_BODY_BYTES = 16 * 1024 * 1024


class BodyTooLarge(ValidationError):
    http_status = 413


def _too_large(size: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is over {MAX_BODY_BYTES} bytes",
                        details={"max_bytes": MAX_BODY_BYTES, "bytes": size})


class LeanRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint
        hints = get_type_hints(endpoint)
        names = list(inspect.signature(endpoint).parameters)
        model: type[pydantic.BaseModel] | None = None
        for name in names:
            hint = hints.get(name)
            if isinstance(hint, type) and issubclass(hint, pydantic.BaseModel):
                model = hint
        kinds = tuple("body" if hints.get(n) is model else "request" for n in names)
        if kinds not in ((), ("request",), ("body",), ("body", "request")) or (
                model is None and "body" in kinds):
            raise TypeError(f"a LeanRoute endpoint takes (), (request), (body) or (body, request):"
                            f" {endpoint.__name__}{kinds}")
        wants_request = "request" in kinds

        if model is None:
            async def plain(request: Request) -> Response:
                result: Response = await (endpoint(request) if wants_request else endpoint())
                return result

            return plain

        validate = model.model_validate_json

        async def with_body(request: Request) -> Response:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                raise _too_large(int(declared))
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise _too_large(len(raw))
            try:
                body = validate(raw)
            except pydantic.ValidationError as exc:
                errors = exc.errors(include_url=False, include_input=False, include_context=False)
                for error in errors:
                    error["loc"] = ("body", *error["loc"])
                raise RequestValidationError(errors) from None
            result: Response = await (endpoint(body, request) if wants_request else endpoint(body))
            return result

        return with_body
