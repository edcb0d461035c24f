"""Store fixtures for the contract suite: one ``store`` per Store implementation.

Add a backend by appending ``(id, factory)`` to ``STORE_FACTORIES``; a factory takes the test's
``tmp_path`` and returns an opened Store (it may ``pytest.skip`` when its service is unreachable).
The suite itself (``test_store_contract.py``) uses only the Store protocol, so it runs unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sigserve.stores import DuckDBStore, Store

StoreFactory = Callable[[Path], Awaitable[Store]]


async def duckdb_file(tmp_path: Path) -> Store:
    store = DuckDBStore(tmp_path / "store" / "sigserve.duckdb")
    await store.open()
    return store


async def duckdb_memory(tmp_path: Path) -> Store:
    store = DuckDBStore(":memory:")
    await store.open()
    return store


STORE_FACTORIES: list[tuple[str, StoreFactory]] = [
    ("duckdb-file", duckdb_file),
    ("duckdb-memory", duckdb_memory),
]

# Ids of factories that, called again with the same ``tmp_path``, open the same database (used to
# check that reopening applies no migration twice and keeps the data).
REOPENABLE: set[str] = {"duckdb-file"}


@pytest.fixture(params=[factory for _, factory in STORE_FACTORIES],
                ids=[name for name, _ in STORE_FACTORIES])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await request.param(tmp_path)
    try:
        yield opened
    finally:
        await opened.close()
