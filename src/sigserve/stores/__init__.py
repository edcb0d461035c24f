"""Stores: the protocol and its implementations. ``open_store`` picks one by URL.

>>> store = open_store("duckdb:///tmp/x.duckdb")   # or a bare path, or ":memory:"
"""

from __future__ import annotations

from .base import Candles, FeatureRead, Store
from .duckdb_store import DuckDBStore

__all__ = ["Candles", "DuckDBStore", "FeatureRead", "Store", "open_store"]


def open_store(url: str) -> Store:
    """A Store for ``url``: ``duckdb:///path``, ``duckdb://:memory:``, or a path ending .duckdb."""
    from ..errors import ValidationError

    if url.startswith("duckdb://"):
        path = url[len("duckdb://"):]
        if path.startswith("/") and path[1:] == ":memory:":
            path = ":memory:"
        return DuckDBStore(path or ":memory:")
    if url == ":memory:" or url.endswith(".duckdb") or url.endswith(".db"):
        return DuckDBStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        raise ValidationError(
            "the PostgreSQL store is not part of this build yet; use a duckdb:/// URL",
            details={"store": url.split("@")[-1]})
    raise ValidationError(f"unknown store URL {url!r}: use duckdb:///path/to/file.duckdb",
                          details={"store": url})
