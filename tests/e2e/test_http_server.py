"""The HTTP service as a user starts it: ``python -m sigserve serve`` in a subprocess (uvicorn).

- the production profile refuses to start without a real token (non-zero exit, one clear line);
- a DuckDB store refuses more than one worker;
- a real server answers over TCP on 127.0.0.1, with the token, and stops cleanly;
- a bounded Schemathesis run over the server's own OpenAPI schema (valid and invalid inputs)
  finds no 5xx answer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.http_world import AUTH, BTC, ETH, INTERVAL, SIGNAL, TOKEN, World, copy_home

pytestmark = pytest.mark.e2e


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGSERVE_")}
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(home: Path, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sigserve", "--home", str(home), "serve", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)


# --- refusals before a port is bound ----------------------------------------------------------------
@pytest.mark.parametrize("token, reason", [
    (None, "development token"),
    ("dev-token-change-me", "development token"),
    ("", "empty"),
    ("short-secret", "at least 16"),
])
def test_prod_profile_refuses_to_start_without_a_real_token(tmp_path: Path, token: str | None,
                                                            reason: str) -> None:
    env = _env(SIGSERVE_PROFILE="prod")
    if token is not None:
        env["SIGSERVE_AUTH_TOKEN"] = token
    result = _serve(tmp_path / "home", "--port", str(_free_port()), env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("validation_error: ") and reason in lines[0], lines[0]
    assert "SIGSERVE_AUTH_TOKEN" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was opened


def test_duckdb_refuses_several_workers(tmp_path: Path) -> None:
    result = _serve(tmp_path / "home", "--workers", "2", env=_env(SIGSERVE_AUTH_TOKEN=TOKEN))
    assert result.returncode == 2
    assert result.stderr.startswith("validation_error: a DuckDB store admits one writing process")


# --- a real server ------------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    ready_s: float  # process start to the first successful prediction
    log: Path


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("http-server")
    home = copy_home(world, root)
    port = _free_port()
    log = root / "server.log"
    env = _env(SIGSERVE_AUTH_TOKEN=TOKEN, SIGSERVE_DEFAULT_SIGNAL=SIGNAL,
               SIGSERVE_DEADLINE_MS="10000", SIGSERVE_PROFILE="prod")
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sigserve", "--home", str(home), "serve", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = None
        while time.perf_counter() - started < 60 and process.poll() is None:
            try:
                r = httpx.post(f"{url}/api/v1/predict", json={"symbol": BTC}, headers=AUTH, timeout=5)
                if r.status_code == 200:
                    ready = time.perf_counter() - started
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        assert ready is not None, log.read_text()
        yield Server(url, process, ready, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung shutdown
                process.kill()
                process.wait()


def test_server_answers_over_tcp_on_localhost(server: Server, world: World) -> None:
    print(f"cold start to the first successful prediction: {server.ready_s:.2f} s")
    assert "Uvicorn running on http://127.0.0.1:" in server.log.read_text()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        r = client.get("/models")
        assert r.status_code == 401 and r.json()["error_code"] == "unauthorized"
        r = client.post("/inference/run", headers={**AUTH, "X-Request-ID": "tcp-1"}, json={
            "signal_id": SIGNAL, "symbol": ETH, "ts": world.t(300), "interval_name": INTERVAL})
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "tcp-1"
        assert r.json()["ts"] == world.t(300)
        inline = client.post("/api/v1/predict", headers=AUTH, json={
            "symbol": BTC, "features": world.feature_dict(BTC, 300)})
        assert inline.status_code == 200 and inline.json()["action"] in ("BUY", "SELL", "HOLD")
        metrics = client.get("/metrics", headers=AUTH).text
        assert 'route="/inference/run",status="200"' in metrics


def test_schemathesis_finds_no_server_error(server: Server) -> None:
    """Valid and invalid requests generated from the OpenAPI schema, bounded (< 60 s): every
    answer is below 500, and every non-2xx one is the envelope."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    raw = httpx.get(f"{server.url}/openapi.json", headers=AUTH, timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw)
    problems: list[str] = []
    calls = 0
    budget_end = time.monotonic() + 50

    def check(case: Any) -> None:
        nonlocal calls
        if time.monotonic() > budget_end:
            return
        response = case.call(base_url=server.url, headers=AUTH, timeout=30)
        calls += 1
        where = f"{case.method} {case.formatted_path} body={str(case.body)[:200]!r}"
        if response.status_code >= 500:
            problems.append(f"{where} -> {response.status_code} {response.text[:300]}")
        elif response.status_code >= 400 and case.method != "HEAD":
            body = response.json()
            if set(body) != {"error_code", "message", "details", "request_id"}:
                problems.append(f"{where} -> {response.status_code} not an envelope: {body}")

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                           phases=[Phase.explicit, Phase.generate],
                           suppress_health_check=list(HealthCheck))(
                given(case=operation.as_strategy(generation_mode=mode))(check))
            try:
                run()
            except Unsatisfiable:  # nothing invalid to send (an operation without inputs)
                assert mode is GenerationMode.NEGATIVE, operation.label
    print(f"schemathesis: {calls} requests over {len(operations)} operations")
    assert calls >= 100, calls
    assert problems == [], "\n".join(problems[:20])


