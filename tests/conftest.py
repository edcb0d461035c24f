"""Shared fixtures: a fresh SIGSERVE_HOME per test, and the services wired on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sigserve.app import Services
from sigserve.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", max_backfill_rows=1_000_000, backfill_chunk_rows=1_000)


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    async with Services.open(settings) as opened:
        yield opened
