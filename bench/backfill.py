"""End-to-end backfill throughput: feature read + predict + policy + upsert on DuckDB.

    .venv/bin/python bench/backfill.py                  # 1,000,000 bars, lleaves and lightgbm
    .venv/bin/python bench/backfill.py --bars 200000 --runs 3 --runtime lleaves

A 300-tree LightGBM over 32 features, one symbol of 1m bars. Each run backfills the whole window
again (so every run after the first also replaces the rows it wrote: the idempotent path). It
reports the median of the runs and where the time went (read, predict, policy, write).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import numpy as np
from common import (
    INTERVAL,
    SYMBOL,
    bench_home,
    machine,
    prepare_home,
    settings_for,
    window,
    write_result,
)

from sigserve.app import Services
from sigserve.backfill import BackfillRequest, run_backfill


class StageClock:
    """Wraps the store and runtime calls of one run to attribute the time to stages."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {"read": 0.0, "position": 0.0, "predict": 0.0, "write": 0.0}

    def wrap(self, obj: Any, method: str, stage: str, is_async: bool) -> None:
        original = getattr(obj, method)
        totals = self.totals

        if is_async:
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    totals[stage] += time.perf_counter() - started

            setattr(obj, method, timed_async)
        else:
            def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    totals[stage] += time.perf_counter() - started

            setattr(obj, method, timed)


async def bench_runtime(bars: int, runs: int, compiled: bool, chunk_rows: int) -> dict[str, Any]:
    home = bench_home()
    settings = settings_for(home, backfill_chunk_rows=chunk_rows)
    async with Services.open(settings) as services:
        card, signal_id = await prepare_home(services, bars, compiled=compiled)
        start, end = window(home, bars)
        prepared = await services.engine.prepare(signal_id)
        clock = StageClock()
        clock.wrap(services.store, "read_features", "read", True)
        clock.wrap(services.store, "position_sides", "position", True)
        clock.wrap(services.store, "write_signals", "write", True)
        clock.wrap(prepared.runtime, "predict", "predict", False)
        services.engine.prepare = _return(prepared)  # type: ignore[method-assign]
        samples, stages = [], []
        for run in range(runs):
            for key in clock.totals:
                clock.totals[key] = 0.0
            report = await run_backfill(
                services.engine, BackfillRequest(signal_id, SYMBOL, INTERVAL, "window", start, end),
                max_rows=settings.max_backfill_rows, chunk_rows=chunk_rows)
            rate = report.rows_written / report.elapsed_s
            samples.append(rate)
            accounted = sum(clock.totals.values())
            stage = {k: round(v, 3) for k, v in clock.totals.items()}
            stage["policy+other"] = round(report.elapsed_s - accounted, 3)
            stages.append(stage)
            print(f"  {card.runtime or 'lightgbm':9s} run {run + 1}/{runs}: {report.rows_written} rows in "
                  f"{report.elapsed_s:.2f} s = {rate:,.0f} bars/s  stages(s) {stage}", flush=True)
        rows = await services.store.read_signals(signal_id, SYMBOL, INTERVAL, limit=3)
        assert rows, "the backfill wrote nothing"
    median_rate = statistics.median(samples)
    return {"runtime": card.runtime or "lightgbm", "bars": bars, "runs": runs, "chunk_rows": chunk_rows,
            "bars_per_s_median": round(median_rate), "bars_per_s_all": [round(s) for s in samples],
            "seconds_median": round(bars / median_rate, 3), "stages": stages}


def _return(prepared: Any) -> Any:
    async def prepare(signal_id: str) -> Any:
        return prepared

    return prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chunk-rows", type=int, default=250_000)
    parser.add_argument("--runtime", choices=["lleaves", "lightgbm", "both"], default="both")
    args = parser.parse_args()
    results = []
    for compiled in {"lleaves": [True], "lightgbm": [False], "both": [True, False]}[args.runtime]:
        results.append(asyncio.run(bench_runtime(args.bars, args.runs, compiled, args.chunk_rows)))
    summary = {"bench": "backfill", "model": "LightGBM binary, 300 trees, 32 features", "store": "duckdb",
               "machine": machine(), "results": results, "numpy": np.__version__}
    path = write_result("backfill", summary)
    for r in results:
        print(f"{r['runtime']:9s}: median {r['bars_per_s_median']:,} bars/s over {r['runs']} runs "
              f"of {r['bars']:,} bars ({r['seconds_median']} s)")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
