"""The comparison report of a rollout: on the bars that two versions both predicted (one routed,
the other as a shadow, or both in backfills), how often they agree, what each decided, how fast,
and, where candles give the realised outcome (the close ``horizon`` bars later), how right.

Actions are compared as decisions: buy and close_short are BUY, sell and close_long are SELL
(position-aware closes depend on each version's own history, the decision does not).

Usage::

    report = await comparison_report(store, "trend-1h", horizon=1)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ..stores.base import Store
from ..timeutil import TS_DTYPE, format_ts

SIDE = {"buy": 1, "close_short": 1, "sell": -1, "close_long": -1, "hold": 0}
DECISION = {1: "BUY", -1: "SELL", 0: "HOLD"}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


async def comparison_report(store: Store, signal_id: str, *, start: np.datetime64 | None = None,
                            end: np.datetime64 | None = None, horizon: int = 1,
                            versions: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The report (a JSON-able dict). ``versions`` default: the traffic policy's, else every
    version found; the first is the reference (the champion)."""
    policy = await store.get_traffic_policy(signal_id)
    rows = await store.read_signals(signal_id, start=start, end=end)
    found = sorted({int(r["model_version"]) for r in rows})
    if versions is None:
        versions = tuple(v for v in (policy.versions if policy else ()) if v in found) or tuple(found)
        if policy is not None and policy.champion not in versions and found:
            versions = tuple(found)
    by_bar: dict[tuple[str, str, np.datetime64], dict[int, int]] = defaultdict(dict)
    latency: dict[int, list[float]] = defaultdict(list)
    shadow_rows: dict[int, int] = defaultdict(int)
    for r in rows:
        version = int(r["model_version"])
        if version not in versions:
            continue
        ts = np.datetime64(r["ts"], "us")
        by_bar[(r["symbol"], r["interval"], ts)][version] = SIDE[r["action"]]
        if r.get("latency_ms") is not None:
            latency[version].append(float(r["latency_ms"]))
        if r.get("shadow"):
            shadow_rows[version] += 1
    reference = versions[0] if versions else None
    # realised forward returns per bar, from candles
    outcome: dict[tuple[str, str, np.datetime64], float] = {}
    keys = sorted({(s, i) for s, i, _ in by_bar})
    for symbol, interval in keys:
        bars = [t for s, i, t in by_bar if s == symbol and i == interval]
        candles = await store.read_candles(symbol, interval, min(bars), None)
        stamps = np.asarray(candles.ts, dtype=TS_DTYPE)
        close = np.asarray(candles.close, dtype=np.float64)
        if stamps.size <= horizon:
            continue
        index = {t: k for k, t in enumerate(stamps.tolist())}
        for t in bars:
            k = index.get(t.astype(object))
            if k is not None and k + horizon < stamps.size and close[k] > 0 and np.isfinite(close[k + horizon]):
                outcome[(symbol, interval, t)] = float(close[k + horizon] / close[k] - 1.0)
    per_version: dict[str, Any] = {}
    for version in versions:
        sides = [bar[version] for bar in by_bar.values() if version in bar]
        taken = [(bar[version], outcome[key]) for key, bar in by_bar.items()
                 if version in bar and bar[version] != 0 and key in outcome]
        hits = [1.0 if side * ret > 0 else 0.0 for side, ret in taken]
        rets = [side * ret for side, ret in taken]
        per_version[str(version)] = {
            "bars": len(sides), "shadow_rows": shadow_rows.get(version, 0),
            "actions": {DECISION[s]: sides.count(s) for s in (1, -1, 0)},
            "latency_ms": {"mean": round(float(np.mean(latency[version])), 4) if latency[version] else None,
                           "p50": _pct(latency[version], 50), "p99": _pct(latency[version], 99)},
            "outcomes": {"bars_with_outcome": len(taken),
                         "hit_rate": round(float(np.mean(hits)), 4) if hits else None,
                         "mean_return": float(np.mean(rets)) if rets else None},
        }
    comparisons = []
    for version in versions[1:]:
        both = [(bar[reference], bar[version]) for bar in by_bar.values()
                if reference in bar and version in bar]
        agree = sum(1 for a, b in both if a == b)
        matrix = {f"{DECISION[a]}->{DECISION[b]}": sum(1 for x, y in both if (x, y) == (a, b))
                  for a in (1, -1, 0) for b in (1, -1, 0)}
        comparisons.append({"reference": reference, "version": version, "common_bars": len(both),
                            "agreement_rate": round(agree / len(both), 4) if both else None,
                            "transitions": {k: v for k, v in matrix.items() if v}})
    times = [t for _, _, t in by_bar]
    return {
        "signal_id": signal_id, "policy": policy.to_dict() if policy else None,
        "versions": list(versions), "horizon_bars": horizon,
        "window": {"start": format_ts(min(times)) if times else None,
                   "end": format_ts(max(times)) if times else None},
        "bars": len(by_bar), "per_version": per_version, "comparisons": comparisons,
    }
