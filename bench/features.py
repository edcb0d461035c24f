"""Feature spec throughput (history) and one-bar latency (live).

    .venv/bin/python bench/features.py                       # 1,000,000 bars, 5 runs, 20,000 calls
    .venv/bin/python bench/features.py --bars 200000 --runs 3 --calls 5000

Two measurements of one 20-indicator TA-Lib spec (26 columns; plus a variant with the 8 candle
features), over synthetic 1m bars of the demo's market:

- **history**: ``FeatureSpec.compute`` over all the bars (validation included): bars per second,
  the median of ``--runs`` runs. Target: >= 1,000,000 bars/s on 2 cores.
- **one bar**: ``FeatureSpec.compute_last`` for the newest bar from the last ``spec.window``
  candles (views into the history, as a live ring buffer holds them), at random bars: p50 / p99
  over ``--calls`` calls. Target: p99 <= 200 us. Each sampled bar is also checked against the
  history's value (parity to 1e-9).

Results: ``bench/results/features-<time>.json``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import numpy as np
from common import machine, percentiles, write_result

from sigserve.features.spec import FeatureSpec

INDICATORS: list[Any] = [
    {"name": "RSI", "timeperiod": 14}, {"name": "ATR", "timeperiod": 14}, {"name": "NATR", "timeperiod": 14},
    {"name": "ADX", "timeperiod": 14}, {"name": "CCI", "timeperiod": 20}, {"name": "MACD"},
    {"name": "BBANDS", "timeperiod": 20}, {"name": "EMA", "timeperiod": 20}, {"name": "SMA", "timeperiod": 50},
    {"name": "WMA", "timeperiod": 20}, {"name": "ROC", "timeperiod": 1}, {"name": "ROC", "timeperiod": 12},
    {"name": "STDDEV", "timeperiod": 24}, {"name": "WILLR", "timeperiod": 14}, {"name": "MFI", "timeperiod": 14},
    {"name": "STOCH"}, {"name": "CMO", "timeperiod": 14}, {"name": "AROONOSC", "timeperiod": 14},
    {"name": "ULTOSC"}, {"name": "TRIX", "timeperiod": 15},
]
CANDLES = ["body_size", "body_direction", "upper_wick", "lower_wick", "wick_ratio", "body_to_range", "gap",
           "range"]


def measure_history(spec: FeatureSpec, market: dict[str, np.ndarray], runs: int) -> dict[str, Any]:
    n = market["close"].shape[0]
    times = []
    for _ in range(runs):
        gc.collect()
        began = time.perf_counter()
        frame = spec.compute(market)
        times.append(time.perf_counter() - began)
        del frame
    median = statistics.median(times)
    return {"bars": n, "runs_s": [round(t, 4) for t in times], "median_s": round(median, 4),
            "bars_per_s_median": round(n / median), "bars_per_s_min": round(n / max(times)),
            "bars_per_s_max": round(n / min(times))}


def measure_one_bar(spec: FeatureSpec, market: dict[str, np.ndarray], calls: int, validate: bool,
                    full: np.ndarray | None) -> dict[str, Any]:
    n = market["close"].shape[0]
    w = spec.window
    rng = np.random.default_rng(11)
    ends = rng.integers(w, n, calls)
    samples = []
    worst = 0.0
    gc.collect()
    gc.disable()
    try:
        for warm in range(200):  # first calls pay numpy / TA-Lib caches
            i = int(ends[warm % calls])
            spec.compute_last({k: v[i - w + 1:i + 1] for k, v in market.items()}, validate=validate)
        for i in ends.tolist():
            window = {k: v[i - w + 1:i + 1] for k, v in market.items()}
            began = time.perf_counter()
            last = spec.compute_last(window, validate=validate)
            samples.append((time.perf_counter() - began) * 1e6)
            if full is not None:
                ref = full[i]
                worst = max(worst, float(np.max(np.abs(last - ref) / np.maximum(1.0, np.abs(ref)))))
    finally:
        gc.enable()
    stats = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in percentiles(samples).items()}
    out: dict[str, Any] = {"window": w, "validate": validate, "us": stats}
    if full is not None:
        out["parity_worst_rel_diff"] = worst
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()

    from sigserve.demo.market import generate_ohlcv

    began = time.perf_counter()
    market = generate_ohlcv("BENCH", "1m", "2022-01-01", args.bars)
    print(f"generated {args.bars} bars in {time.perf_counter() - began:.1f} s", flush=True)
    result: dict[str, Any] = {"bench": "features", "machine": machine(), "bars": args.bars, "runs": args.runs,
                              "calls": args.calls, "specs": {}}
    for label, section in (("20 indicators", {"indicators": INDICATORS}),
                           ("20 indicators + 8 candle features", {"indicators": INDICATORS, "candles": CANDLES})):
        build = time.perf_counter()
        spec = FeatureSpec.from_dict(section)
        build_s = time.perf_counter() - build
        history = measure_history(spec, market, args.runs)
        full = spec.compute(market).values
        one = measure_one_bar(spec, market, args.calls, True, full)
        one_fast = measure_one_bar(spec, market, args.calls, False, None)
        result["specs"][label] = {"columns": len(spec.names), "warmup": spec.warmup, "window": spec.window,
                                  "feature_key": spec.feature_key, "build_s": round(build_s, 4),
                                  "history": history, "one_bar": one, "one_bar_unvalidated": one_fast}
        print(f"{label} ({len(spec.names)} columns, window {spec.window}): history "
              f"{history['bars_per_s_median']:,} bars/s (median of {args.runs}: {history['median_s']} s);"
              f" one bar p50 {one['us']['p50']} us, p99 {one['us']['p99']} us (validated),"
              f" p99 {one_fast['us']['p99']} us (unvalidated); parity {one['parity_worst_rel_diff']:.1e}",
              flush=True)
    path = write_result("features", result)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
