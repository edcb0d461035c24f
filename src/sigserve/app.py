"""Wiring: settings -> store -> registry -> engine, opened once and closed once.

Usage::

    async with Services.open(Settings()) as services:
        await services.engine.predict_bar(...)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .config import Settings
from .engine import Engine
from .registry.models import ModelRegistry
from .stores import Store, open_store


@dataclass
class Services:
    settings: Settings
    store: Store
    registry: ModelRegistry
    engine: Engine
    # run (newest first) before the store closes: background workers drain and stop here
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, store: Store | None = None) -> AsyncIterator[Services]:
        """The services on ``settings``' store, or on ``store`` (not yet opened: this opens and
        closes it), e.g. the stream worker's DuckDB store in a child process."""
        settings.home.mkdir(parents=True, exist_ok=True)
        store = store if store is not None else open_store(settings.store_url)
        await store.open()
        try:
            registry = ModelRegistry(store, settings)
            services = cls(settings, store, registry, Engine(store, registry, settings.prepared_ttl_s))
            try:
                yield services
            finally:
                for hook in reversed(services.on_close):
                    try:
                        await hook()
                    except Exception:  # a worker that fails to stop never keeps the store open
                        logging.getLogger("sigserve").exception("a close hook failed")
        finally:
            await store.close()