def test_demo_ends_by_serving_and_its_curl_commands_work(tmp_path: Path) -> None:
    """``sigserve demo`` runs the demo, prints the curl commands, and serves: each printed curl
    command answers without an error envelope."""
    import shutil

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    port = _free_port()
    env = _env(COLUMNS="300")
    with subprocess.Popen(
            [sys.executable, "-m", "sigserve", "--home", str(tmp_path / "home"), "demo", "--bars",
             "800", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env) as process:
        try:
            assert process.stdout is not None
            commands: list[str] = []
            lines: list[str] = []
            for line in process.stdout:
                lines.append(line)
                if line.strip().startswith("curl "):
                    commands.append(line.strip())
                if "Uvicorn running on" in line:
                    break
            output = "".join(lines)
            assert "Uvicorn running on http://127.0.0.1:" in output, output
            assert len(commands) >= 5, output
            for command in commands:
                out = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                     timeout=30, check=False)
                assert out.returncode == 0, (command, out.stderr)
                assert out.stdout.strip(), command
                assert '"error_code"' not in out.stdout, (command, out.stdout)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:  # pragma: no cover
                process.kill()
                process.wait()


def _read_responses(sock: socket.socket, count: int, timeout: float = 10.0) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` whole HTTP/1.1 responses (Content-Length framed) from a raw socket."""
    sock.settimeout(timeout)
    buffer = b""
    responses: list[tuple[int, dict[str, str], bytes]] = []
    while len(responses) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(responses)} responses"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a body"
            buffer += chunk
        responses.append((status, headers, buffer[:length]))
        buffer = buffer[length:]
    return responses


def test_pipelined_requests_get_whole_answers_in_order(server: Server, world: World) -> None:
    """The server's transport gathers a response's head and body into one write: over one raw
    keep-alive connection, pipelined requests get whole answers, in order; then a
    ``Connection: close`` request gets its answer before the server closes."""
    import json

    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"symbol": BTC, "features": world.feature_dict(BTC, 300)}).encode()
    requests = b"".join([
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: pipe-1\r\n\r\n",
        b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nX-Request-ID: pipe-2\r\nAuthorization: Bearer "
        + TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body,
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Request-ID: pipe-3\r\nAuthorization: Bearer "
        + TOKEN.encode() + b"\r\n\r\n",
    ])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(requests)
        answers = _read_responses(sock, 3)
        assert [(s, h["x-request-id"]) for s, h, _ in answers] == [(200, "pipe-1"), (200, "pipe-2"),
                                                                  (404, "pipe-3")]
        assert json.loads(answers[1][2])["action"] in ("BUY", "SELL", "HOLD")
        assert json.loads(answers[2][2])["error_code"] == "route_not_found"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        (status, _, payload), = _read_responses(sock, 1)
        assert status == 200 and json.loads(payload) == {"status": "ok"}
        assert sock.recv(1) == b""  # closed by the server after the answer
