"""Single-bar latency of a warm engine (no HTTP), p50/p99.

    .venv/bin/python bench/engine_latency.py               # after bench/backfill.py set the home up
    .venv/bin/python bench/engine_latency.py --calls 20000 --store-calls 2000

Two measurements per runtime (native LightGBM and lleaves-compiled), same 300-tree, 32-feature model:

- ``engine.compute``: one feature row in -> predict -> policy (action, confidence, position-aware
  close, ATR levels, size) -> a signal row out. This is the work every driver shares.
- ``engine.predict_bar``: the same plus the DuckDB round trips: read the feature row and candle at
  ts, read the position before ts, upsert the signal in a transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from dataclasses import replace
from typing import Any

import numpy as np
from common import INTERVAL, SYMBOL, bench_home, machine, percentiles, prepare_home, settings_for, write_result

from sigserve.app import Services
from sigserve.domain import FLAT, FeatureBatch


async def bench_runtime(bars: int, compiled: bool, calls: int, store_calls: int) -> dict[str, Any]:
    settings = settings_for(bench_home())
    async with Services.open(settings) as services:
        card, signal_id = await prepare_home(services, bars, compiled=compiled)
        engine = services.engine
        engine.prepared_ttl_s = 60.0  # a warm server resolves each signal once per TTL
        prepared = await engine.prepare(signal_id)
        read = await services.store.read_features(SYMBOL, INTERVAL, prepared.read_names,
                                                  start=None, end=None)
        rows = read.batch
        rng = np.random.default_rng(3)
        picks = rng.integers(1_000, len(rows), size=calls)
        singles = [FeatureBatch(SYMBOL, INTERVAL, rows.ts[i:i + 1], rows.values[i:i + 1], rows.names,
                                rows.feature_keys[i:i + 1], rows.close[i:i + 1]) for i in picks]
        for batch in singles[:200]:  # warm-up
            engine.compute(prepared, batch, FLAT, "stream", latency_ms=0.0)
        gc.disable()
        compute_us = []
        for batch in singles:
            started = time.perf_counter()
            engine.compute(prepared, batch, FLAT, "stream", latency_ms=0.0)
            compute_us.append((time.perf_counter() - started) * 1e6)
        gc.enable()
        store_us = []
        ts_picks = rows.ts[rng.integers(1_000, len(rows), size=store_calls)]
        for ts in ts_picks[:50]:
            await engine.predict_bar(signal_id, SYMBOL, INTERVAL, ts, source="stream")
        for ts in ts_picks:
            started = time.perf_counter()
            await engine.predict_bar(signal_id, SYMBOL, INTERVAL, ts, source="stream")
            store_us.append((time.perf_counter() - started) * 1e6)
        # The live case: bars arrive in order after everything stored (a fresh signal's history).
        live_id = f"{signal_id}-live"
        if await services.store.get_signal(live_id) is None:
            definition = (await services.store.get_signal(signal_id))
            assert definition is not None
            await services.store.create_signal(replace(definition, signal_id=live_id))
        live_us = []
        last = await services.store.last_signal_ts(live_id, SYMBOL, INTERVAL)
        later = rows.ts[rows.ts > last] if last is not None else rows.ts
        for ts in later[:store_calls + 50][:50]:
            await engine.predict_bar(live_id, SYMBOL, INTERVAL, ts, source="stream")
        for ts in later[50:store_calls + 50]:
            started = time.perf_counter()
            await engine.predict_bar(live_id, SYMBOL, INTERVAL, ts, source="stream")
            live_us.append((time.perf_counter() - started) * 1e6)
    result = {"runtime": card.runtime or "lightgbm",
              "predict_bar_duckdb_live_us": {k: round(v, 1) if isinstance(v, float) else v
                                             for k, v in percentiles(live_us).items()},
              "compute_us": {k: round(v, 1) if isinstance(v, float) else v for k, v in percentiles(compute_us).items()},
              "predict_bar_duckdb_us": {k: round(v, 1) if isinstance(v, float) else v
                                        for k, v in percentiles(store_us).items()}}
    c, s, live = result["compute_us"], result["predict_bar_duckdb_us"], result["predict_bar_duckdb_live_us"]
    print(f"{result['runtime']:9s} engine.compute     p50 {c['p50']:8.1f} us  p99 {c['p99']:8.1f} us  (n={c['n']})")
    print(f"{result['runtime']:9s} predict_bar+duckdb p50 {s['p50']:8.1f} us  p99 {s['p99']:8.1f} us  (n={s['n']},"
          " random bars inside history)")
    print(f"{result['runtime']:9s} predict_bar+duckdb p50 {live['p50']:8.1f} us  p99 {live['p99']:8.1f} us"
          f"  (n={live['n']}, live: each bar after the newest row)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bars", type=int, default=1_000_000, help="the bench home's data size")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--store-calls", type=int, default=2_000)
    args = parser.parse_args()
    results = [asyncio.run(bench_runtime(args.bars, compiled, args.calls, args.store_calls))
               for compiled in (False, True)]
    path = write_result("engine_latency", {"bench": "engine_latency", "machine": machine(), "results": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
