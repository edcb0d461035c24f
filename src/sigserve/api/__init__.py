"""The HTTP driver: a thin FastAPI edge over the one engine.

Usage::

    from sigserve.api import create_app
    app = create_app(Settings())          # uvicorn sigserve.api.app:create_app --factory
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
