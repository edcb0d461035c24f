"""Stores: the protocol and its implementations. ``open_store`` picks one by URL.

>>> store = open_store("duckdb:///tmp/x.duckdb")   # or a bare path, or ":memory:"
"""

from __future__ import annotations

from .base import Candles, FeatureRead, Store
from .duckdb_store import DuckDBStore

__all__ = ["Candles", "DuckDBStore", "FeatureRead", "Store", "open_store"]


def open_store(url: str) -> Store:
    """A Store for ``url``: ``duckdb:///path``, ``duckdb://:memory:``, a path ending .duckdb, or
    ``postgresql://user@host:5432/db?schema=NAME&pool_max=10`` (needs the ``postgres`` extra).

    A DuckDB file takes ``?journal=off`` to write signal rows straight into the file instead of
    through the signal journal (see :mod:`.signal_journal`).
    """
    from ..errors import ValidationError

    journal = True
    if "?" in url and not url.startswith(("postgresql://", "postgres://")):
        url, _, query = url.partition("?")
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name != "journal" or value not in ("on", "off"):
                raise ValidationError(f"unknown DuckDB store option {part!r}: the one option is"
                                      " journal=on|off", details={"store": url})
            journal = value == "on"

    if url.startswith(("postgresql://", "postgres://")):
        from .postgres_store import PostgresStore

        return PostgresStore(url)
    if url.startswith("duckdb://"):
        path = url[len("duckdb://"):]
        if path.startswith("/") and path[1:] == ":memory:":
            path = ":memory:"
        return DuckDBStore(path or ":memory:", journal=journal)
    if url == ":memory:" or url.endswith(".duckdb") or url.endswith(".db"):
        return DuckDBStore(url, journal=journal)
    raise ValidationError(f"unknown store URL {url!r}: use duckdb:///path/to/file.duckdb"
                          " or postgresql://user@host:5432/db?schema=NAME", details={"store": url})
