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
    through the signal journal (see :mod:`.signal_journal`), and ``?journal_linger_ms=N`` (0 to
    60000, default 50) for how long the journal's applier waits after the first pending row
    before it applies them all (``sigserve stream`` uses 1000: fewer, larger applies).
    """
    from ..errors import ValidationError
    from .duckdb_store import JOURNAL_LINGER_S

    journal = True
    linger_s = JOURNAL_LINGER_S
    if "?" in url and not url.startswith(("postgresql://", "postgres://")):
        url, _, query = url.partition("?")
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "journal" and value in ("on", "off"):
                journal = value == "on"
                continue
            if name == "journal_linger_ms":
                try:
                    linger_ms = float(value)
                except ValueError:
                    linger_ms = -1.0
                if 0.0 <= linger_ms <= 60_000.0:
                    linger_s = linger_ms / 1000.0
                    continue
            raise ValidationError(f"unknown DuckDB store option {part!r}: the options are journal=on|off"
                                  " and journal_linger_ms=0..60000", details={"store": url})

    if url.startswith(("postgresql://", "postgres://")):
        from .postgres_store import PostgresStore

        return PostgresStore(url)
    if url.startswith("duckdb://"):
        path = url[len("duckdb://"):]
        if path.startswith("/") and path[1:] == ":memory:":
            path = ":memory:"
        return DuckDBStore(path or ":memory:", journal=journal, journal_linger_s=linger_s)
    if url == ":memory:" or url.endswith(".duckdb") or url.endswith(".db"):
        return DuckDBStore(url, journal=journal, journal_linger_s=linger_s)
    raise ValidationError(f"unknown store URL {url!r}: use duckdb:///path/to/file.duckdb"
                          " or postgresql://user@host:5432/db?schema=NAME", details={"store": url})
