"""Risk checks: each check passes and fails on its own limit; a failed check refuses with
``risk_rejected`` (403) and the checks in details; approved decisions fill the book."""

from __future__ import annotations

import pytest

from sigserve.errors import RiskRejected
from sigserve.risk import CHECKS, RiskBook, RiskLimits

LONG = {"entry_price": 100.0, "stop_loss": 95.0, "take_profit": 110.0}
SHORT = {"entry_price": 100.0, "stop_loss": 105.0, "take_profit": 90.0}


def refused(book: RiskBook, *args: object, **kwargs: object) -> dict[str, object]:
    with pytest.raises(RiskRejected) as caught:
        book.check(*args, **kwargs)  # type: ignore[arg-type]
    assert caught.value.code == "risk_rejected" and caught.value.http_status == 403
    return caught.value.details


def test_no_limits_approve_sane_decisions_and_hold_always_passes() -> None:
    book = RiskBook(RiskLimits())
    out = book.check("BTC", "BUY", 2.0, 0.6, LONG)
    assert out == {"approved": True, "warnings": [], "checks": dict.fromkeys(CHECKS, "pass")}
    assert book.check("BTC", "SELL", 2.0, 0.6, SHORT)["approved"]
    assert book.check("BTC", "HOLD", None, 0.1, {})["approved"]
    no_levels = book.check("ETH", "BUY", None, 0.6, {"entry_price": None, "stop_loss": None, "take_profit": None})
    assert no_levels["approved"] and len(no_levels["warnings"]) == 2


@pytest.mark.parametrize("limits,args,failed", [
    (RiskLimits(max_position_units=1.0), ("BTC", "BUY", 2.0, 0.6, LONG), "max_position"),
    (RiskLimits(max_position_notional=150.0), ("BTC", "BUY", 2.0, 0.6, LONG), "max_position"),
    (RiskLimits(min_confidence=0.7), ("BTC", "SELL", 1.0, 0.6, SHORT), "min_confidence"),
    (RiskLimits(), ("BTC", "BUY", 1.0, 0.6, SHORT), "levels"),
    (RiskLimits(), ("BTC", "SELL", 1.0, 0.6, {**SHORT, "take_profit": -1.0}), "levels"),
])
def test_each_check_fails_on_its_limit(limits: RiskLimits, args: tuple[object, ...], failed: str) -> None:
    details = refused(RiskBook(limits), *args)
    assert details["approved"] is False and details["checks"][failed] == "fail"  # type: ignore[index]
    assert [k for k, v in details["checks"].items() if v == "fail"] == [failed]  # type: ignore[attr-defined]


def test_signals_per_window_and_concentration() -> None:
    book = RiskBook(RiskLimits(max_signals_per_window=2, window_s=60.0))
    book.check("BTC", "BUY", 1.0, 0.6, LONG, now=0.0)
    book.check("BTC", "SELL", 1.0, 0.6, SHORT, now=10.0)
    assert refused(book, "BTC", "BUY", 1.0, 0.6, LONG, now=20.0)["checks"]["max_signals_per_window"] == "fail"  # type: ignore[index]
    assert book.check("BTC", "BUY", 1.0, 0.6, LONG, now=75.0)["approved"]  # the first left the window
    assert book.check("ETH", "BUY", 1.0, 0.6, LONG, now=20.0)["approved"]  # per symbol

    book = RiskBook(RiskLimits(max_concentration=0.6))
    assert book.check("BTC", "BUY", 1.0, 0.6, LONG)["approved"]  # alone: not checked
    assert book.check("ETH", "BUY", 1.0, 0.6, LONG)["approved"]  # 50% / 50%
    details = refused(book, "SOL", "BUY", 5.0, 0.6, LONG)  # 500 of 700 gross
    assert details["checks"]["max_concentration"] == "fail"  # type: ignore[index]
    assert "SOL" not in book.exposure  # a refused decision leaves the book as it was
