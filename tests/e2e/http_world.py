"""A small, real world for the HTTP tests: a DuckDB home with candles and point-in-time features of a
synthetic market, a LightGBM model trained on those features (registered twice: version 1 holds
production, version 2 is pinned by a second signal), and two signals.

The world is built once per session into a template directory; each test serves a copy of it
(``copy_home``), so tests may retire, deprecate, corrupt or close whatever they like.

Usage::

    world = build_world(tmp_path_factory.mktemp("http-world"))
    home = copy_home(world, tmp_path)
    async with serving(settings_for(home)) as (app, client):
        r = await client.post("/inference/run", json={...})
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sigserve.api import create_app
from sigserve.api.app import SigserveApp
from sigserve.api.state import ServerState
from sigserve.app import Services
from sigserve.config import Settings
from sigserve.domain import Policy, SignalDefinition, Stage
from sigserve.features.compute import FEATURE_NAMES, WARMUP_BARS, compute_features
from sigserve.stores.base import Candles
from sigserve.timeutil import TS_DTYPE, format_ts
from tests.fixtures.models import train_forward_return_lightgbm

INTERVAL = "1h"
BTC, ETH = "BTCUSDT", "ETHUSDT"
SYMBOLS = (BTC, ETH)
BARS = 400
ETH_FEATURE_BARS = 350  # ETH bars 350..399 have candles but no feature row
KEY = "fk-v1"
MODEL = "trend"
SIGNAL = "trend-1h"  # trend@production, BTC and ETH
PINNED = "trend-pinned"  # trend:2, any symbol
TOKEN = "http-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass(frozen=True)
class World:
    home: Path
    ts: np.ndarray  # bar open times, shared by both symbols
    features: dict[str, np.ndarray]  # (BARS, len(FEATURE_NAMES)) per symbol
    close: dict[str, np.ndarray]
    model_path: Path
    sha256: str

    def t(self, i: int) -> str:
        return format_ts(self.ts[i])

    def feature_dict(self, symbol: str, i: int) -> dict[str, float]:
        return {name: float(v) for name, v in zip(FEATURE_NAMES, self.features[symbol][i], strict=True)}


def _train(matrices: list[np.ndarray], closes: list[np.ndarray], path: Path) -> Path:
    return train_forward_return_lightgbm(matrices, closes, path, feature_names=FEATURE_NAMES, n_trees=20,
                                         learning_rate=0.3, min_data_in_leaf=10)


def build_world(root: Path, store_url: str | None = None) -> World:
    """The world in ``root/home``; its store is the home's DuckDB file unless ``store_url``."""
    from sigserve.demo.market import generate_ohlcv

    root.mkdir(parents=True, exist_ok=True)

    markets = {s: generate_ohlcv(s, INTERVAL, "2024-01-01", BARS) for s in SYMBOLS}
    ts = np.asarray(markets[BTC]["ts"], dtype=TS_DTYPE)
    features = {s: compute_features(m)[0] for s, m in markets.items()}
    model = _train([features[s] for s in SYMBOLS], [markets[s]["close"] for s in SYMBOLS],
                   root / "trend.txt")
    home = root / "home"

    async def populate() -> str:
        async with Services.open(Settings(home=home, store=store_url)) as services:
            store = services.store
            await store.register_features(list(FEATURE_NAMES))
            for symbol, market in markets.items():
                await store.write_candles(symbol, INTERVAL, Candles(
                    ts, market["open"], market["high"], market["low"], market["close"],
                    market["volume"]))
                last = BARS if symbol == BTC else ETH_FEATURE_BARS
                rows = np.arange(WARMUP_BARS, last)
                await store.write_features(INTERVAL, KEY, FEATURE_NAMES,
                                           np.full(rows.size, symbol, dtype=object), ts[rows],
                                           features[symbol][rows])
            card = await services.registry.register(model, name=MODEL, classes=["down", "up"])
            await services.registry.promote(MODEL, card.version, Stage.PRODUCTION, actor="test")
            second = await services.registry.register(model, name=MODEL, classes=["down", "up"])
            policy = Policy(threshold=0.52, atr_feature="atr_14")
            await store.create_signal(SignalDefinition(SIGNAL, MODEL, "@production", INTERVAL,
                                                       SYMBOLS, policy))
            await store.create_signal(SignalDefinition(PINNED, MODEL, str(second.version),
                                                       INTERVAL, (), policy))
            return card.sha256 or ""

    sha = asyncio.run(populate())
    return World(home, ts, features, {s: markets[s]["close"] for s in SYMBOLS}, model, sha)


def copy_home(world: World, target: Path) -> Path:
    home = target / "home"
    shutil.copytree(world.home, home)
    return home


def settings_for(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"home": home, "auth_token": TOKEN, "default_signal": SIGNAL,
                              "server_prepared_ttl_s": 0.0, "max_backfill_rows": 100_000,
                              "backfill_chunk_rows": 100, "deadline_ms": 10_000.0}
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serving(settings: Settings,
                  headers: dict[str, str] | None = None) -> AsyncIterator[tuple[SigserveApp, httpx.AsyncClient]]:
    """The real app with its lifespan, and a client that sends the token (unless ``headers``)."""
    app = create_app(settings)
    async with app.running():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sigserve.test",
                                     headers=AUTH if headers is None else headers) as client:
            yield app, client


def state_of(app: SigserveApp) -> ServerState:
    state = app.state.sigserve
    assert isinstance(state, ServerState)
    return state


def services_of(app: SigserveApp) -> Services:
    return state_of(app).svc
