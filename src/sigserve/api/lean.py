"""Lean endpoints: the route table and the handlers that serve it without FastAPI.

An endpoint is declared once, on a :class:`RouteTable`, with the arguments FastAPI's decorators
take (``tags``, ``responses``, ...). The edge serves every *lean* endpoint (a fixed path) itself:
one dict lookup, the body decoded and validated in one pass by pydantic-core
(``model_validate_json``), no dependency solving, no router walk. The FastAPI app behind the
edge (built on first need, see :mod:`.openapi_app`) registers the same endpoints for the OpenAPI
schema and ``/docs``, and serves the routes that are not lean (path parameters).

A lean endpoint has one of the signatures ``()``, ``(request)``, ``(body)`` or
``(body, request)``, where ``body`` is a pydantic model. A body that fails validation is a
``validation_error`` whose ``details.errors`` lists ``loc``, ``msg`` and ``type`` per field
(never the input itself), the same answer FastAPI's own validation gives.

Usage::

    table = RouteTable()

    @table.lean("/inference/run", ["POST"], ["inference"], responses={...})
    async def run(body: RunRequest, request: Request) -> Response: ...

    @table.get("/models/{name}", tags=["models"])      # served by FastAPI
    async def show(name: str) -> Response: ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import pydantic
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ValidationError

MAX_BODY_BYTES = 16 * 1024 * 1024

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
Endpoint = Callable[..., Any]


class BodyTooLarge(ValidationError):
    http_status = 413


def _too_large(size: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is over {MAX_BODY_BYTES} bytes",
                        details={"max_bytes": MAX_BODY_BYTES, "bytes": size})


def field_errors(errors: list[Any]) -> list[dict[str, Any]]:
    """pydantic's (or FastAPI's) error list as ``{loc, msg, type}`` dicts: no input echoed."""
    return [{"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", "")),
             "type": str(error.get("type", ""))} for error in errors]


def invalid_request(errors: list[dict[str, Any]]) -> ValidationError:
    """The ``validation_error`` for a list of field errors (see :func:`field_errors`)."""
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    message = f"invalid request: {where}: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return ValidationError(message, details={"errors": errors})


def body_model(endpoint: Endpoint) -> tuple[type[pydantic.BaseModel] | None, bool]:
    """The endpoint's body model (or None) and whether it takes the request; refuses other
    signatures."""
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
        raise TypeError(f"a lean endpoint takes (), (request), (body) or (body, request):"
                        f" {endpoint.__name__}{kinds}")
    return model, "request" in kinds


def compile_handler(endpoint: Endpoint) -> Handler:
    """``endpoint`` as a ``(request) -> Response`` coroutine function (signatures above)."""
    model, wants_request = body_model(endpoint)
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
            raise invalid_request(field_errors([{**e, "loc": ("body", *e["loc"])} for e in errors])) from None
        result: Response = await (endpoint(body, request) if wants_request else endpoint(body))
        return result

    return with_body


@dataclass(frozen=True)
class RouteSpec:
    """One declared endpoint. ``lean`` ones are served by the edge; the others by FastAPI."""

    path: str
    methods: tuple[str, ...]
    endpoint: Endpoint
    lean: bool
    options: dict[str, Any] = field(default_factory=dict)  # FastAPI's add_api_route keywords


class RouteTable:
    """The endpoints of the app, declared without importing FastAPI."""

    def __init__(self) -> None:
        self.routes: list[RouteSpec] = []

    def lean(self, path: str, methods: list[str], tags: list[Any],
             **options: Any) -> Callable[[Endpoint], Endpoint]:
        """Declare a lean endpoint at a fixed path (the edge serves it)."""
        if "{" in path:
            raise ValueError(f"a lean route has a fixed path: {path}")

        def register(endpoint: Endpoint) -> Endpoint:
            body_model(endpoint)  # refuse a wrong signature at declaration
            self.routes.append(RouteSpec(path, tuple(m.upper() for m in methods), endpoint, True,
                                         {"tags": tags, **options}))
            return endpoint

        return register

    def route(self, path: str, methods: list[str], **options: Any) -> Callable[[Endpoint], Endpoint]:
        """Declare an ordinary FastAPI endpoint (path parameters, dependencies)."""
        def register(endpoint: Endpoint) -> Endpoint:
            self.routes.append(RouteSpec(path, tuple(m.upper() for m in methods), endpoint, False,
                                         options))
            return endpoint

        return register

    def get(self, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
        return self.route(path, ["GET"], **options)

    def post(self, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
        return self.route(path, ["POST"], **options)


def lean(table: RouteTable, path: str, methods: list[str], tags: list[Any],
         **options: Any) -> Callable[[Endpoint], Endpoint]:
    """``table.lean(...)`` as a function (the routes modules' decorator)."""
    return table.lean(path, methods, tags, **options)
