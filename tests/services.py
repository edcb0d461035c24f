"""Reachability of the development services, with one rule for every integration test.

A test that needs a service calls ``require_*()``. When the service is unreachable the test is
skipped with a clear reason, except when ``SIGSERVE_REQUIRE_SERVICES=1`` (``.ci/run`` sets it):
then it fails, so CI never passes by skipping.

    url = require_postgres_url()              # the local PostgreSQL, or skip / fail
    require_tcp("NATS", "127.0.0.1", 4222)    # the same rule for any TCP service
    tools = require_executables("initdb", "pg_ctl")
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import socket
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

REQUIRE_ENV = "SIGSERVE_REQUIRE_SERVICES"
POSTGRES_URL_ENV = "SIGSERVE_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def services_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip with ``reason``, or fail when services are required."""
    if services_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@functools.cache
def _tcp_error(host: str, port: int, timeout: float = 1.0) -> str | None:
    """None when something accepts TCP connections at host:port, else why not (cached per run)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def require_tcp(name: str, host: str, port: int) -> None:
    error = _tcp_error(host, port)
    if error is not None:
        unavailable(f"{name} is unreachable at {host}:{port} ({error}); start it (the env skill's"
                    " machines/python-svc.md gives the command)")


def require_postgres_url() -> str:
    """The URL of the test PostgreSQL (``SIGSERVE_TEST_POSTGRES_URL``, default the local one)."""
    url = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    parts = urlsplit(url)
    require_tcp("PostgreSQL", parts.hostname or "127.0.0.1", parts.port or 5432)
    return url


def find_executable(name: str) -> str | None:
    """``name`` on PATH, or in a Debian PostgreSQL bin directory (initdb and pg_ctl live there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def require_executables(*names: str) -> dict[str, str]:
    found = {name: find_executable(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        unavailable(f"{', '.join(missing)} not found on PATH (install the PostgreSQL server"
                    " package to run this test)")
    return {name: path for name, path in found.items() if path is not None}
