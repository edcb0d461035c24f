"""Lean endpoints: the route table and the handlers that serve it without FastAPI.

An endpoint is declared once, on a :class:`RouteTable`, with the arguments FastAPI's decorators
take (``tags``, ``responses``, ...). The edge serves every *lean* endpoint itself: a dict lookup (or,
for a path with parameters, a regex), the body decoded and validated in one pass by pydantic-core
(``model_validate_json``), no dependency solving, no router walk. The FastAPI app behind the
edge (built on first need, see :mod:`.openapi_app`) registers the same endpoints for the OpenAPI
schema and ``/docs``, and serves the routes declared the ordinary way (``table.get``...).

A lean endpoint takes its path parameters by keyword, and then one of ``()``, ``(request)``,
``(body)`` or ``(body, request)``, where ``body`` is a pydantic model. A body that fails validation is a
``validation_error`` whose ``details.errors`` lists ``loc``, ``msg`` and ``type`` per field
(never the input itself), the same answer FastAPI's own validation gives.

Usage::

    table = RouteTable()

    @table.lean("/inference/run", ["POST"], ["inference"], responses={...})
    async def run(body: RunRequest, request: Request) -> Response: ...

    @table.lean("/models/{name}", ["GET"], ["models"])
    async def show(name: str) -> Response: ...
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import pydantic
from starlette.requests import ClientDisconnect, Request
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


_PATH_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)}")


def path_params(path: str) -> tuple[str, ...]:
    """The parameter names of a path template: ``/models/{name}`` -> ``("name",)``."""
    return tuple(_PATH_PARAM.findall(path))


def path_regex(path: str) -> re.Pattern[str]:
    """A template as a regex; a parameter matches one non-empty segment (as Starlette's ``str``)."""
    parts = _PATH_PARAM.split(path)
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts))
    return re.compile(f"^{pattern}$")


def body_model(endpoint: Endpoint, params: tuple[str, ...] = ()) -> tuple[type[pydantic.BaseModel] | None, bool]:
    """The endpoint's body model (or None) and whether it takes the request; refuses other
    signatures. ``params`` are the path parameters (keyword arguments, strings)."""
    hints = get_type_hints(endpoint)
    names = [n for n in inspect.signature(endpoint).parameters if n not in params]
    model: type[pydantic.BaseModel] | None = None
    for name in names:
        hint = hints.get(name)
        if isinstance(hint, type) and issubclass(hint, pydantic.BaseModel):
            model = hint
    kinds = tuple("body" if hints.get(n) is model else "request" for n in names)
    if kinds not in ((), ("request",), ("body",), ("body", "request")) or (
            model is None and "body" in kinds):
        raise TypeError(f"a lean endpoint takes path parameters and (), (request), (body) or"
                        f" (body, request): {endpoint.__name__}{kinds}")
    return model, "request" in kinds


async def read_body(request: Request) -> bytes:
    """The whole request body, refused (413) past ``MAX_BODY_BYTES`` by its declared length
    before a byte is read, or as it arrives. Reads the ASGI messages itself (a one-message body
    is one ``receive``), and leaves the body on the request as ``Request.body()`` would."""
    for name, value in request.scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > MAX_BODY_BYTES:
                raise _too_large(int(value))
            break
    receive = request.receive
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    raw: bytes = message.get("body", b"")
    if message.get("more_body", False):
        chunks = [raw]
        size = len(raw)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
    elif len(raw) > MAX_BODY_BYTES:
        raise _too_large(len(raw))
    request._body = raw  # what Request.body() returns from now on
    return raw


def compile_handler(endpoint: Endpoint, params: tuple[str, ...] = ()) -> Handler:
    """``endpoint`` as a ``(request) -> Response`` coroutine function (signatures above); path
    parameters come from ``request.path_params``."""
    model, wants_request = body_model(endpoint, params)
    if model is None:
        async def plain(request: Request) -> Response:
            named = {p: request.path_params[p] for p in params}
            result: Response = await (endpoint(request, **named) if wants_request else endpoint(**named))
            return result

        return plain

    validate = model.model_validate_json

    async def with_body(request: Request) -> Response:
        raw = await read_body(request)
        try:
            body = validate(raw)
        except pydantic.ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            raise invalid_request(field_errors([{**e, "loc": ("body", *e["loc"])} for e in errors])) from None
        named = {p: request.path_params[p] for p in params}
        result: Response = await (endpoint(body, request, **named) if wants_request
                                  else endpoint(body, **named))
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
        """Declare a lean endpoint (the edge serves it); ``{name}`` segments are path parameters
        passed by keyword."""
        def register(endpoint: Endpoint) -> Endpoint:
            body_model(endpoint, path_params(path))  # refuse a wrong signature at declaration
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
