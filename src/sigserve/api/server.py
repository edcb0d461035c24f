"""Run the HTTP service under uvicorn (the ``sigserve serve`` command).

One worker gets the app object built from these settings. Several workers are separate processes
that each build the app from the environment (``create_app`` as a factory), so the home and store
chosen here are exported to them. A DuckDB file admits one writing process: more than one worker
on DuckDB is refused.

Usage::

    serve(Settings(), host="127.0.0.1", port=8000, workers=1)
"""

from __future__ import annotations

import os

from ..config import Settings
from ..errors import ValidationError


def is_duckdb(url: str) -> bool:
    """Every store but PostgreSQL is an embedded DuckDB file (see ``open_store``)."""
    return not url.startswith(("postgresql://", "postgres://"))


def check(settings: Settings, workers: int) -> None:
    """Everything that can refuse before a port is bound."""
    settings.check_serving()
    if workers < 1:
        raise ValidationError("--workers must be at least 1", details={"workers": workers})
    if workers > 1 and is_duckdb(settings.store_url):
        raise ValidationError(
            "a DuckDB store admits one writing process: serve it with --workers 1, or use a"
            " PostgreSQL store (--store postgresql://...) for several workers",
            details={"workers": workers, "store": "duckdb"})


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    check(settings, workers)
    import uvicorn

    from .protocol import CoalescingHttpToolsProtocol

    # ws="none": sigserve serves no websockets, and uvicorn then skips importing their protocol
    common = {"host": host, "port": port, "access_log": settings.access_log, "ws": "none",
              "server_header": False, "log_level": "info", "timeout_graceful_shutdown": 10,
              "http": os.environ.get("SIGSERVE_UVICORN_HTTP") or CoalescingHttpToolsProtocol}
    if workers == 1:
        from .app import create_app

        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
        return
    os.environ["SIGSERVE_HOME"] = str(settings.home.resolve())
    os.environ["SIGSERVE_STORE"] = settings.store_url
    uvicorn.run("sigserve.api.app:create_app", factory=True, workers=workers, **common)  # type: ignore[arg-type]

