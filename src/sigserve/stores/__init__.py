"""Stores: the protocol and its implementations. ``open_store`` picks one by URL.

>>> store = open_store("duckdb:///tmp/x.duckdb")   # or a bare path, or ":memory:"
"""

from __future__ import annotations

from .base import Candles, FeatureRead, Store
from .duckdb_store import DuckDBStore

__all__ = ["Candles", "DuckDBStore", "FeatureRead", "Store", "open_store"]


def open_store(url: str) -> Store:
    """A Store for ``url``: ``duckdb:///path``, ``duckdb://:memory:``, a path ending .duckdb, or
    ``postgresql://user@host:5432/db?schema=NAME&pool_max=10`` (needs the ``postgres`` extra)."""
    from ..errors import ValidationError

    if url.startswith(("postgresql://", "postgres://")):
        from .postgres_store import PostgresStore

        return PostgresStore(url)
    if url.startswith("duckdb://"):
        path = url[len("duckdb://"):]
        if path.startswith("/") and path[1:] == ":memory:":
            path = ":memory:"
        return DuckDBStore(path or ":memory:")
    if url == ":memory:" or url.endswith(".duckdb") or url.endswith(".db"):
        return DuckDBStore(url)
    raise ValidationError(f"unknown store URL {url!r}: use duckdb:///path/to/file.duckdb"
                          " or postgresql://user@host:5432/db?schema=NAME", details={"store": url})
