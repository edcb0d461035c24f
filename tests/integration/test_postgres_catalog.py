"""PostgreSQL only: the catalog version moves with changes made by any client, not only through
the store (row triggers). A second server, a migration script or an operator's psql session edits
the same tables; a server that kept its resolved signals must see those changes too."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import postgres, postgres_schema
from tests.integration.test_store_contract import card, definition
from tests.services import require_postgres_url


async def test_plain_sql_from_another_session_moves_the_catalog_version(tmp_path: Path) -> None:
    import asyncpg

    store = await postgres(tmp_path)
    schema = postgres_schema(tmp_path)
    other = await asyncpg.connect(require_postgres_url())  # the server's default search_path
    try:
        await store.insert_model(card())
        await store.create_signal(definition())
        before = await store.catalog_version()
        for sql in (f'UPDATE "{schema}".signal_definitions SET status = \'retired\'',
                    f'UPDATE "{schema}".model_registry SET stage = \'retired\'',
                    f'DELETE FROM "{schema}".signal_definitions'):
            await other.execute(sql)
            after = await store.catalog_version()
            assert after != before, sql
            before = after
        # a statement that changes no row moves nothing (row triggers)
        await other.execute(f'UPDATE "{schema}".model_registry SET stage = \'retired\' WHERE false')
        assert await store.catalog_version() == before
        # a transaction that rolls back moves nothing either
        tx = other.transaction()
        await tx.start()
        await other.execute(f'UPDATE "{schema}".model_registry SET stage = \'registered\'')
        await tx.rollback()
        assert await store.catalog_version() == before
    finally:
        await other.close()
        await store.close()
