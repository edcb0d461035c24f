"""``sigserve demo``: the whole job on the embedded store, through the same code paths a user runs.

synthetic OHLCV (3 symbols x 1h x 2 years) -> CSV files -> candles imported -> ``sigserve train``'s
pipeline on a written ``pipeline.yaml`` (a TA-Lib feature spec computed into the store, forward-
return labels, a temporal split, LightGBM with class weights, metrics and plots, tracked in a
local MLflow file store, registered with its spec hash and promoted, its signal defined) ->
backfilled -> summary (signals per action, hit rate on the held-out period).

It is safe to run again: an identical model file (training is deterministic) reuses its version,
and the signal and every written row are upserts.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ..config import Settings
from ..domain import ACTIONS
from ..timeutil import TS_DTYPE, format_ts, parse_ts

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
INTERVAL = "1h"
MODEL_NAME = "demo-trend"
SIGNAL_ID = "demo-trend-1h"
HORIZON = 4

# The demo's feature spec: TA-Lib indicators and candle features (warm-up: MACD's 33 bars).
DEMO_FEATURES: dict[str, Any] = {
    "indicators": [
        {"name": "RSI", "timeperiod": 14}, {"name": "ATR", "timeperiod": 14},
        {"name": "NATR", "timeperiod": 14}, {"name": "ADX", "timeperiod": 14},
        {"name": "CCI", "timeperiod": 20}, {"name": "MACD"}, {"name": "BBANDS", "timeperiod": 20},
        {"name": "ROC", "timeperiod": 1}, {"name": "ROC", "timeperiod": 4},
        {"name": "ROC", "timeperiod": 12}, {"name": "ROC", "timeperiod": 24},
        {"name": "STDDEV", "timeperiod": 24}, {"name": "WILLR", "timeperiod": 14},
        {"name": "MFI", "timeperiod": 14},
        {"name": "SMA", "timeperiod": 24, "input": "volume", "column": "volume_sma_24"},
    ],
    "candles": ["body_size", "body_direction", "upper_wick", "lower_wick", "wick_ratio",
                "body_to_range", "gap", "range"],
}


def demo_pipeline() -> dict[str, Any]:
    """The pipeline config the demo writes (``demo-data/pipeline.yaml``) and trains from."""
    return {
        "name": MODEL_NAME,
        "data": {"symbols": list(SYMBOLS), "interval": INTERVAL},
        "features": DEMO_FEATURES,
        "labels": {"kind": "forward_return", "horizon": HORIZON, "task": "classification",
                   "classification": "sign"},
        "split": {"train": 0.7, "valid": 0.15, "test": 0.15, "method": "temporal"},
        "model": {"type": "lightgbm", "class_weight": "balanced", "early_stopping_rounds": 25,
                  "params": {"n_estimators": 150, "learning_rate": 0.05, "num_leaves": 15,
                             "min_data_in_leaf": 200}},
        "tracking": {"mlflow": True, "experiment": "sigserve-demo"},
        "register": {"promote": "production",
                     "signal": {"id": SIGNAL_ID, "threshold": 0.55, "atr_feature": "atr_14"}},
    }


def run_demo(settings: Settings, console: Console, *, bars: int = 17_520) -> dict[str, Any]:
    return asyncio.run(_run_demo(settings, console, bars))


async def _run_demo(settings: Settings, console: Console, bars: int) -> dict[str, Any]:
    import yaml

    from ..app import Services
    from ..backfill import BackfillRequest, run_backfill
    from ..features.io import read_candle_file
    from ..train.config import load_config
    from ..train.run import run_pipeline
    from .market import generate_ohlcv, write_csv

    data_dir = settings.home / "demo-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    markets = {s: generate_ohlcv(s, INTERVAL, "2023-01-01", bars) for s in SYMBOLS}
    candle_files = {s: write_csv(data_dir / f"{s}_{INTERVAL}.csv", m) for s, m in markets.items()}
    config_path = data_dir / "pipeline.yaml"
    config_path.write_text("# written by `sigserve demo`; rerun it with `sigserve train --config` this file\n"
                           + yaml.safe_dump(demo_pipeline(), sort_keys=False))
    config = load_config(config_path)
    timings["generate"] = time.perf_counter() - t0

    async with Services.open(settings) as services:
        store = services.store
        t0 = time.perf_counter()
        for symbol, path in candle_files.items():
            await store.write_candles(symbol, INTERVAL, read_candle_file(path, symbol))
        timings["import"] = time.perf_counter() - t0
        console.print(f"[bold]1/4[/] generated {len(SYMBOLS)} x {bars} {INTERVAL} bars -> {data_dir},"
                      " imported the candles")

        t0 = time.perf_counter()
        console.print(f"[bold]2/4[/] sigserve train --config {config_path}")
        trained = await run_pipeline(services, config, console=console)
        timings["train"] = time.perf_counter() - t0
        metrics = trained["metrics"]
        test_start = parse_ts(trained["window"]["test"]["start"], field="test start")
        console.print(
            f"      features [bold]{trained['feature_key']}[/] ({len(trained['features']['names'])} features,"
            f" {trained['features']['warmup_rows_dropped']} warm-up rows dropped); LightGBM test AUC"
            f" {metrics.get('auc', float('nan')):.3f}, accuracy {metrics.get('accuracy', float('nan')):.3f},"
            f" f1_macro {metrics.get('f1_macro', float('nan')):.3f}; held out from {format_ts(test_start)}")
        console.print(f"      registered {trained['model']} ({trained['model_stage']}), signal {SIGNAL_ID};"
                      f" MLflow run {trained.get('mlflow_run_id')} in {trained.get('mlflow_uri')}")

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
        console.print(f"[bold]3/4[/] backfilled {written} signals ({skipped} bars skipped for "
                      f"missing features: the warm-up) in {timings['backfill']:.2f} s")

        summary = await _summary(store, markets, test_start)
        warmup = int(trained["features"]["warmup"])
        _write_predict_request(data_dir / "predict_candles.json", markets["BTCUSDT"],
                               int(trained["features"]["window"]) + 24)
    console.print("[bold]4/4[/] summary")
    _print_summary(console, summary, test_start)
    console.print(
        "\nTry it yourself:\n"
        f"  .venv/bin/sigserve --home {settings.home} predict --signal {SIGNAL_ID} --symbol BTCUSDT"
        f" --interval 1h --ts {format_ts(markets['BTCUSDT']['ts'][-1])}\n"
        f"  .venv/bin/sigserve --home {settings.home} signals history {SIGNAL_ID} --symbol BTCUSDT\n"
        f"  .venv/bin/sigserve --home {settings.home} models show {MODEL_NAME}@production\n"
        f"  .venv/bin/sigserve --home {settings.home} train --config {config_path}")
    return {"summary": summary, "timings": timings, "rows_written": written,
            "model": trained["model"], "test_start": format_ts(test_start),
            "last_ts": format_ts(markets["BTCUSDT"]["ts"][-1]), "run_id": trained["run_id"],
            "feature_key": trained["feature_key"], "warmup": warmup, "metrics": metrics,
            "predict_file": str(data_dir / "predict_candles.json")}


def _write_predict_request(path: Path, market: dict[str, np.ndarray], count: int) -> None:
    """A ``POST /predict`` body with the newest ``count`` candles (for the printed curl)."""
    lo = max(0, market["ts"].shape[0] - count)
    candles = [{"ts": format_ts(market["ts"][i]), "open": float(market["open"][i]),
                "high": float(market["high"][i]), "low": float(market["low"][i]),
                "close": float(market["close"][i]), "volume": float(market["volume"][i])}
               for i in range(lo, market["ts"].shape[0])]
    path.write_text(json.dumps({"symbol": "BTCUSDT", "interval": INTERVAL, "candles": candles}))


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
        *([f"curl -s {auth} {json_h} -d @{result['predict_file']} {base_url}/predict"]
          if result.get("predict_file") else []),
        f"curl -s {auth} {base_url}/models/{MODEL_NAME}",
        f"curl -s {auth} {base_url}/metrics",
        f"open {base_url}/docs (send the same Authorization header)",
    ]


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
