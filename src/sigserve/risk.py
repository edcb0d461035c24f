"""Risk checks of a trading decision (``risk_check: true`` in ``/api/v1/predict``).

Five checks, each ``pass`` or ``fail``; a decision with any ``fail`` is refused with
``risk_rejected`` (HTTP 403, the checks in ``details``). A HOLD changes no position and passes.

=========================== ===================================================================
check                       fails when (limits from ``SIGSERVE_RISK_*``; unset: always passes)
=========================== ===================================================================
max_position                the position after the decision (the recommended quantity, as
                            units and as notional = quantity x entry) exceeds
                            ``RISK_MAX_POSITION_UNITS`` / ``RISK_MAX_POSITION_NOTIONAL``
max_concentration           this symbol's share of the gross notional of the book (every
                            symbol's latest approved position) exceeds ``RISK_MAX_CONCENTRATION``
                            (checked once the book holds at least two symbols)
max_signals_per_window      more than ``RISK_MAX_SIGNALS_PER_WINDOW`` approved BUY/SELL decisions
                            for the symbol within ``RISK_WINDOW_S`` seconds
min_confidence              a BUY/SELL with confidence below ``RISK_MIN_CONFIDENCE``
levels                      entry, stop and take-profit are not finite and positive, or a long's
                            stop is not below its entry and its target above (the reverse for a
                            short). A decision without levels (no close price) passes with a
                            warning.
=========================== ===================================================================

The book is the server's own memory of the decisions it approved (one process; it starts
empty): sigserve recommends positions, it does not see fills.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .errors import RiskRejected

CHECKS = ("max_position", "max_concentration", "max_signals_per_window", "min_confidence", "levels")


@dataclass(frozen=True)
class RiskLimits:
    max_position_units: float | None = None
    max_position_notional: float | None = None
    max_concentration: float | None = None
    max_signals_per_window: int | None = None
    window_s: float = 3600.0
    min_confidence: float | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> RiskLimits:
        return cls(settings.risk_max_position_units, settings.risk_max_position_notional,
                   settings.risk_max_concentration, settings.risk_max_signals_per_window,
                   settings.risk_window_s, settings.risk_min_confidence)


class RiskBook:
    def __init__(self, limits: RiskLimits) -> None:
        self.limits = limits
        self.exposure: dict[str, float] = {}  # symbol -> signed notional of the approved position
        self.recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, symbol: str, action: str, quantity: float | None, confidence: float,
              levels: dict[str, float | None], now: float | None = None) -> dict[str, Any]:
        """Evaluate and, when approved, record the decision. Raises ``RiskRejected`` on a fail."""
        now = time.monotonic() if now is None else now
        limits = self.limits
        checks = dict.fromkeys(CHECKS, "pass")
        warnings: list[str] = []
        with self._lock:
            if action == "HOLD":
                return {"approved": True, "warnings": warnings, "checks": checks}
            side = 1.0 if action == "BUY" else -1.0
            entry = levels.get("entry_price")
            units = abs(quantity) if quantity is not None and math.isfinite(quantity) else None
            notional = units * entry if units is not None and entry is not None else None
            if units is None:
                warnings.append("no recommended quantity (no close price): position limits not checked")
            else:
                if limits.max_position_units is not None and units > limits.max_position_units:
                    checks["max_position"] = "fail"
                if (limits.max_position_notional is not None and notional is not None
                        and notional > limits.max_position_notional):
                    checks["max_position"] = "fail"
            if notional is not None and limits.max_concentration is not None:
                book = {**{s: abs(v) for s, v in self.exposure.items()}, symbol: notional}
                held = [s for s, v in book.items() if v > 0]
                gross = sum(book.values())
                if len(held) >= 2 and gross > 0 and notional / gross > limits.max_concentration:
                    checks["max_concentration"] = "fail"
            times = self.recent.setdefault(symbol, deque())
            while times and now - times[0] > limits.window_s:
                times.popleft()
            if limits.max_signals_per_window is not None and len(times) + 1 > limits.max_signals_per_window:
                checks["max_signals_per_window"] = "fail"
            if limits.min_confidence is not None and confidence < limits.min_confidence:
                checks["min_confidence"] = "fail"
            stop, take = levels.get("stop_loss"), levels.get("take_profit")
            if entry is None and stop is None and take is None:
                warnings.append("no levels (no close price): level sanity not checked")
            elif not _levels_sane(side, entry, stop, take):
                checks["levels"] = "fail"
            approved = all(v == "pass" for v in checks.values())
            result = {"approved": approved, "warnings": warnings, "checks": checks}
            if not approved:
                failed = sorted(k for k, v in checks.items() if v == "fail")
                raise RiskRejected(f"the {action} decision on {symbol} fails risk checks: {failed}",
                                   details={**result, "symbol": symbol, "action": action,
                                            "quantity": quantity, "confidence": confidence})
            times.append(now)
            if notional is not None:
                self.exposure[symbol] = side * notional
            return result


def _levels_sane(side: float, entry: float | None, stop: float | None, take: float | None) -> bool:
    values = (entry, stop, take)
    if any(v is None or not math.isfinite(v) or v <= 0 for v in values):
        return False
    assert entry is not None and stop is not None and take is not None
    if side > 0:
        return stop < entry < take
    return take < entry < stop
