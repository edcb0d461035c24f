"""Wiring: settings -> store -> registry -> engine, opened once and closed once.

Usage::

    async with Services.open(Settings()) as services:
        await services.engine.predict_bar(...)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

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

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Services]:
        settings.home.mkdir(parents=True, exist_ok=True)
        store = open_store(settings.store_url)
        await store.open()
        try:
            registry = ModelRegistry(store, settings)
            yield cls(settings, store, registry, Engine(store, registry, settings.prepared_ttl_s))
        finally:
            await store.close()
