"""``sigserve demo``: the whole job on the embedded store, through the same code paths a user runs.

synthetic OHLCV (3 symbols x 1h x 2 years) -> CSV/Parquet files -> candles and features imported
-> LightGBM trained on forward returns (temporal split) -> registered and promoted -> signal
defined -> backfilled -> summary (signals per action, hit rate on the held-out period).

It is safe to run again: an identical model file (training is deterministic) reuses its version,
and the signal and every written row are upserts.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from ..config import Settings
from ..domain import ACTIONS, Policy, SignalDefinition, Stage
from ..timeutil import TS_DTYPE, format_ts

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
INTERVAL = "1h"
MODEL_NAME = "demo-trend"
SIGNAL_ID = "demo-trend-1h"
HORIZON = 4


def run_demo(settings: Settings, console: Console, *, bars: int = 17_520) -> dict[str, Any]:
    return asyncio.run(_run_demo(settings, console, bars))


async def _run_demo(settings: Settings, console: Console, bars: int) -> dict[str, Any]:
    from ..app import Services
    from ..backfill import BackfillRequest, run_backfill
    from ..features.compute import compute_features
    from ..features.io import read_candle_file, read_feature_file
    from .market import generate_ohlcv, write_csv
    from .train import train_demo_model

    data_dir = settings.home / "demo-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    markets = {s: generate_ohlcv(s, INTERVAL, "2023-01-01", bars) for s in SYMBOLS}
    candle_files = {s: write_csv(data_dir / f"{s}_{INTERVAL}.csv", m) for s, m in markets.items()}
    feature_parts: list[pa.Table] = []
    names: tuple[str, ...] = ()
    for symbol, market in markets.items():
        matrix, names = compute_features(market)
        columns: dict[str, Any] = {"symbol": pa.array([symbol] * len(market["ts"])), "ts": pa.array(market["ts"])}
        columns.update({n: matrix[:, i] for i, n in enumerate(names)})
        feature_parts.append(pa.table(columns))
    feature_file = data_dir / f"features_{INTERVAL}.parquet"
    pq.write_table(pa.concat_tables(feature_parts), feature_file)
    timings["generate"] = time.perf_counter() - t0
    console.print(f"[bold]1/6[/] generated {len(SYMBOLS)} x {bars} {INTERVAL} bars and "
                  f"{len(names)} features -> {data_dir}")

    t0 = time.perf_counter()
    # Train on the first symbols' history; the split is temporal, so the last 15% is held out.
    stacked = [compute_features(markets[s])[0] for s in SYMBOLS]
    trained = train_demo_model(
        np.vstack(stacked), names, np.concatenate([markets[s]["close"] for s in SYMBOLS]),
        np.concatenate([markets[s]["ts"] for s in SYMBOLS]), data_dir / "demo-trend.txt",
        horizon=HORIZON, groups=np.repeat(np.arange(len(SYMBOLS)), bars))
    timings["train"] = time.perf_counter() - t0
    console.print(f"[bold]2/6[/] trained LightGBM ({trained.best_iteration} trees): test AUC "
                  f"{trained.metrics.get('auc', float('nan')):.3f}, accuracy "
                  f"{trained.metrics.get('accuracy', float('nan')):.3f}; held out from "
                  f"{format_ts(trained.test_start)}")

    async with Services.open(settings) as services:
        store, registry = services.store, services.registry
        t0 = time.perf_counter()
        for symbol, path in candle_files.items():
            await store.write_candles(symbol, INTERVAL, read_candle_file(path, symbol))
        table = read_feature_file(feature_file)
        await store.register_features(list(table.names))
        await store.write_features(INTERVAL, "demo-features-v1", table.names, table.symbols,
                                   table.ts, table.values)
        timings["import"] = time.perf_counter() - t0
        console.print(f"[bold]3/6[/] imported candles and {len(table.ts)} feature rows "
                      "(feature_key demo-features-v1)")

        card = await _register(registry, trained.model_path, trained.metrics)
        if card.stage is not Stage.PRODUCTION:
            card = await registry.promote(card.name, card.version, Stage.PRODUCTION, actor="demo")
        console.print(f"[bold]4/6[/] registered {card.ref} ({card.flavor}, sha256 "
                      f"{(card.sha256 or '')[:12]}) and promoted it to production")

        if await store.get_signal(SIGNAL_ID) is None:
            await store.create_signal(SignalDefinition(
                SIGNAL_ID, MODEL_NAME, "@production", INTERVAL, SYMBOLS,
                Policy(threshold=0.55, atr_feature="atr_14")))
        console.print(f"[bold]5/6[/] signal {SIGNAL_ID} -> {MODEL_NAME}@production on {INTERVAL}")

        t0 = time.perf_counter()
        reports = []
        for symbol in SYMBOLS:
            first, last = markets[symbol]["ts"][0], markets[symbol]["ts"][-1]
            reports.append(await run_backfill(
                services.engine, BackfillRequest(SIGNAL_ID, symbol, INTERVAL, "window", first, last),
                max_rows=settings.max_backfill_rows, chunk_rows=settings.backfill_chunk_rows))
        timings["backfill"] = time.perf_counter() - t0
        written = sum(r.rows_written for r in reports)
        skipped = sum(r.rows_skipped_missing_features for r in reports)
        console.print(f"[bold]6/6[/] backfilled {written} signals ({skipped} bars skipped for "
                      f"missing features) in {timings['backfill']:.2f} s")

        summary = await _summary(store, markets, trained.test_start)
    _print_summary(console, summary, trained.test_start)
    console.print(
        "\nTry it yourself:\n"
        f"  .venv/bin/sigserve --home {settings.home} predict --signal {SIGNAL_ID} --symbol BTCUSDT"
        f" --interval 1h --ts {format_ts(markets['BTCUSDT']['ts'][-1])}\n"
        f"  .venv/bin/sigserve --home {settings.home} signals history {SIGNAL_ID} --symbol BTCUSDT\n"
        f"  .venv/bin/sigserve --home {settings.home} models show {MODEL_NAME}@production")
    return {"summary": summary, "timings": timings, "rows_written": written,
            "model": card.ref, "test_start": format_ts(trained.test_start),
            "last_ts": format_ts(markets["BTCUSDT"]["ts"][-1])}


def curl_commands(settings: Settings, base_url: str, result: dict[str, Any]) -> list[str]:
    """The requests to try against the served demo, with the bearer token header."""
    import json
    import os

    from ..config import DEV_TOKEN_SENTINEL

    token = settings.auth_token.strip()
    if token == DEV_TOKEN_SENTINEL:
        auth = f"-H 'Authorization: Bearer {token}'"
    else:  # the caller's own secret stays out of the terminal scrollback
        auth = "-H \"Authorization: Bearer $SIGSERVE_AUTH_TOKEN\""
        if "SIGSERVE_AUTH_TOKEN" not in os.environ:
            auth += "   # export SIGSERVE_AUTH_TOKEN first"
    json_h = "-H 'Content-Type: application/json'"
    ts = result.get("last_ts", "")
    run = json.dumps({"signal_id": SIGNAL_ID, "symbol": "BTCUSDT", "ts": ts,
                      "interval_name": INTERVAL, "source": "stream"})
    return [
        f"curl -s {base_url}/healthz",
        f"curl -s {auth} {base_url}/model/info",
        f"curl -s {auth} {json_h} -d '{{\"symbol\": \"BTCUSDT\"}}' {base_url}/api/v1/predict",
        f"curl -s {auth} {json_h} -d '{run}' {base_url}/inference/run",
        f"curl -s {auth} {base_url}/models/{MODEL_NAME}",
        f"curl -s {auth} {base_url}/metrics",
        f"open {base_url}/docs (send the same Authorization header)",
    ]


async def _register(registry: Any, path: Path, metrics: dict[str, Any]) -> Any:
    from ..registry.artifacts import sha256_file

    sha = sha256_file(path)
    for card in await registry.store.list_models(MODEL_NAME):
        if card.sha256 == sha and card.stage in (Stage.REGISTERED, Stage.STAGING, Stage.PRODUCTION):
            return card
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
    return await registry.register(path, name=MODEL_NAME, classes=["down", "up"], metrics=numeric)


async def _summary(store: Any, markets: dict[str, dict[str, np.ndarray]],
                   test_start: np.datetime64) -> dict[str, Any]:
    """Signals per action, and the hit rate of buy/sell on the held-out period."""
    per_symbol: dict[str, dict[str, Any]] = {}
    for symbol, market in markets.items():
        rows = await store.read_signals(SIGNAL_ID, symbol, INTERVAL)
        ts = np.array([np.datetime64(r["ts"], "us") for r in rows], dtype=TS_DTYPE)
        actions = np.array([r["action"] for r in rows], dtype=object)
        close = market["close"]
        index = np.searchsorted(market["ts"], ts)
        ahead = np.minimum(index + HORIZON, close.size - 1)
        forward = np.log(close[ahead] / close[index])
        held_out = (ts >= test_start) & (index + HORIZON < close.size)
        counts = {a: int((actions == a).sum()) for a in ACTIONS}
        longs = held_out & np.isin(actions, ["buy", "close_short"])
        shorts = held_out & np.isin(actions, ["sell", "close_long"])
        hits = int((forward[longs] > 0).sum() + (forward[shorts] < 0).sum())
        calls = int(longs.sum() + shorts.sum())
        per_symbol[symbol] = {
            "signals": len(rows), "actions": counts, "held_out_calls": calls,
            "hit_rate": hits / calls if calls else float("nan"),
            "base_rate_up": float((forward[held_out] > 0).mean()) if held_out.any() else float("nan"),
        }
    return per_symbol


def _print_summary(console: Console, summary: dict[str, Any], test_start: np.datetime64) -> None:
    table = Table(title=f"Signals per action, and hit rate on the held-out period "
                        f"(from {format_ts(test_start)})")
    for column in ("symbol", *ACTIONS, "held-out calls", "hit rate", "p(up) base"):
        table.add_column(column, justify="right")
    for symbol, s in summary.items():
        table.add_row(symbol, *(str(s["actions"][a]) for a in ACTIONS), str(s["held_out_calls"]),
                      f"{s['hit_rate']:.1%}", f"{s['base_rate_up']:.1%}")
    console.print(table)
