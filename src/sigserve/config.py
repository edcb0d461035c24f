"""Settings, read once from the environment (``SIGSERVE_*``) or passed explicitly.

Usage::

    settings = Settings()                       # from the environment
    settings = Settings(home=Path("/tmp/x"))    # explicit
    settings.store_url                          # duckdb:///.../sigserve.duckdb unless SIGSERVE_STORE
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_TOKEN_SENTINEL = "dev-token-change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIGSERVE_", extra="ignore")

    home: Path = Field(default=Path(".sigserve"), description="artifacts, compiled models, store")
    store: str | None = Field(default=None, description="duckdb:///path or a path; default: HOME/sigserve.duckdb")
    max_backfill_rows: int = Field(default=5_000_000, gt=0)
    backfill_chunk_rows: int = Field(default=250_000, gt=0)
    predict_threads: int = Field(default=2, gt=0)
    prepared_ttl_s: float = Field(default=0.0, ge=0, description="how long a server keeps a resolved signal")
    profile: str = "dev"
    auth_token: str = DEV_TOKEN_SENTINEL

    @property
    def store_url(self) -> str:
        if self.store:
            return self.store
        return f"duckdb:///{(self.home / 'sigserve.duckdb').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def compiled_dir(self) -> Path:
        return self.home / "compiled"
