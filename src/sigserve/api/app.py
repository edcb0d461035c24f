"""``create_app``: the ASGI app over one opened set of services.

Three layers, outermost first:

1. the edge (:class:`.middleware.EdgeMiddleware`): request id, bearer auth, the 500 safety net,
   request latency metrics;
2. the routes of the route table, matched by a dict lookup (a regex for a path with parameters)
   and served by :func:`.lean.compile_handler`; errors, 404 ``route_not_found`` and 405
   ``method_not_allowed`` are rendered as envelopes here;
3. ``/docs`` and ``/openapi.json`` (and any route declared the ordinary way) go to a FastAPI app
   built from the same route table (:mod:`.openapi_app`) on the first request that needs it.

Startup (the ASGI lifespan, or :meth:`SigserveApp.running`) opens the store, the registry and the
engine once (the engine keeps resolved signals for ``SIGSERVE_SERVER_PREPARED_TTL_S`` and reports
its stage timings to the metrics), then loads and verifies the default signal's model and runs one
prediction through it, so that the first request pays no load. FastAPI (~0.25 s of imports) is not
loaded until a request needs the schema: a server answers predictions without it.

Usage::

    uvicorn sigserve.api.app:create_app --factory       # settings from SIGSERVE_*
    sigserve serve --port 8000                          # the same, through the CLI

    app = create_app(Settings())
    async with app.running():                           # in tests: startup and shutdown
        ...
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..app import Services
from ..config import DEV_TOKEN_SENTINEL, Settings
from ..domain import FLAT, FeatureBatch, Source
from ..errors import SigserveError
from ..timeutil import TS_DTYPE
from .errors import METHOD_NOT_ALLOWED, ROUTE_NOT_FOUND, error_body, error_response, request_id_of
from .lean import Handler, RouteTable, compile_handler, path_params, path_regex
from .metrics import Metrics
from .middleware import EdgeMiddleware
from .responses import JSONBytes
from .routes import build
from .state import ServerState

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("sigserve.api")


DOC_PATHS = frozenset({"/docs", "/openapi.json"})  # served by the FastAPI app


class HotRoute:
    """A route as the edge serves it: ``path`` (the template) is the metrics' route label;
    ``handler`` None hands the request to the FastAPI app."""

    __slots__ = ("handler", "path")

    def __init__(self, path: str, handler: Handler | None) -> None:
        self.path = path
        self.handler = handler


class SigserveApp:
    """The ASGI application (see the module docstring). ``state.sigserve`` is the
    :class:`.state.ServerState` its routes share."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.server_state = ServerState(settings, self.metrics)
        self.state = SimpleNamespace(sigserve=self.server_state)
        self.table = RouteTable()
        build(self.table, self.server_state)
        self._exact: dict[str, dict[str, HotRoute]] = {}
        self._templates: list[tuple[re.Pattern[str], dict[str, HotRoute]]] = []
        by_path: dict[str, dict[str, HotRoute]] = {}
        for spec in self.table.routes:
            params = path_params(spec.path)
            handler = compile_handler(spec.endpoint, params) if spec.lean else None
            methods = by_path.get(spec.path)
            if methods is None:
                methods = by_path[spec.path] = {}
                if params:
                    self._templates.append((path_regex(spec.path), methods))
                else:
                    self._exact[spec.path] = methods
            for method in spec.methods:
                methods[method] = HotRoute(spec.path, handler)
        self._openapi_app: FastAPI | None = None
        self._openapi_lock = threading.Lock()
        self._edge = EdgeMiddleware(self._dispatch, token=settings.auth_token, metrics=self.metrics,
                                    requests=self.server_state.requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self._edge(scope, receive, send)

    # --- requests ------------------------------------------------------------------------
    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        methods = self._exact.get(path)
        params: dict[str, str] | None = None
        if methods is None:
            for regex, candidate in self._templates:
                found = regex.match(path)
                if found is not None:
                    methods, params = candidate, found.groupdict()
                    break
        if methods is None or scope["type"] != "http":
            if path in DOC_PATHS or scope["type"] != "http":
                await self._forward(scope, receive, send)
            else:
                await self._refuse(scope, receive, send, 404, ROUTE_NOT_FOUND, f"no route {path}",
                                   {"path": path})
            return
        route = methods.get(scope["method"])
        if route is None:
            allow = sorted(methods)
            await self._refuse(scope, receive, send, 405, METHOD_NOT_ALLOWED,
                               f"{scope['method']} is not allowed on {path}; use {', '.join(allow)}",
                               {"method": scope["method"], "allow": allow}, {"Allow": ", ".join(allow)})
            return
        scope["route"] = route
        if params is not None:
            scope["path_params"] = params
        if route.handler is None:
            await self._forward(scope, receive, send)
            return
        try:
            response = await route.handler(Request(scope, receive))
        except SigserveError as exc:
            response = self._refusal(scope, exc)
        await response(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._openapi_app
        if app is None:
            app = await asyncio.to_thread(self.openapi_app)
        await app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str,
                      message: str, details: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.metrics.count_error(code)
        await error_response(status, code, message, details, request_id_of(scope), headers)(scope, receive, send)

    def _refusal(self, scope: Scope, exc: SigserveError) -> Response:
        self.metrics.count_error(exc.code)
        request_id = request_id_of(scope)
        if exc.http_status >= 500:
            log.warning("%s %s -> %s: %s (request %s)", scope["method"], scope["path"], exc.code,
                        exc.message, request_id, exc_info=exc.__cause__)
        return JSONBytes(error_body(exc, request_id), exc.http_status)

    def openapi_app(self) -> FastAPI:
        """The FastAPI app behind the edge (built once, on first call, from any thread)."""
        with self._openapi_lock:
            if self._openapi_app is None:
                from .openapi_app import build_openapi_app

                self._openapi_app = build_openapi_app(self.table, self.metrics, otel=self.settings.otel)
            return self._openapi_app

    @property
    def routes(self) -> list[Any]:
        """Every route, as FastAPI sees it (the lean ones included)."""
        return list(self.openapi_app().routes)

    def openapi(self) -> dict[str, Any]:
        schema: dict[str, Any] = self.openapi_app().openapi()
        return schema

    # --- lifespan ------------------------------------------------------------------------
    @asynccontextmanager
    async def running(self) -> AsyncIterator[SigserveApp]:
        """Open the services, warm the default signal up, and close them on exit."""
        settings = self.settings
        state = self.server_state
        async with Services.open(settings) as services:
            settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
            services.engine.prepared_ttl_s = settings.server_prepared_ttl_s
            batcher = None
            if settings.group_bars:
                from ..bar_batch import BarBatcher

                batcher = services.engine.bar_batcher = BarBatcher(
                    services.engine, on_group=self.metrics.bar_groups.observe,
                    linger_s=settings.group_linger_ms / 1000.0)
            state.services = services
            self.metrics.watch_store(services.store)
            warmed = await warm_up(state)
            services.engine.observer = self.metrics.observe_stage
            # What startup allocated lives as long as the process: keep it out of the collector's
            # full passes (measured: a full pass over it paused a request for ~60 ms).
            gc.freeze()
            others = asyncio.get_running_loop().create_task(
                warm_in_background(state, skip=warmed), name="warm other signals")
            try:
                yield self
            finally:
                others.cancel()
                with suppress(asyncio.CancelledError):
                    await others
                if batcher is not None:
                    await batcher.stop()
                    services.engine.bar_batcher = None
                gc.unfreeze()
                self.metrics.watch_store(None)
                state.services = None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        context = self.running()
        try:
            await context.__aenter__()
        except BaseException as exc:
            await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
            raise
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await context.__aexit__(None, None, None)
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": f"{type(exc).__name__}: {exc}"})
            raise
        await send({"type": "lifespan.shutdown.complete"})


def create_app(settings: Settings | None = None) -> SigserveApp:
    """The app; refuses (``validation_error``) a token that cannot protect it (see
    ``Settings.check_serving``)."""
    settings = settings or Settings()
    settings.check_serving()
    if settings.auth_token.strip() == DEV_TOKEN_SENTINEL:
        log.warning("serving with the development token; set SIGSERVE_AUTH_TOKEN outside development")
    return SigserveApp(settings)


async def warm_up(state: ServerState) -> str | None:
    """Resolve the default signal, load and verify its model, and predict one row through it;
    its id, or None when there is none.

    A default signal that cannot be served does not stop the server: its requests get the
    refusal's code; the log says why now.
    """
    engine = state.engine
    try:
        signal_id = await state.default_signal()
    except SigserveError as exc:
        log.info("no default signal to warm up: %s", exc.message)
        return None
    try:
        prepared = await engine.prepare(signal_id)
    except SigserveError as exc:
        log.warning("the default signal %r cannot be served: %s", signal_id, exc)
        return signal_id
    names = prepared.read_names
    row = FeatureBatch("warm-up", prepared.definition.interval, np.zeros(1, dtype=TS_DTYPE),
                       np.zeros((1, len(names))), names, np.array([""], dtype=object),
                       np.array([1.0]))
    try:
        engine.compute(prepared, row, FLAT, Source.STREAM)
    except Exception as exc:  # a model that fails on zeros still serves real rows
        log.warning("warm-up prediction of %r failed: %s", signal_id, exc)
    # One stored bar through the read path (feature and candle read, position read, predict,
    # policy; no write): the store's first statements pay their one-time setup here, not on the
    # first /inference/run (whose budget they once used up).
    definition = prepared.definition
    if not definition.symbols:
        return signal_id
    symbol = definition.symbols[0]
    try:
        newest = await engine.newest_bar(symbol, definition.interval)
        await engine.predict_bar(signal_id, symbol, definition.interval, newest, write=False)
    except SigserveError as exc:
        log.info("no stored bar of %s to warm the read path up with: %s", symbol, exc.message)
    return signal_id


async def warm_in_background(state: ServerState, *, skip: str | None) -> None:
    """After startup: the other active signals, then Arrow for grouped bars."""
    await warm_other_signals(state, skip=skip)
    await import_arrow_for_groups(state)


async def warm_other_signals(state: ServerState, *, skip: str | None) -> int:
    """After startup, in the background: resolve the other active signals and load their models
    (as many as the model cache keeps, in the store's order); how many were warmed.

    Without it, the first requests for another signal paid its resolution and model load
    (~0.1 s for a compiled 300-tree model), and a burst of them ran past the deadline together.
    Requests that arrive meanwhile share the work under way (``Engine.prepare``,
    ``ModelRegistry.runtime``). A signal that cannot be served is logged and left to refuse.
    """
    engine = state.engine
    try:
        definitions = await state.svc.store.list_signals()
    except Exception as exc:  # best effort, as below
        log.info("could not list the signals to warm up: %s", exc)
        return 0
    room = max(engine.registry.cache_size - 1, 0)
    warmed = 0
    for definition in definitions:
        if warmed >= room:
            break
        if not definition.active or definition.signal_id == skip:
            continue
        # each resolution (store reads in the loop) waits for a gap between requests, up to 1 s
        await state.requests.idle(1.0)
        try:
            await engine.prepare(definition.signal_id)
        except SigserveError as exc:
            log.info("signal %r cannot be served yet: %s", definition.signal_id, exc.message)
            continue
        except Exception:  # best effort: a request for it resolves in line and gets the error
            log.exception("warming signal %r up failed", definition.signal_id)
            continue
        warmed += 1
    return warmed


async def import_arrow_for_groups(state: ServerState) -> None:
    """A group of bars reads and writes DuckDB through Arrow: import it after startup, in a gap
    between requests, not in the first group (measured: a 0.5 s answer) nor at startup (the cold
    start's budget)."""
    from ..stores import DuckDBStore

    if state.engine.bar_batcher is not None and isinstance(state.svc.store, DuckDBStore):
        await state.requests.idle(1.0)
        await asyncio.to_thread(importlib.import_module, "pyarrow")
