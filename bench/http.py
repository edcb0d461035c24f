"""HTTP latency and throughput: sigserve side by side with MLServer and ``mlflow models serve``.

    .venv/bin/python bench/http.py                          # everything found, 15 s per cell
    .venv/bin/python bench/http.py --seconds 5 --servers floor,mlserver,mlflow
    SIGSERVE_BENCH_PG=postgresql://root@127.0.0.1:5432/sigserve_bench .venv/bin/python bench/http.py

What it measures, for every (server, endpoint) row at each concurrency (default 1 and 16):

- Closed loop: ``c`` keep-alive connections, each sending the next POST (a JSON body, one row) as soon
  as the previous answer arrived. p50/p90/p99 latency and req/s over ``--seconds`` (15), after a
  ``--warmup`` (3 s at the highest concurrency). The load generator is ``wrk`` with a Lua script (its
  ``done`` callback prints the percentiles); without wrk, ``--client python`` is a lean asyncio
  HTTP/1.1 client (it tops out lower than wrk: read the harness-floor row).
- The server is pinned to CPU 0 and the load generator to CPU 1 (``taskset``), as in
  shared/PERFORMANCE.md. ``--no-pin`` turns that off.
- Cold start: from the server process's start to its first successful prediction (polled every
  10 ms), median of ``--cold-runs`` (3) fresh starts.

Servers (``--servers``, default all):

- ``floor``: a do-nothing asyncio HTTP server (bench/peers/floor_server.py): what the harness costs.
- ``floor-busy``: the same server spinning ``--floor-spin-us`` (400 µs, about sigserve's inline
  request in its own process) per request: no allocations, no I/O, nothing of a real server's, so
  its tail is what this machine adds to a request that long (read it beside sigserve's p99).
- ``mlserver``: MLServer 1.7.1 + mlserver-lightgbm, V2 inference protocol JSON
  (``POST /v2/models/bench/infer``). Config in bench/peers/mlserver/: ``parallel_workers`` 0 (inference
  in the server process: the faster choice on one core, see ``--mlserver-workers``), no metrics server.
- ``mlflow``: ``mlflow models serve --env-manager local`` (mlflow 3.17.2, uvicorn, 1 worker) of an
  ``mlflow.lightgbm`` model, ``POST /invocations`` with ``dataframe_split``.
- ``sigserve``: ``python -m sigserve serve`` on the bench home, ``POST /api/v1/predict`` with the 32
  features inline, and ``POST /inference/run`` (feature row from the store, predict, policy, upsert)
  on DuckDB, and on PostgreSQL when ``SIGSERVE_BENCH_PG`` is set or 127.0.0.1:5432 answers (database
  ``sigserve_bench``, created and owned by this bench). A bearer token is sent on every request.

Each peer is installed on first use into its own venv, ``bench/.venvs/<peer>`` (pinned versions in
bench/peers/*-requirements.txt). All servers serve the same LightGBM model: 300 trees, 32 features,
binary, trained once by bench/common.py on ``--bars`` (20k) synthetic bars in ``bench/.home/http``.
Every request carries one row; the bodies cycle over 1,000 real feature rows. ``/inference/run`` has
two rows: *replayed bars* cycles over the timestamps of those rows on one signal, so after the first
lap every request recomputes a bar already served (a position read inside history, the stored row
replaced); *new bars* sends every bar in time order, each load (warm-up, each pass) on a signal of
its own made for the run and without history, as a trading engine asks for each new bar once.

Output: a table and the ratios of each sigserve row against the faster peer at the same concurrency,
and JSON in bench/results/http-<timestamp>.json. Under each sigserve row, the mean milliseconds of
each engine stage (feature_read, position_read, predict, policy, write) over its passes, from the
server's ``sigserve_stage_duration_seconds`` before and after each pass: where a request's time went.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py: keep its folder off the import path until the standard library's
# ``http`` is imported, or ``import http.client`` (here or in any library) would import this script.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import http.client  # noqa: E402

sys.path.append(str(HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    INTERVAL,
    N_FEATURES,
    N_TREES,
    SYMBOL,
    bench_home,
    free_port,
    machine,
    make_data,
    run_wrk,
    train_model,
    write_result,
    write_wrk_script,
)

REPO = HERE.parent
VENVS = HERE / ".venvs"
PEERS = HERE / "peers"
TOKEN = "bench-token-0123456789abcdef"
PG_DEFAULT = "postgresql://root@127.0.0.1:5432/sigserve_bench"
N_BODIES = 1_000
ALL_SERVERS = ("floor", "floor-busy", "mlserver", "mlflow", "sigserve")
PEER_NAMES = ("mlserver", "mlflow")


# --------------------------------------------------------------------------------------------------
# what is measured


@dataclass
class Target:
    """One measured row: an endpoint of a server and the bodies sent to it (cycled)."""

    server: str
    endpoint: str
    path: str
    bodies: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    note: str = ""
    # the bodies of this target's k-th load (smoke, warm-up, then each pass), when each must meet
    # a state of its own: /inference/run on new bars runs every load on a signal without history
    fresh: Callable[[int], list[str]] | None = None


@dataclass
class ServerSpec:
    name: str  # "sigserve (duckdb)", "mlserver", ...
    port: int
    argv: list[str]
    targets: list[Target]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    version: str = ""


@dataclass
class Row:
    server: str
    endpoint: str
    c: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    rps: float
    requests: int
    errors: int
    cold_start_s: float | None
    note: str = ""
    # sigserve only: mean ms per engine stage over the measured passes (from /metrics), by stage
    stages_ms: dict[str, float] | None = None


@dataclass
class Skip:
    server: str
    reason: str


# --------------------------------------------------------------------------------------------------
# the model and the request bodies


@dataclass
class Workload:
    model_path: Path
    names: tuple[str, ...]
    rows: np.ndarray  # (N_BODIES, 32), finite
    ts: np.ndarray  # their bar timestamps (datetime64[us])
    live_ts: np.ndarray  # every bar with a finite row, ascending: the new bars of a live signal


def workload(home: Path, bars: int) -> Workload:
    data = make_data(bars)
    model_path = train_model(data, home / f"model-{N_TREES}x{N_FEATURES}.txt")  # prepare_home's path
    finite = np.flatnonzero(np.isfinite(data.values).all(axis=1))
    picks = finite[np.linspace(len(finite) // 2, len(finite) - 1, N_BODIES).astype(int)]
    return Workload(model_path, data.names, data.values[picks], data.ts[picks], data.ts[finite])


def floats(row: np.ndarray) -> list[float]:
    return [float(x) for x in row]


def v2_bodies(w: Workload) -> list[str]:
    return [json.dumps({"inputs": [{"name": "input-0", "shape": [1, N_FEATURES], "datatype": "FP64",
                                    "data": floats(r)}]}) for r in w.rows]


def mlflow_bodies(w: Workload) -> list[str]:
    return [json.dumps({"dataframe_split": {"columns": list(w.names), "data": [floats(r)]}}) for r in w.rows]


def sigserve_predict_bodies(w: Workload, signal_id: str) -> list[str]:
    return [json.dumps({"symbol": SYMBOL, "signal_id": signal_id, "features": dict(zip(w.names, floats(r),
                                                                                       strict=True))})
            for r in w.rows]


def sigserve_run_bodies(w: Workload, signal_id: str, ts: np.ndarray | None = None) -> list[str]:
    return [json.dumps({"signal_id": signal_id, "symbol": SYMBOL, "ts": f"{t.astype('datetime64[us]')}Z",
                        "interval_name": INTERVAL, "source": "stream"}) for t in (w.ts if ts is None else ts)]


def new_bar_bodies(w: Workload, signal_ids: list[str]) -> Callable[[int], list[str]]:
    """The k-th load's bodies: every bar in time order, on a signal (``signal_ids[k]``) with no
    history, as a trading engine asks for each new bar once (the live path, not a replay)."""

    def bodies(k: int) -> list[str]:
        return sigserve_run_bodies(w, signal_ids[k], w.live_ts)

    return bodies


def json_headers(token: bool) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {TOKEN}"
    return headers


# --------------------------------------------------------------------------------------------------
# peers: venvs and server configs


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)


def ensure_venv(name: str) -> Path:
    """bench/.venvs/<name> with bench/peers/<name>-requirements.txt installed (once)."""
    venv = VENVS / name
    stamp = venv / ".installed"
    requirements = PEERS / f"{name}-requirements.txt"
    if stamp.exists() and stamp.read_text() == requirements.read_text():
        return venv
    print(f"installing {name} into {venv.relative_to(REPO)} (once; a few minutes) ...", flush=True)
    if not (venv / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r", str(requirements)])
    stamp.write_text(requirements.read_text())
    return venv


def package_version(venv: Path, package: str) -> str:
    out = run([str(venv / "bin" / "python"), "-c",
               f"import importlib.metadata as m; print(m.version({package!r}))"])
    return out.stdout.strip()


def mlserver_spec(w: Workload, work: Path, port: int, workers: int) -> ServerSpec:
    venv = ensure_venv("mlserver")
    repo = work / "mlserver"
    model_dir = repo / "bench"
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(w.model_path, model_dir / "model.txt")
    shutil.copy(PEERS / "mlserver" / "model-settings.json", model_dir / "model-settings.json")
    settings = json.loads((PEERS / "mlserver" / "settings.json").read_text())
    settings.update(http_port=port, grpc_port=free_port(), parallel_workers=workers,
                    metrics_dir=str(work / "mlserver-metrics"), environments_dir=str(work / "mlserver-envs"))
    (repo / "settings.json").write_text(json.dumps(settings, indent=2))
    target = Target("mlserver", "V2 /v2/models/bench/infer", "/v2/models/bench/infer", v2_bodies(w),
                    json_headers(False), note=f"parallel_workers={workers}")
    return ServerSpec("mlserver", port, [str(venv / "bin" / "mlserver"), "start", str(repo)], [target], cwd=repo,
                      version=f"mlserver {package_version(venv, 'mlserver')}")


def mlflow_spec(w: Workload, work: Path, port: int) -> ServerSpec:
    venv = ensure_venv("mlflow")
    model_dir = work / "mlflow-model"
    run([str(venv / "bin" / "python"), str(PEERS / "mlflow_save.py"), str(w.model_path), str(model_dir)])
    target = Target("mlflow", "/invocations dataframe_split", "/invocations", mlflow_bodies(w), json_headers(False))
    argv = [str(venv / "bin" / "mlflow"), "models", "serve", "-m", str(model_dir), "-h", "127.0.0.1",
            "-p", str(port), "-w", "1", "--env-manager", "local"]
    env = {"MLFLOW_TRACKING_URI": f"file://{work / 'mlruns'}", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    return ServerSpec("mlflow", port, argv, [target], env=env, cwd=work,
                      version=f"mlflow {package_version(venv, 'mlflow')}")


def floor_spec(w: Workload, port: int, spin_us: float = 0.0) -> ServerSpec:
    name = f"floor-busy ({spin_us:g} µs)" if spin_us else "floor"
    target = Target(name, "spin POST" if spin_us else "do-nothing POST", "/", mlflow_bodies(w), json_headers(False))
    argv = [sys.executable, str(PEERS / "floor_server.py"), str(port)] + ([str(spin_us)] if spin_us else [])
    return ServerSpec(name, port, argv, [target], version="asyncio protocol")


# --------------------------------------------------------------------------------------------------
# sigserve


def sigserve_can_serve() -> str | None:
    """None when ``python -m sigserve serve`` exists, else why not."""
    proc = subprocess.run([sys.executable, "-m", "sigserve", "serve", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        return "`python -m sigserve serve` is not available in this build"
    return None


async def prepare_sigserve(home: Path, bars: int, runtime: str, store_url: str | None,
                           new_signals: list[str]) -> tuple[str, str]:
    """The bench home's signal, and ``new_signals``: copies of it without history (new-bar loads)."""
    from common import prepare_home, settings_for

    from sigserve.app import Services

    overrides = {"store": store_url} if store_url else {}
    async with Services.open(settings_for(home, **overrides)) as services:
        card, signal_id = await prepare_home(services, bars, compiled=runtime == "lleaves")
        definition = await services.store.get_signal(signal_id)
        assert definition is not None
        for old in await services.store.list_signals():  # an earlier run's: retired, not warmed up
            if old.signal_id.startswith("bench-new-") and old.active:
                await services.store.set_signal_status(old.signal_id, "retired")
        for new_id in new_signals:
            await services.store.create_signal(dataclasses.replace(definition, signal_id=new_id))
    return signal_id, f"{card.name} v{card.version} ({card.runtime})"


