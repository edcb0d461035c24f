"""Fixtures of the HTTP end-to-end tests: one world (see http_world.py) per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.http_world import World, build_world, copy_home


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("http-world"))


@pytest.fixture
def home(world: World, tmp_path: Path) -> Path:
    """A private copy of the world's home for one test."""
    return copy_home(world, tmp_path)
