"""Rollout costs over real HTTP: shadows, a 3-model ensemble, rollback under load, hot swaps.

    flock /tmp/sigserve-bench.lock .venv/bin/python bench/rollout.py --seconds 5 --rounds 3

One ``python -m sigserve serve`` (DuckDB, pinned to CPU 0) serves a 300-tree x 32-feature
LightGBM (version 1), a second one trained differently (version 2), and a regime-gated ensemble of
three such models (a bull/bear regime model and the two as specialists), all compiled by lleaves
as ``sigserve models compile`` does (``--runtime lightgbm``: LightGBM's own runtime, in a home of
its own). The clients run on CPU 1
and send ``POST /api/v1/predict`` with the 32 features inline, cycling over 1,000 real rows, in a
closed keep-alive loop (c=1): the latency phases (1, 2) use wrk when it is installed (as
bench/http.py; the Python client's own tail was most of the p99), the others a Python
http.client loop (with its garbage collector paused while it measures).

1. **Shadow overhead**: p50/p99 without a rollout, then with version 2 as a shadow (``POST
   /admin/rollouts/{id}/start``), alternated ``--rounds`` times; the medians and the p99 ratio
   (target <= 1.10). Shadow predictions run in the server's shadow worker process
   (``--shadow-worker loop``: in its event loop after the response), gathered for
   ``SIGSERVE_SHADOW_LINGER_MS`` (100 ms) and predicted together. The worker runs under
   SCHED_IDLE on CPU 1 (``--shadow-cpus``; ``server``: on the server's CPU 0).
2. **Ensemble**: p50/p99 of the ensemble signal (target p99 <= 3 ms).
3. **Rollback under load**: version 2 takes 100%; while the load runs, ``POST .../rollback``; the
   time from sending it to its answer, and to the first load answer from version 1 (``--trials``).
4. **Hot swaps under load**: 20 policy changes (start, advance x3, rollback, ...) while the load
   runs: failed requests, and answers whose version/sha pair is not one of the served versions.

JSON in bench/results/rollout-<timestamp>.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/http.py would shadow the standard library's http: keep this folder off the path for it
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.append(str(HERE))
from common import (  # noqa: E402
    INTERVAL,
    N_TREES,
    ROOT,
    SYMBOL,
    free_port,
    machine,
    make_data,
    percentiles,
    run_wrk,
    write_result,
    write_wrk_script,
)

TOKEN = "bench-rollout-token-0123456789"
SIGNAL, ENSEMBLE = "bench-rollout", "bench-gated"
PHASES = ("shadow", "ensemble", "explain", "rollback", "swaps")


def _train(values: np.ndarray, names: tuple[str, ...], label: np.ndarray, path: Path, seed: int) -> Path:
    import lightgbm as lgb

    if path.exists():
        return path
    rows = slice(100, min(len(label), 20_100))
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.05, "verbose": -1,
              "num_threads": 2, "deterministic": True, "seed": seed, "min_data_in_leaf": 50,
              "feature_fraction": 0.8 if seed != 1 else 1.0}
    booster = lgb.train(params, lgb.Dataset(values[rows], label[rows], feature_name=list(names)),
                        num_boost_round=N_TREES)
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path))
    return path


def build(home: Path, runtime: str) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    data = make_data(22_000)
    close = data.candles.close
    up = np.r_[close[15:] > close[:-15], np.zeros(15, bool)].astype(np.int32)
    up60 = np.r_[close[60:] > close[:-60], np.zeros(60, bool)].astype(np.int32)
    trend = np.r_[np.zeros(240, bool), close[240:] > close[:-240]].astype(np.int32)
    models = home.parent / "rollout-models"  # shared by both runtimes' homes
    m1 = _train(data.values, data.names, up, models / "v1.txt", 1)
    m2 = _train(data.values, data.names, up60, models / "v2.txt", 2)
    regime = _train(data.values, data.names, trend, models / "regime.txt", 3)
    if not (home / "ready").exists():
        from sigserve.app import Services
        from sigserve.config import Settings
        from sigserve.domain import Policy, SignalDefinition, Stage
        from sigserve.ensemble import register_ensemble

        async def setup() -> None:
            async with Services.open(Settings(home=home)) as services:
                registry, store = services.registry, services.store
                await store.register_features(list(data.names))
                one = await registry.register(m1, name="bench", classes=["down", "up"])
                await registry.promote("bench", one.version, Stage.PRODUCTION)
                two = await registry.register(m2, name="bench", classes=["down", "up"])
                reg = await registry.register(regime, name="bench-regime", classes=["bear", "bull"])
                if runtime == "lleaves":  # as bench/http.py: served compiled (sigserve models compile)
                    print("compiling the three models with lleaves (once per bench home) ...", flush=True)
                    for card in (one, two, reg):
                        await registry.compile(card.name, card.version)
                gated = await register_ensemble(registry, "bench-gated", regime=reg.ref,
                                                specialists={"bull": one.ref, "bear": two.ref})
                policy = Policy(threshold=0.55, atr_feature="atr_14")
                await store.create_signal(SignalDefinition(SIGNAL, "bench", "@production", INTERVAL, (), policy))
                await store.create_signal(SignalDefinition(ENSEMBLE, "bench-gated", str(gated.version),
                                                           INTERVAL, (), policy))

        asyncio.run(setup())
        (home / "ready").write_text("ok")
    return data.values, data.names, close


async def in_process(home: Path, values: np.ndarray, names: tuple[str, ...], close: np.ndarray,
                     calls: int = 5000) -> dict[str, Any]:
    """``Engine.predict_inline`` in this process (no HTTP): the plain signal and the ensemble."""
    from sigserve.app import Services
    from sigserve.config import Settings

    out: dict[str, Any] = {}
    async with Services.open(Settings(home=home, prepared_ttl_s=3600.0)) as services:
        engine = services.engine
        rows = [{n: float(v) for n, v in zip(names, values[i], strict=True)} for i in range(1000, 1200)]
        ts = np.datetime64("2024-01-01T00:00", "us")
        for signal in (SIGNAL, ENSEMBLE):
            for i in range(500):
                await engine.predict_inline(signal, SYMBOL, rows[i % 200], ts, close=float(close[1000]))
            lat = []
            for i in range(calls):
                began = time.perf_counter()
                await engine.predict_inline(signal, SYMBOL, rows[i % 200], ts, close=float(close[1000]))
                lat.append((time.perf_counter() - began) * 1000.0)
            out[signal] = percentiles(lat)
    return out


class Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            self.conn.request("POST", path, body=body, headers=self.headers)
            r = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):  # an idle keep-alive closed: reconnect
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.conn.request("POST", path, body=body, headers=self.headers)
            r = self.conn.getresponse()
        return r.status, json.loads(r.read())


def bodies(values: np.ndarray, names: tuple[str, ...], close: np.ndarray, signal: str) -> list[bytes]:
    out = []
    for i in range(1000, 2000):
        feats = {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names, values[i], strict=True)}
        feats["close"] = float(close[i])
        out.append(json.dumps({"symbol": SYMBOL, "signal_id": signal, "timestamp": 1_700_000_000 + 86_400 * (i % 50),
                               "features": feats}).encode())
    return out


def closed_loop(client: Client, payloads: list[bytes], seconds: float) -> tuple[list[float], int]:
    lat, failed, i = [], 0, 0
    gc.collect()
    gc.disable()  # the client's own collections are not the server's latency
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            began = time.perf_counter()
            status, _ = client.post("/api/v1/predict", payloads[i % len(payloads)])
            lat.append((time.perf_counter() - began) * 1000.0)
            failed += status != 200
            i += 1
    finally:
        gc.enable()
    return lat, failed


class Latency:
    """p50/p99 of ``POST /api/v1/predict`` at concurrency 1: wrk on CPU 1 when it is installed (the
    HTTP bench's load generator, whose own tail is lowest), else the Python client."""

    def __init__(self, port: int, client: Client, work: Path, pin: bool) -> None:
        self.port, self.client, self.work = port, client, work
        self.cpu = 1 if pin else None
        self.tool = "wrk" if shutil.which("wrk") else "python http.client"
        self._scripts: dict[int, Path] = {}

    def measure(self, payloads: list[bytes], seconds: float) -> dict[str, float]:
        if self.tool != "wrk":
            lat, failed = closed_loop(self.client, payloads, seconds)
            return {**percentiles(lat), "failed": failed}
        script = self._scripts.get(id(payloads))
        if script is None:
            script = write_wrk_script(self.work / f"load-{len(self._scripts)}.lua",
                                      [p.decode() for p in payloads], self.client.headers)
            self._scripts[id(payloads)] = script
        out = run_wrk(self.port, "/api/v1/predict", 1, seconds, script, self.cpu)
        return {"p50": out["p50_ms"], "p90": out["p90_ms"], "p99": out["p99_ms"], "max": out["max_ms"],
                "n": out["requests"], "failed": out["errors"]}


class Load(threading.Thread):
    """Background closed loop that records (sent, received, status, version, sha)."""

    def __init__(self, port: int, payloads: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.client = Client(port)
        self.payloads = payloads
        self.stop = threading.Event()
        self.seen: list[tuple[float, float, int, int | None, str | None]] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            sent = time.perf_counter()
            status, body = self.client.post("/api/v1/predict", self.payloads[i % len(self.payloads)])
            meta = body.get("metadata") or {}
            self.seen.append((sent, time.perf_counter(), status, meta.get("model_version"), meta.get("model_sha256")))
            i += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, of {','.join(PHASES)} (default: all)")
    parser.add_argument("--shadow-worker", choices=("process", "loop"), default="process",
                        help="SIGSERVE_SHADOW_WORKER of the server")
    parser.add_argument("--shadow-cpus", default="1",
                        help="SIGSERVE_SHADOW_CPUS of the server: the CPUs of its shadow worker process"
                        " (default 1, the core the server is not pinned to; 'server': the server's own)")
    parser.add_argument("--runtime", choices=("lleaves", "lightgbm"), default="lleaves",
                        help="how the three LightGBM models are served (lleaves: compiled once per bench home)")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if phases - set(PHASES):
        parser.error(f"unknown phases: {sorted(phases - set(PHASES))}")
    base = Path(os.environ.get("SIGSERVE_BENCH_HOME", ROOT / ".home")).resolve()
    home = base / ("rollout" if args.runtime == "lightgbm" else "rollout-lleaves")
    home.mkdir(parents=True, exist_ok=True)
    values, names, close = build(home, args.runtime)
    plain = bodies(values, names, close, SIGNAL)
    gated = bodies(values, names, close, ENSEMBLE)
    result: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    if not args.no_pin:
        os.sched_setaffinity(0, {1})
    result["in_process"] = asyncio.run(in_process(home, values, names, close))
    port = free_port()
    env = {**os.environ, "SIGSERVE_HOME": str(home), "SIGSERVE_AUTH_TOKEN": TOKEN,
           "SIGSERVE_DEFAULT_SIGNAL": SIGNAL, "SIGSERVE_DEADLINE_MS": "1000",
           "SIGSERVE_SHADOW_WORKER": args.shadow_worker}
    if args.shadow_cpus != "server" and not args.no_pin:
        env["SIGSERVE_SHADOW_CPUS"] = args.shadow_cpus
    cmd = [sys.executable, "-m", "sigserve", "serve", "--port", str(port)]
    if not args.no_pin:
        cmd = ["taskset", "-c", "0", *cmd]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            try:
                client = Client(port)
                if client.post("/api/v1/predict", plain[0])[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read().decode() if server.stderr else ''}")
            time.sleep(0.1)
        admin = Client(port)
        admin.post(f"/admin/rollouts/{SIGNAL}/rollback", b"{}")  # a clean policy if a run left one
        closed_loop(client, plain, 2.0)  # warm-up
        latency = Latency(port, client, home, not args.no_pin)
        result["latency_client"] = latency.tool
        if "shadow" in phases:
            # 1. shadow overhead
            rows: dict[str, list[dict[str, float]]] = {"no_shadow": [], "one_shadow": []}
            for _ in range(args.rounds):
                for mode in ("no_shadow", "one_shadow"):
                    if mode == "one_shadow":
                        status, body = admin.post(f"/admin/rollouts/{SIGNAL}/start", b'{"version": 2}')
                        assert status == 200, body
                    closed_loop(client, plain, 0.5)
                    rows[mode].append(latency.measure(plain, args.seconds))
                    if mode == "one_shadow":
                        status, body = admin.post(f"/admin/rollouts/{SIGNAL}/rollback", b"{}")
                        assert status == 200, body
            med = {m: {k: statistics.median(r[k] for r in rs) for k in ("p50", "p99", "n")} for m, rs in rows.items()}
            result["shadow"] = {"runs": rows, "median": med,
                                "p99_ratio": med["one_shadow"]["p99"] / med["no_shadow"]["p99"],
                                "p50_ratio": med["one_shadow"]["p50"] / med["no_shadow"]["p50"]}
        if "ensemble" in phases:
            # 2. ensemble
            closed_loop(client, gated, 1.0)
            ens = [latency.measure(gated, args.seconds) for _ in range(args.rounds)]
            result["ensemble"] = {"runs": ens,
                                  "median": {k: statistics.median(r[k] for r in ens) for k in ("p50", "p99")}}
        if "explain" in phases:
            # 2b. explanations: the same requests with explain: true (their own latency reported)
            explained = [b[:-1] + b', "explain": true}' for b in plain]
            closed_loop(client, explained, 1.0)
            ex_runs, ex_own = [], []
            for _ in range(args.rounds):
                lat, own, i = [], [], 0
                end = time.perf_counter() + args.seconds
                while time.perf_counter() < end:
                    began = time.perf_counter()
                    status, body = client.post("/api/v1/predict", explained[i % len(explained)])
                    lat.append((time.perf_counter() - began) * 1000.0)
                    own.append(body["metadata"]["explanation"]["latency_ms"])
                    i += 1
                ex_runs.append(percentiles(lat))
                ex_own.append(percentiles(own))
            result["explain"] = {"runs": ex_runs, "explain_stage": ex_own,
                                 "median": {k: statistics.median(r[k] for r in ex_runs) for k in ("p50", "p99")},
                                 "explain_stage_median": {k: statistics.median(r[k] for r in ex_own)
                                                          for k in ("p50", "p99")}}
        if "rollback" in phases:
            # 3. rollback under load
            trials = []
            for _ in range(args.trials):
                admin.post(f"/admin/rollouts/{SIGNAL}/start", b'{"version": 2, "share": 1.0}')
                load = Load(port, plain)
                load.start()
                time.sleep(0.5)
                t0 = time.perf_counter()
                status, _ = admin.post(f"/admin/rollouts/{SIGNAL}/rollback", b"{}")
                answered = time.perf_counter()
                time.sleep(0.3)
                load.stop.set()
                load.join()
                first = min((recv for sent, recv, st, v, _ in load.seen if recv > t0 and v == 1 and sent > t0),
                            default=None)
                stale = sum(1 for sent, _, _, v, _ in load.seen if sent > answered and v != 1)
                trials.append({"command_ms": (answered - t0) * 1000.0,
                               "to_first_champion_answer_ms": None if first is None else (first - t0) * 1000.0,
                               "requests_after_answer_not_champion": stale,
                               "failed": sum(1 for row in load.seen if row[2] != 200)})
            result["rollback"] = {"trials": trials,
                                  "median_command_ms": statistics.median(t["command_ms"] for t in trials),
                                  "median_to_effect_ms": statistics.median(t["to_first_champion_answer_ms"] or 1e9
                                                                           for t in trials)}
        if "swaps" in phases:
            # 4. 20 swaps under load
            load = Load(port, plain)
            load.start()
            steps = ["start", "advance", "advance", "advance", "rollback"] * 4
            swap_ms = []
            for step in steps:
                began = time.perf_counter()
                status, body = admin.post(f"/admin/rollouts/{SIGNAL}/{step}",
                                          b'{"version": 2}' if step == "start" else b"{}")
                swap_ms.append((time.perf_counter() - began) * 1000.0)
                assert status == 200, body
                time.sleep(0.1)
            load.stop.set()
            load.join()
            shas = {v: s for _, _, st, v, s in load.seen if st == 200}
            result["swaps"] = {"swaps": len(steps), "requests": len(load.seen),
                               "failed": sum(1 for _, _, st, _, _ in load.seen if st != 200),
                               "versions_seen": sorted(v for v in shas if v is not None),
                               "sha_per_version": {str(k): v for k, v in shas.items()},
                               "swap_command_ms": percentiles(swap_ms)}
    finally:
        server.terminate()
        server.wait(10)
    path = write_result("rollout", result)
    if "shadow" in result:
        s = result["shadow"]
        print(f"shadow: p50 {s['median']['no_shadow']['p50']:.3f} -> {s['median']['one_shadow']['p50']:.3f} ms,"
              f" p99 {s['median']['no_shadow']['p99']:.3f} -> {s['median']['one_shadow']['p99']:.3f} ms"
              f" (ratio {s['p99_ratio']:.3f})")
    print(f"latency client: {result['latency_client']}")
    if "ensemble" in result:
        e = result["ensemble"]
        print(f"ensemble (3 models) over HTTP: p50 {e['median']['p50']:.3f} ms, p99 {e['median']['p99']:.3f} ms")
    for signal, st in result["in_process"].items():
        print(f"in process, predict_inline {signal}: p50 {st['p50']:.3f} ms, p99 {st['p99']:.3f} ms")
    if "explain" in result:
        x = result["explain"]
        print(f"explain: request p50 {x['median']['p50']:.3f} ms, p99 {x['median']['p99']:.3f} ms; the explanation"
              f" itself p50 {x['explain_stage_median']['p50']:.3f} ms, p99 {x['explain_stage_median']['p99']:.3f} ms")
    if "rollback" in result:
        r = result["rollback"]
        print(f"rollback under load: command {r['median_command_ms']:.2f} ms,"
              f" to effect {r['median_to_effect_ms']:.2f} ms")
    if "swaps" in result:
        w = result["swaps"]
        print(f"20 swaps under load: {w['requests']} requests, {w['failed']} failed, versions {w['versions_seen']}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
