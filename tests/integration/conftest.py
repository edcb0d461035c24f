"""Store fixtures for the contract suite: one ``store`` per Store implementation.

Add a backend by appending ``(id, factory)`` to ``STORE_FACTORIES``; a factory takes the test's
``tmp_path`` and returns an opened Store (it may ``pytest.skip`` when its service is unreachable).
The suite itself (``test_store_contract.py``) uses only the Store protocol, so it runs unchanged.

The PostgreSQL factory opens the local test database (``tests.services.require_postgres_url``)
in a schema of its own per test (``sigtest_<run>_<test>``), dropped after the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from sigserve.stores import DuckDBStore, Store
from tests.services import require_postgres_url

StoreFactory = Callable[[Path], Awaitable[Store]]


async def duckdb_file(tmp_path: Path) -> Store:
    store = DuckDBStore(tmp_path / "store" / "sigserve.duckdb")
    await store.open()
    return store


async def duckdb_memory(tmp_path: Path) -> Store:
    store = DuckDBStore(":memory:")
    await store.open()
    return store


_PG_RUN = uuid.uuid4().hex[:8]
_PG_SCHEMAS: set[tuple[str, str]] = set()  # (server url, schema) made by the running test


def postgres_schema(tmp_path: Path) -> str:
    """One schema per test and run: the same ``tmp_path`` names the same schema (reopen)."""
    return f"sigtest_{_PG_RUN}_{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12]}"


def postgres_url(tmp_path: Path) -> str:
    """A store URL on this test's own schema (dropped after the test, see below)."""
    url = require_postgres_url()
    schema = postgres_schema(tmp_path)
    _PG_SCHEMAS.add((url, schema))
    return f"{url}{'&' if '?' in url else '?'}schema={schema}&pool_max=4"


async def postgres(tmp_path: Path) -> Store:
    from sigserve.stores.postgres_store import PostgresStore

    store = PostgresStore(postgres_url(tmp_path))
    await store.open()
    return store


def _drop_schemas(schemas: list[tuple[str, str]]) -> None:
    async def drop() -> None:
        import asyncpg

        for url, schema in schemas:
            con = await asyncpg.connect(url)
            try:
                await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await con.close()

    # A thread of its own: this teardown may run while the test's event loop exists.
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(errors, lambda: asyncio.run(drop())))
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _capture(errors: list[BaseException], fn: Callable[[], None]) -> None:
    try:
        fn()
    except BaseException as exc:  # re-raised in the caller's thread
        errors.append(exc)


@pytest.fixture(autouse=True)
def _drop_postgres_schemas() -> Iterator[None]:
    """Drop the PostgreSQL schemas a test made, after its stores are closed."""
    yield
    if _PG_SCHEMAS:
        schemas = sorted(_PG_SCHEMAS)
        _PG_SCHEMAS.clear()
        _drop_schemas(schemas)


STORE_FACTORIES: list[tuple[str, StoreFactory]] = [
    ("duckdb-file", duckdb_file),
    ("duckdb-memory", duckdb_memory),
    ("postgres", postgres),
]

# Ids of factories that, called again with the same ``tmp_path``, open the same database (used to
# check that reopening applies no migration twice and keeps the data).
REOPENABLE: set[str] = {"duckdb-file", "postgres"}


@pytest.fixture(params=[factory for _, factory in STORE_FACTORIES],
                ids=[name for name, _ in STORE_FACTORIES])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await request.param(tmp_path)
    try:
        yield opened
    finally:
        await opened.close()
