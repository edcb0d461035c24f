"""The HTTP driver: a thin ASGI edge over the one engine (FastAPI for the schema and the rest).

Usage::

    from sigserve.api import create_app
    app = create_app(Settings())          # uvicorn sigserve.api.app:create_app --factory
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