def pg_url(explicit: str | None) -> tuple[str | None, str]:
    """The PostgreSQL URL to bench, or None and why not."""
    url = explicit or os.environ.get("SIGSERVE_BENCH_PG")
    if url:
        return url, "SIGSERVE_BENCH_PG"
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return PG_DEFAULT, "127.0.0.1:5432 answers"
    except OSError:
        return None, "no SIGSERVE_BENCH_PG and nothing answers at 127.0.0.1:5432"


def pg_store_supported(url: str) -> str | None:
    from sigserve.stores import open_store

    try:
        open_store(url)
    except Exception as exc:  # the store says why (e.g. not in this build yet)
        return f"{type(exc).__name__}: {exc}"
    return None


async def ensure_pg_database(url: str, fresh_home: Path) -> None:
    """Create the bench database when missing; a new database invalidates the bench home's markers."""
    import asyncpg

    base, _, dbname = url.rpartition("/")
    dbname = dbname.split("?")[0]
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{dbname}"')
            for marker in fresh_home.glob("data-*.json"):
                marker.unlink()
    finally:
        await conn.close()


def sigserve_specs(w: Workload, home: Path, args: argparse.Namespace, skips: list[Skip]) -> list[ServerSpec]:
    why = sigserve_can_serve()
    if why:
        skips.append(Skip("sigserve", why))
        return []
    specs = []
    stores: list[tuple[str, str | None, Path]] = [("duckdb", None, home)]
    if not args.no_pg:
        url, source = pg_url(args.pg)
        unsupported = pg_store_supported(url) if url else None
        if url is None:
            skips.append(Skip("sigserve (postgresql)", source))
        elif unsupported:
            skips.append(Skip("sigserve (postgresql)", f"store not supported: {unsupported}"))
        else:
            pg_home = home / "pg"
            pg_home.mkdir(parents=True, exist_ok=True)
            compiled = pg_home / "compiled"
            if not compiled.exists():  # share the lleaves cache (keyed by the artifact's sha)
                (home / "compiled").mkdir(parents=True, exist_ok=True)
                compiled.symlink_to(home / "compiled")
            shutil.copy(w.model_path, pg_home / w.model_path.name)  # the same model file
            asyncio.run(ensure_pg_database(url, pg_home))
            stores.append(("postgresql", url, pg_home))
    # new bars: each load (smoke, warm-up, every pass) on a signal of its own, made for this run
    loads = 2 + args.rounds * len(args.concurrency)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for kind, url, store_home in stores:
        new_ids = [f"bench-new-{stamp}-{k}" for k in range(loads)]
        signal_id, card = asyncio.run(prepare_sigserve(store_home, args.bars, args.runtime, url, new_ids))
        port = free_port()
        argv = [sys.executable, "-m", "sigserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if url:
            argv += ["--store", url]
        env = {"SIGSERVE_HOME": str(store_home), "SIGSERVE_AUTH_TOKEN": TOKEN, "SIGSERVE_PROFILE": "dev",
               "SIGSERVE_DEFAULT_SIGNAL": signal_id,  # warmed up at startup; the new-bar signals after it
               **dict(item.split("=", 1) for item in args.sigserve_env)}
        name = f"sigserve ({kind})"
        targets = [
            Target(name, "/inference/run (replayed bars)", "/inference/run", sigserve_run_bodies(w, signal_id),
                   json_headers(True), note=card),
            Target(name, "/inference/run (new bars)", "/inference/run", [], json_headers(True), note=card,
                   fresh=new_bar_bodies(w, new_ids)),
        ]
        if kind == "duckdb":
            targets.insert(0, Target(name, "/api/v1/predict inline", "/api/v1/predict",
                                     sigserve_predict_bodies(w, signal_id), json_headers(True), note=card))
        specs.append(ServerSpec(name, port, argv, targets, env=env, cwd=REPO, version=f"sigserve, {card}"))
    return specs


# --------------------------------------------------------------------------------------------------
# processes


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


@contextlib.contextmanager
def server_process(spec: ServerSpec, cpu: int | None, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, **spec.env}
    with log.open("ab") as out:
        proc = subprocess.Popen(pinned(spec.argv, cpu), env=env, cwd=spec.cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server and whatever it started (its own process group, made by start_new_session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)


def post_once(port: int, target: Target, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", target.path, body=target.bodies[0].encode(), headers=target.headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def cold_start(proc: subprocess.Popen[bytes], started: float, port: int, target: Target, log: Path,
               limit_s: float = 180.0) -> float:
    """Seconds from ``started`` (just before the process was spawned) to the first 200 prediction."""
    last = ""
    answering_since = None  # a server may answer non-200 while its model loads ("not ready yet")
    while time.perf_counter() - started < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{target.server} exited with {proc.returncode}:\n{tail(log)}")
        try:
            status, body = post_once(port, target, timeout=5.0)
        except OSError as exc:
            last = repr(exc)
        else:
            if status == 200:
                return time.perf_counter() - started
            last = f"HTTP {status}: {body[:300]!r}"
            answering_since = answering_since or time.perf_counter()
            if time.perf_counter() - answering_since > 30:  # a real refusal, not "still starting"
                raise RuntimeError(f"{target.server} {target.path} answered {last}\n{tail(log)}")
        time.sleep(0.01)
    raise RuntimeError(f"{target.server}: no successful prediction within {limit_s:.0f} s ({last})\n{tail(log)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# load generators


def wrk_script(target: Target, path: Path) -> Path:
    return write_wrk_script(path, target.bodies, target.headers)


def wrk_load(port: int, target: Target, c: int, seconds: float, cpu: int | None, script: Path) -> dict[str, Any]:
    return run_wrk(port, target.path, c, seconds, script, cpu)


async def _python_load(port: int, target: Target, c: int, seconds: float) -> dict[str, Any]:
    """A lean closed-loop HTTP/1.1 keep-alive client on raw asyncio streams."""
    head = "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
    requests = [(f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}Content-Length: "
                 f"{len(b.encode())}\r\n\r\n{b}").encode() for b in target.bodies]
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def connection(offset: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                writer.write(requests[i % len(requests)])
                i += 1
                header = await reader.readuntil(b"\r\n\r\n")
                status = int(header[9:12])
                length = 0
                chunked = False
                for line in header.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    lname = name.strip().lower()
                    if lname == b"content-length":
                        length = int(value)
                    elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                if chunked:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                else:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if status >= 400:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(k * 37) for k in range(c)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pick(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3 if ordered else None

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99), "max_ms": pick(1.0),
            "rps": len(latencies) / elapsed, "requests": len(latencies), "errors": errors}


def python_load(port: int, target: Target, c: int, seconds: float, cpu: int | None, script: Path) -> dict[str, Any]:
    del script
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(_python_load(port, target, c, seconds))


# --------------------------------------------------------------------------------------------------
# the run


LoadFn = Callable[[int, Target, int, float, "int | None", Path], dict[str, Any]]


@dataclass
class Live:
    """A started server, after its cold starts, with its wrk scripts."""

    spec: ServerSpec
    cold_start_s: float
    log: Path
    scripts: list[Path]


def loaded(target: Target, k: int) -> Target:
    """``target`` with the bodies of its k-th load (0: the smoke request, 1: the warm-up, then the
    passes), for a target whose loads each need a fresh state; else ``target`` itself."""
    return target if target.fresh is None else dataclasses.replace(target, bodies=target.fresh(k))


def start_server(spec: ServerSpec, args: argparse.Namespace, work: Path, server_cpu: int | None,
                 stack: contextlib.ExitStack) -> Live:
    """``--cold-runs`` fresh starts, each to its first successful prediction; the last one stays up."""
    log = work / f"{spec.name.replace(' ', '_').replace('(', '').replace(')', '')}.log"
    colds = []
    for run_no in range(args.cold_runs):
        last = run_no == args.cold_runs - 1
        started = time.perf_counter()
        with contextlib.ExitStack() as attempt:
            proc = attempt.enter_context(server_process(spec, server_cpu, log))
            colds.append(cold_start(proc, started, spec.port, spec.targets[0], log))
            print(f"  {spec.name}: cold start {colds[-1]:.2f} s", flush=True)
            if last:
                stack.push(attempt.pop_all())  # keep it running for the load cells
    scripts = []
    for target in spec.targets:
        target = loaded(target, 0)
        status, body = post_once(spec.port, target)
        if status != 200:
            raise RuntimeError(f"{spec.name} {target.path}: HTTP {status} {body[:300]!r}")
        print(f"  {target.endpoint}: {body[:160].decode(errors='replace')}", flush=True)
        scripts.append(wrk_script(target, work / f"{len(list(work.glob('*.lua')))}.lua"))
    return Live(spec, statistics.median(colds), log, scripts)


ERROR_CODE = re.compile(rb"-> ([a-z_]+):")
STAGE_SAMPLE = re.compile(r'^sigserve_stage_duration_seconds_(sum|count)\{stage="([a-z_]+)"\} (\S+)$', re.M)


def stage_totals(port: int) -> dict[str, list[float]] | None:
    """sigserve's ``sigserve_stage_duration_seconds`` as {stage: [sum_s, count]}; None for a peer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        conn.request("GET", "/metrics", headers=json_headers(True))
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
    except OSError:
        return None
    finally:
        conn.close()
    if response.status != 200:
        return None
    totals: dict[str, list[float]] = {}
    for kind, stage, value in STAGE_SAMPLE.findall(text):
        totals.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return totals


def add_stage_totals(before: dict[str, list[float]] | None, after: dict[str, list[float]] | None,
                acc: dict[str, list[float]]) -> None:
    """Add one pass's per-stage (seconds, observations) to ``acc``."""
    if before is None or after is None:
        return
    for stage, (total, count) in after.items():
        was = before.get(stage, [0.0, 0.0])
        slot = acc.setdefault(stage, [0.0, 0.0])
        slot[0] += total - was[0]
        slot[1] += count - was[1]


def log_error_codes(log: Path, since: int) -> dict[str, int]:
    """sigserve logs each refusal as ``POST /path -> error_code: message``; count them."""
    with log.open("rb") as f:
        f.seek(since)
        return dict(Counter(m.decode() for m in ERROR_CODE.findall(f.read())))


def measure(lives: list[Live], args: argparse.Namespace, load: LoadFn, client_cpu: int | None) -> list[Row]:
    """Every (server, endpoint, c) cell; with ``--rounds`` N, N interleaved passes of seconds/N each."""
    cells = [(live, target, script, c) for live in lives for target, script in zip(live.spec.targets, live.scripts,
                                                                                    strict=True)
             for c in args.concurrency]
    loads: Counter[int] = Counter()  # per target: its loads so far (the smoke request was one)

    def next_load(target: Target, script: Path) -> tuple[Target, Path]:
        if target.fresh is None:
            return target, script
        key = id(target)
        loads[key] += 1
        fresh = loaded(target, loads[key])
        return fresh, wrk_script(fresh, script.with_name(f"{script.stem}-{loads[key]}.lua"))

    if args.warmup > 0:
        for live, target, script in {(cell[0].spec.name, cell[1].endpoint): cell[:3] for cell in cells}.values():
            target, script = next_load(target, script)
            load(live.spec.port, target, max(args.concurrency), args.warmup, client_cpu, script)
    parts: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(cells))}
    codes: dict[int, Counter[str]] = {i: Counter() for i in range(len(cells))}
    stages: dict[int, dict[str, list[float]]] = {i: {} for i in range(len(cells))}
    sigserve = {live.spec.name for live in lives if live.spec.name.startswith("sigserve")}
    for round_no in range(args.rounds):
        if args.rounds > 1:
            print(f"  round {round_no + 1}/{args.rounds}", flush=True)
        for i, (live, target, script, c) in enumerate(cells):
            since = live.log.stat().st_size
            target, script = next_load(target, script)
            before = stage_totals(live.spec.port) if live.spec.name in sigserve else None
            parts[i].append(load(live.spec.port, target, c, args.seconds / args.rounds, client_cpu, script))
            codes[i].update(log_error_codes(live.log, since))
            if before is not None:
                add_stage_totals(before, stage_totals(live.spec.port), stages[i])
    rows = []
    for i, (live, target, _script, c) in enumerate(cells):
        results = parts[i]
        requests = sum(r["requests"] for r in results)

        def median(key: str, results: list[dict[str, Any]] = results) -> float | None:
            values = [r[key] for r in results if r[key] is not None]
            return statistics.median(values) if values else None

        duration = sum(r["requests"] / r["rps"] for r in results if r["rps"])
        note = target.note + (f"; errors by code: {dict(codes[i])}" if codes[i] else "")
        row = Row(live.spec.name, target.endpoint, c, median("p50_ms"), median("p90_ms"), median("p99_ms"),
                  max((r["max_ms"] for r in results if r["max_ms"] is not None), default=None),
                  requests / duration if duration else 0.0, requests, sum(r["errors"] for r in results),
                  live.cold_start_s, note.strip("; "),
                  {stage: round(total / count * 1000.0, 3) for stage, (total, count) in stages[i].items()
                   if count > 0} or None)
        rows.append(row)
        print(f"  {fmt_row(row)}", flush=True)
        if row.stages_ms:
            print("    mean ms per stage observation: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row.stages_ms.items()), flush=True)
        if row.errors:
            print(f"    ({row.note})", flush=True)
    return rows


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_row(row: Row) -> str:
    return (f"{row.server:<22} {row.endpoint:<30} {row.c:>3} {fmt(row.p50_ms):>8} {fmt(row.p90_ms):>8} "
            f"{fmt(row.p99_ms):>8} {fmt(row.rps, 0):>8} {fmt(row.cold_start_s):>7}"
            + (f"  errors={row.errors}" if row.errors else ""))


def table(rows: list[Row]) -> str:
    head = (f"{'server':<22} {'endpoint':<30} {'c':>3} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8} "
            f"{'cold s':>7}")
    return "\n".join([head, "-" * len(head), *(fmt_row(r) for r in rows)])


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Each sigserve row against the faster peer (more req/s) at the same concurrency."""
    out = []
    for row in rows:
        if not row.server.startswith("sigserve") or not row.requests:
            continue
        peers = [r for r in rows if r.server in PEER_NAMES and r.c == row.c and r.requests]
        if not peers:
            continue
        best = max(peers, key=lambda r: r.rps)
        out.append({"server": row.server, "endpoint": row.endpoint, "c": row.c, "vs": best.server,
                    "rps": row.rps, "peer_rps": best.rps, "throughput_x": row.rps / best.rps,
                    "p99_ms": row.p99_ms, "peer_p99_ms": best.p99_ms, "cold_start_s": row.cold_start_s,
                    "peer_cold_start_s": best.cold_start_s,
                    "p99_x_lower": (best.p99_ms / row.p99_ms) if row.p99_ms and best.p99_ms else None,
                    "p50_x_lower": (best.p50_ms / row.p50_ms) if row.p50_ms and best.p50_ms else None,
                    "cold_start_x_faster": (best.cold_start_s / row.cold_start_s)
                    if row.cold_start_s and best.cold_start_s else None})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per cell (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per endpoint, not measured")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16],
                        help="comma-separated connection counts (default 1,16)")
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(ALL_SERVERS),
                        help=f"comma-separated subset of {','.join(ALL_SERVERS)}")
    parser.add_argument("--bars", type=int, default=20_000, help="bars in the bench home (default 20k)")
    parser.add_argument("--runtime", choices=("lleaves", "lightgbm"), default="lleaves",
                        help="sigserve's runtime for the model (lleaves: compiled once, cached)")
    parser.add_argument("--pg", help="PostgreSQL URL for sigserve (default: SIGSERVE_BENCH_PG, or the local "
                                     f"server as {PG_DEFAULT})")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL row")
    parser.add_argument("--rounds", type=int, default=1,
                        help="split each cell into N interleaved passes (all servers up at once) so that "
                             "other work on the machine falls on every server alike; percentiles are the "
                             "median over passes")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh starts per server for the cold start")
    parser.add_argument("--mlserver-workers", type=int, default=0,
                        help="MLServer parallel_workers (0: inference in the server process; its default is 1)")
    parser.add_argument("--sigserve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the sigserve server, e.g. SIGSERVE_DEADLINE_MS=1000 (repeatable)")
    parser.add_argument("--client", choices=("wrk", "python"), default="wrk", help="load generator")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and load generator to CPUs")
    parser.add_argument("--floor-spin-us", type=float, default=400.0,
                        help="per-request spin of the floor-busy server (default 400: sigserve's inline request)")
    args = parser.parse_args(argv)
    unknown = set(args.servers) - set(ALL_SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}: choose from {','.join(ALL_SERVERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client == "wrk" and shutil.which("wrk") is None:
        print("wrk is not installed. Install it (Debian/Ubuntu):  apt-get update && apt-get install -y wrk\n"
              "or run with --client python (a lean asyncio client; lower ceiling than wrk).", file=sys.stderr)
        return 2
    pin = not args.no_pin and shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2
    cpus: tuple[int | None, int | None] = (0, 1) if pin else (None, None)
    load: LoadFn = wrk_load if args.client == "wrk" else python_load

    load_1m = os.getloadavg()[0]
    if load_1m > 0.7:
        print(f"note: load average {load_1m:.1f} before the run: other work on this machine skews the figures",
              flush=True)
    home = bench_home() / "http"
    home.mkdir(parents=True, exist_ok=True)
    print(f"bench home {home}; model: {N_TREES} trees, {N_FEATURES} features, binary; {args.bars:,} bars", flush=True)
    w = workload(home, args.bars)

    skips: list[Skip] = []
    specs: list[ServerSpec] = []
    work = Path(tempfile.mkdtemp(prefix="sigserve-http-bench-"))
    for name in args.servers:
        port = free_port()
        if name == "floor":
            spec = floor_spec(w, port)
        elif name == "floor-busy":
            spec = floor_spec(w, port, args.floor_spin_us)
        elif name == "mlserver":
            spec = mlserver_spec(w, work, port, args.mlserver_workers)
        elif name == "mlflow":
            spec = mlflow_spec(w, work, port)
        else:
            specs += sigserve_specs(w, home, args, skips)
            continue
        specs.append(spec)
    for skip in skips:
        print(f"skipping {skip.server}: {skip.reason}", flush=True)

    rows: list[Row] = []
    failures: list[Skip] = []
    with contextlib.ExitStack() as stack:
        lives = []
        if args.rounds > 1:  # all servers up at once (idle ones cost nothing), cells interleaved
            for spec in specs:
                print(f"\n== {spec.name} ({spec.version})", flush=True)
                try:
                    lives.append(start_server(spec, args, work, cpus[0], stack))
                except Exception as exc:  # one broken server should not lose the others' figures
                    print(f"  FAILED: {exc}", flush=True)
                    failures.append(Skip(spec.name, str(exc)[:2000]))
            print(f"\n== load: {args.rounds} interleaved rounds", flush=True)
            rows = measure(lives, args, load, cpus[1])
        else:  # one server at a time
            for spec in specs:
                print(f"\n== {spec.name} ({spec.version})", flush=True)
                try:
                    with contextlib.ExitStack() as one:
                        rows += measure([start_server(spec, args, work, cpus[0], one)], args, load, cpus[1])
                except Exception as exc:
                    print(f"  FAILED: {exc}", flush=True)
                    failures.append(Skip(spec.name, str(exc)[:2000]))

    print(f"\nclosed loop, {args.seconds:g} s per cell ({args.rounds} round(s)), server on CPU {cpus[0]}, "
          f"{args.client} on CPU {cpus[1]}; "
          f"cold start = median of {args.cold_runs} fresh starts to the first 200\n")
    print(table(rows))
    for spec in specs:
        print(f"  {spec.name}: {spec.version}" + "".join(f"; {t.endpoint}: {t.note}" for t in spec.targets
                                                        if t.note and not spec.name.startswith("sigserve")))
    found = ratios(rows)
    if found:
        print("\nsigserve vs the faster peer (more req/s at the same c); x>1 is better for sigserve:")
        for r in found:
            print(f"  {r['server']} {r['endpoint']} c={r['c']} vs {r['vs']}: req/s x{r['throughput_x']:.2f}; "
                  f"p99 {fmt(r['p99_ms'])} vs {fmt(r['peer_p99_ms'])} ms (x{fmt(r['p99_x_lower'])} lower); "
                  f"cold start {fmt(r['cold_start_s'])} vs {fmt(r['peer_cold_start_s'])} s")
    for skip in skips + failures:
        print(f"not measured: {skip.server}: {skip.reason.splitlines()[0]}")
    path = write_result("http", {
        "machine": machine(), "load_avg_1m_before": load_1m, "load_avg_1m_after": os.getloadavg()[0],
        "client": args.client, "wrk": wrk_version() if args.client == "wrk" else None,
        "pinned": {"server_cpu": cpus[0], "client_cpu": cpus[1]}, "seconds": args.seconds, "warmup": args.warmup,
        "concurrency": args.concurrency, "rounds": args.rounds, "cold_runs": args.cold_runs, "bars": args.bars,
        "model": {"trees": N_TREES, "features": N_FEATURES, "objective": "binary", "file": str(w.model_path)},
        "servers": {s.name: s.version for s in specs}, "rows": [asdict(r) for r in rows], "ratios": found,
        "skipped": [asdict(s) for s in skips], "failed": [asdict(s) for s in failures]})
    print(f"\nwrote {path.relative_to(REPO)}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def wrk_version() -> str:
    proc = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).splitlines()[0].strip()


if __name__ == "__main__":
    sys.exit(main())
