"""Settings, read once from the environment (``SIGSERVE_*``) or passed explicitly.

Usage::

    settings = Settings()                       # from the environment
    settings = Settings(home=Path("/tmp/x"))    # explicit
    settings.store_url                          # duckdb:///.../sigserve.duckdb unless SIGSERVE_STORE
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    profile: str = Field(default="dev", description="dev | prod (prod refuses to serve with the dev token)")
    auth_token: str = Field(default=DEV_TOKEN_SENTINEL, description="bearer token of the HTTP service")
    # --- HTTP service ---
    default_signal: str | None = Field(
        default=None, description="signal behind /model/* and /api/v1/predict without signal_id;"
        " None: the only active signal")
    deadline_ms: float = Field(default=100.0, gt=0, description="latency budget of a one-bar request")
    fallback_to_hold: bool = Field(
        default=False, description="past the budget, answer (and store) hold instead of deadline_exceeded")
    server_prepared_ttl_s: float = Field(
        default=1.0, ge=0, description="how long the server keeps a resolved signal (0: resolve every call)")
    group_bars: bool = Field(
        default=True, description="concurrent /inference/run requests are served together: one"
        " feature read, predict and upsert per run of consecutive bars (a group commit)")
    group_linger_ms: float = Field(
        default=0.5, ge=0, le=100, description="after a cycle of several grouped requests, the"
        " next waits this long for more to join (0: no wait)")
    auth_token_label: str = Field(default="default", min_length=1, max_length=64,
                                  description="who the token is in audit rows (token:LABEL)")
    shadow_queue_size: int = Field(default=1024, gt=0, description="shadow jobs a server queues;"
                                   " more are dropped and counted")
    shadow_linger_ms: float = Field(
        default=100.0, ge=0, le=10_000, description="shadow jobs are gathered this long and predicted"
        " together (one vectorised predict per version); 0: as soon as the loop is free")
    shadow_worker: Literal["process", "loop"] = Field(
        default="process", description="where shadows are predicted: a worker process under"
        " SCHED_IDLE (the request thread only sends each row down a pipe), or the server's event"
        " loop between requests")
    shadow_cpus: str | None = Field(
        default=None, pattern=r"^\d+(,\d+)*$", description="CPUs of the shadow worker process,"
        " comma-separated (default: the server's)")
    # --- risk checks of /api/v1/predict (risk_check: true); None: that limit is not enforced ---
    risk_max_position_units: float | None = Field(default=None, gt=0)
    risk_max_position_notional: float | None = Field(default=None, gt=0)
    risk_max_concentration: float | None = Field(default=None, gt=0, le=1)
    risk_max_signals_per_window: int | None = Field(default=None, gt=0)
    risk_window_s: float = Field(default=3600.0, gt=0)
    risk_min_confidence: float | None = Field(default=None, ge=0, le=1)
    audit_bus: str | None = Field(default=None, description="nats://host:4222 (or memory://): every"
                                  " /api/v1/predict decision is also a trading_decision event there")
    audit_subject: str = Field(default="audit.trading_decision", description="the events' subject"
                               " prefix (then .SYMBOL)")
    access_log: bool = Field(default=False, description="uvicorn access log (costs latency)")
    otel: bool = Field(default=False, description="FastAPI's native OpenTelemetry through the global"
                       " providers (costs latency on every request)")

    def check_serving(self) -> None:
        """Refuse to serve with a token that protects nothing (every profile) or with the dev
        sentinel in production (``SIGSERVE_PROFILE=prod``)."""
        from .errors import ValidationError

        token = self.auth_token.strip()
        if not token:
            raise ValidationError("SIGSERVE_AUTH_TOKEN is empty: set a bearer token to serve",
                                  details={"setting": "SIGSERVE_AUTH_TOKEN"})
        if self.profile == "prod":
            if token == DEV_TOKEN_SENTINEL:
                raise ValidationError(
                    "SIGSERVE_PROFILE=prod refuses the development token: set SIGSERVE_AUTH_TOKEN"
                    " to a secret of at least 16 characters", details={"setting": "SIGSERVE_AUTH_TOKEN"})
            if len(token) < 16:
                raise ValidationError(
                    "SIGSERVE_PROFILE=prod needs a SIGSERVE_AUTH_TOKEN of at least 16 characters",
                    details={"setting": "SIGSERVE_AUTH_TOKEN", "length": len(token)})
        elif self.profile != "dev":
            raise ValidationError(f"unknown SIGSERVE_PROFILE {self.profile!r}: use dev or prod",
                                  details={"setting": "SIGSERVE_PROFILE"})

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
