"""What the routes share: the settings, the opened services, the metrics, the default signal."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..app import Services
from ..config import Settings
from ..engine import Engine
from ..errors import SignalNotFound, StoreUnavailable
from ..idle import IdleGate
from .metrics import Metrics

log = logging.getLogger("sigserve.api")


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    services: Services | None = None
    # requests in flight (the edge counts them): background work waits for a gap between them
    requests: IdleGate = field(default_factory=IdleGate)
    _default: tuple[float, str] | None = field(default=None, repr=False)

    @property
    def svc(self) -> Services:
        if self.services is None:
            raise StoreUnavailable("the service is starting or stopping")
        return self.services

    @property
    def engine(self) -> Engine:
        return self.svc.engine

    @property
    def budget_s(self) -> float:
        return self.settings.deadline_ms / 1000.0

    async def default_signal(self) -> str:
        """SIGSERVE_DEFAULT_SIGNAL, else the only active signal (kept for the prepared TTL)."""
        if self.settings.default_signal:
            return self.settings.default_signal
        ttl = self.engine.prepared_ttl_s
        cached = self._default
        now = time.monotonic()
        if cached is not None and now - cached[0] < ttl:
            return cached[1]
        active = [d.signal_id for d in await self.svc.store.list_signals() if d.active]
        if len(active) != 1:
            self._default = None
            reason = "no active signal" if not active else f"{len(active)} active signals"
            raise SignalNotFound(
                f"no default signal: {reason}; set SIGSERVE_DEFAULT_SIGNAL or pass signal_id",
                details={"active_signals": sorted(active)[:50]})
        self._default = (now, active[0])
        return active[0]
