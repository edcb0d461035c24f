"""Shared setup for the benchmarks: a bench home with 1M bars, 32 features and a 300-tree model.

Everything expensive (data, the trained model, the lleaves compile) is cached in the bench home
(``bench/.home`` unless SIGSERVE_BENCH_HOME), keyed by its parameters, so a second run measures
only what it means to measure.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sigserve.app import Services
from sigserve.config import Settings
from sigserve.domain import ModelCard, Policy, SignalDefinition, Stage
from sigserve.stores import Candles

ROOT = Path(__file__).resolve().parent
SYMBOL = "BENCH"
INTERVAL = "1m"
N_FEATURES = 32
N_TREES = 300
FEATURE_KEY = "bench-v1"


@dataclass
class BenchData:
    ts: np.ndarray
    values: np.ndarray
    names: tuple[str, ...]
    candles: Candles


def bench_home() -> Path:
    return Path(os.environ.get("SIGSERVE_BENCH_HOME", ROOT / ".home")).resolve()


def make_data(bars: int) -> BenchData:
    """Synthetic 1m bars and 32 point-in-time features: the demo's 13 plus lagged returns."""
    from sigserve.demo.market import generate_ohlcv
    from sigserve.features.compute import compute_features

    ohlcv = generate_ohlcv(SYMBOL, INTERVAL, "2022-01-01", bars)
    base, base_names = compute_features(ohlcv)
    ret_1 = base[:, base_names.index("ret_1")]
    extra = N_FEATURES - base.shape[1]
    lags = np.full((bars, extra), np.nan)
    for lag in range(1, extra + 1):
        lags[lag:, lag - 1] = ret_1[:-lag]
    values = np.ascontiguousarray(np.hstack([base, lags]))
    names = (*base_names, *(f"ret_1_lag{i}" for i in range(1, extra + 1)))
    candles = Candles(ohlcv["ts"], ohlcv["open"], ohlcv["high"], ohlcv["low"], ohlcv["close"],
                      ohlcv["volume"])
    return BenchData(ohlcv["ts"], values, names, candles)


def train_model(data: BenchData, path: Path, train_rows: int = 200_000) -> Path:
    if path.exists():
        return path
    import lightgbm as lgb

    close = data.candles.close
    horizon = 15
    label = np.r_[close[horizon:] > close[:-horizon], np.zeros(horizon, bool)].astype(np.int32)
    rows = slice(100, 100 + train_rows)
    dataset = lgb.Dataset(data.values[rows], label[rows], feature_name=list(data.names))
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.05, "verbose": -1,
              "num_threads": 2, "deterministic": True, "seed": 1, "min_data_in_leaf": 50}
    booster = lgb.train(params, dataset, num_boost_round=N_TREES)
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path))
    return path


async def prepare_home(services: Services, bars: int, *, compiled: bool) -> tuple[ModelCard, str]:
    """Load data (once per bar count), register the model (once), define a signal per runtime."""
    store, registry = services.store, services.registry
    home = services.settings.home
    marker = home / f"data-{bars}.json"
    data: BenchData | None = None
    if not marker.exists():
        data = make_data(bars)
        await store.write_candles(SYMBOL, INTERVAL, data.candles)
        await store.register_features(list(data.names))
        await store.write_features(INTERVAL, FEATURE_KEY, data.names,
                                   np.full(bars, SYMBOL, dtype=object), data.ts, data.values)
        marker.write_text(json.dumps({"bars": bars, "first": str(data.ts[0]), "last": str(data.ts[-1])}))
    model_path = home / f"model-{N_TREES}x{N_FEATURES}.txt"
    if not model_path.exists():
        data = data or make_data(bars)
        train_model(data, model_path)
    name = "bench" if compiled else "bench-native"  # one model file, two versions: two runtimes
    cards = [c for c in await store.list_models(name) if c.stage == Stage.PRODUCTION]
    card = cards[0] if cards else await registry.register(model_path, name=name)
    if not cards:
        card = await registry.promote(card.name, card.version, Stage.PRODUCTION, actor="bench")
    if compiled and card.runtime != "lleaves":
        print("compiling the model with lleaves (once; cached by sha256) ...", flush=True)
        card = await registry.compile(card.name, card.version)
    signal_id = f"bench-{'lleaves' if compiled else 'lightgbm'}"
    if await store.get_signal(signal_id) is None:
        await store.create_signal(SignalDefinition(signal_id, name, str(card.version), INTERVAL, (SYMBOL,),
                                                   Policy(threshold=0.52, atr_feature="atr_14")))
    return card, signal_id


def window(marker_dir: Path, bars: int) -> tuple[np.datetime64, np.datetime64]:
    meta = json.loads((marker_dir / f"data-{bars}.json").read_text())
    return np.datetime64(meta["first"], "us"), np.datetime64(meta["last"], "us")


def settings_for(home: Path, **overrides: Any) -> Settings:
    return Settings(home=home, max_backfill_rows=10_000_000, **overrides)


def free_port() -> int:
    """A loopback TCP port that is free now (for a server the bench starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1],
            "mean": statistics.fmean(ordered), "n": len(ordered)}


def write_result(name: str, result: dict[str, Any]) -> Path:
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


# --------------------------------------------------------------------------------------------------
# wrk, the load generator of the HTTP benches


WRK_LUA = """\
local bodies = {
%(bodies)s
}
local n = #bodies
local i = 0
wrk.method = "POST"
%(headers)s
request = function()
  i = (i %% n) + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, ' ..
    '"status": %%d, "timeout": %%d, "p50": %%d, "p90": %%d, "p99": %%d, "max": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def lua_string(text: str) -> str:
    level = "=" * 3
    assert f"]{level}]" not in text
    return f"[{level}[{text}]{level}]"


def write_wrk_script(path: Path, bodies: list[str], headers: dict[str, str]) -> Path:
    """A wrk Lua script that POSTs ``bodies`` in turn and prints its percentiles as WRKJSON."""
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    path.write_text(WRK_LUA % {"bodies": ",\n".join(lua_string(b) for b in bodies), "headers": lines})
    return path


def run_wrk(port: int, path: str, c: int, seconds: float, script: Path, cpu: int | None = None) -> dict[str, Any]:
    """A closed loop of ``c`` keep-alive connections for ``seconds`` (wrk, on CPU ``cpu``):
    p50/p90/p99/max in ms, req/s, requests and errors."""
    argv = ["wrk", "-t1", f"-c{c}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
            f"http://127.0.0.1:{port}{path}"]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    raw = json.loads(line[len("WRKJSON "):])
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    ok = raw["requests"] > 0
    return {"p50_ms": raw["p50"] / 1e3 if ok else None, "p90_ms": raw["p90"] / 1e3 if ok else None,
            "p99_ms": raw["p99"] / 1e3 if ok else None, "max_ms": raw["max"] / 1e3 if ok else None,
            "rps": raw["requests"] / (raw["duration_us"] / 1e6), "requests": raw["requests"], "errors": errors}
